"""The paper's search over sampling settings: guidance scale x guidance interval x EMA half-life.

    python -m full.guidance_search --ckpt run/ckpt.pt --ref ref256/ref_stats.npz --num 10000 \\
        --omegas 7.5 8.0 8.5 9.0 --intervals 0.1,0.7 0.2,0.7 --emas 1000 2000 --out search/

pMF trains one network for a whole range of (omega, t_min, t_max) (guidance is an input, pMF
App. A), so choosing them is a pure sampling-time search; the paper reports the best
(omega, interval, EMA) per model (B/16: 8.5, [0.1, 0.7], 2000). Every setting samples the same
noise and labels (per-sample seeds of full.sample), so differences between rows come from the
setting, not from the draw. Prints a table (FID, IS per combination; best FID marked) and writes
JSON after every row, so an interrupted search keeps what it finished. An ``--out`` holding an earlier
search's JSON is refused unless ``--overwrite``. Runs in one process.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .evaluate import metrics_from_features
from .checkpoint import CheckpointError, first_non_finite, load_checkpoint
from .export import choose_ema
from . import cli
from .io import finite_or_null, write_json
from .fid import (IS_SPLITS, POOL_DIM, InceptionWeightsError, build_inception, extract_features,
                  load_statistics)
from .sample import (NonFiniteSamplesError, checkpoint_info, iter_samples, load_for_sampling,
                     normalize_ema, sampling_defaults)


@dataclass(frozen=True)
class SearchConfig:
    omegas: tuple[float, ...]
    intervals: tuple[tuple[float, float], ...]   # (t_min, t_max) pairs
    emas: tuple[str, ...]                        # EMA half-life keys (kimg) or "raw"
    num: int                                     # samples per setting (paper: FID-50K; a search may use fewer)
    seed: int = 0
    batch_size: int = 64
    is_splits: int = IS_SPLITS
    progress: bool = True


def search(load_model: Callable[[str], torch.nn.Module], extractor, ref_mu, ref_sigma, cfg: SearchConfig,
           on_row: Callable[[dict], None] | None = None) -> list[dict]:
    """Evaluate every (EMA, omega, interval) combination; returns one dict per row.

    Args:
        load_model: EMA key -> model (eval mode, on its device); called once per EMA.
        extractor: Inception feature extractor (full.fid.build_inception).
        ref_mu, ref_sigma: reference statistics.
        on_row: called with each finished row (e.g. to print it and save partial results).
    Returns:
        rows ``{"ema", "omega", "t_min", "t_max", "fid", "is_mean", "is_std", "num"}``.
    """
    rows = []
    indices = torch.arange(cfg.num)
    for ema in cfg.emas:
        model = load_model(ema)
        for omega, (t_min, t_max) in itertools.product(cfg.omegas, cfg.intervals):
            batches = (images for _, _, images in iter_samples(
                model, indices, omega=omega, t_min=t_min, t_max=t_max, seed=cfg.seed,
                batch_size=cfg.batch_size, progress=False))
            features = extract_features(extractor, batches, total=cfg.num, progress=cfg.progress)
            row = {"ema": ema, "omega": omega, "t_min": t_min, "t_max": t_max,
                   **metrics_from_features(features.pool, features.logits, ref_mu, ref_sigma,
                                           is_splits=cfg.is_splits)}
            rows.append(row)
            if on_row is not None:
                on_row(row)
        del model
    return rows


def format_row(row: dict, best: bool = False) -> str:
    return (f"{row['ema']:>6} {row['omega']:>6.2f} {row['t_min']:>5.2f} {row['t_max']:>5.2f} "
            f"{row['fid']:>9.3f} {row['is_mean']:>8.2f}{'  <- best FID' if best else ''}")


RESULT_NAME = "guidance_search.json"
TABLE_HEADER = f"{'EMA':>6} {'omega':>6} {'t_min':>5} {'t_max':>5} {'FID':>9} {'IS':>8}"


def format_table(rows: list[dict]) -> str:
    """All rows in search order, the best FID marked."""
    best = min(range(len(rows)), key=lambda i: rows[i]["fid"])
    return "\n".join([TABLE_HEADER] + [format_row(row, i == best) for i, row in enumerate(rows)])


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser("python -m full.guidance_search", __doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint written by full.train")
    parser.add_argument("--ref", required=True, help="reference statistics .npz (python -m full.evaluate ref-stats)")
    parser.add_argument("--omegas", type=float, nargs="+", required=True, help="guidance scales to try, each >= 1")
    parser.add_argument("--intervals", type=cli.interval, nargs="+", default=None, metavar="TMIN,TMAX",
                        help="guidance intervals TMIN,TMAX to try, 0 <= TMIN <= TMAX <= 1; default: the preset's "
                             "best (B/16: 0.1,0.7)")
    parser.add_argument("--emas", nargs="+", default=None,
                        help="EMA half-lives (kimg keys of the checkpoint) or 'raw'; default: the preset's best "
                             "if the run kept it, else the kept EMA nearest to it")
    parser.add_argument("--num", type=int, default=10000, help="samples per setting (class-balanced)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help=f"output folder: {RESULT_NAME}, every row so far (rewritten after each row)")
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace an earlier {RESULT_NAME} in --out (without it, such a folder is refused)")
    cli.add_json(parser, "all rows")
    parser.add_argument("--seed", type=int, default=0, help="noise seed shared by every setting")
    parser.add_argument("--batch-size", type=int, default=64, help="images per network and Inception call")
    parser.add_argument("--is-splits", type=int, default=IS_SPLITS, help="Inception Score splits (<= --num)")
    parser.add_argument("--inception-weights", default=None,
                        help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth; default: the torch "
                             "hub cache (<TORCH_HOME or ~/.cache/torch>/hub/checkpoints/)")
    cli.add_device(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    for omega in args.omegas:
        if not (math.isfinite(omega) and omega >= 1):
            parser.error(f"--omegas: each must be a finite number >= 1, got {omega}")
    for t_min, t_max in args.intervals or ():
        if not 0 <= t_min <= t_max <= 1:
            parser.error(f"--intervals: each needs 0 <= TMIN <= TMAX <= 1, got {t_min},{t_max}")
    if args.num < 2:
        parser.error(f"--num must be >= 2 (FID needs a covariance), got {args.num}")
    if not 1 <= args.is_splits <= args.num:
        parser.error(f"--is-splits must lie in [1, --num = {args.num}], got {args.is_splits}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 0 <= args.seed < 2 ** 31:
        parser.error(f"--seed must lie in [0, 2^31), got {args.seed}")
    for flag, path in (("--ckpt", args.ckpt), ("--ref", args.ref)):
        if not Path(path).is_file():
            parser.error(f"{flag} {path} is not a file")
    device = cli.resolve_device(parser, args.device)
    if args.out is not None:
        cli.check_out(parser, args.out)
        if (Path(args.out) / RESULT_NAME).exists() and not args.overwrite:   # an earlier search's rows
            parser.error(f"--out: {str(Path(args.out) / RESULT_NAME)!r} holds an earlier search; pass --overwrite "
                         f"to replace it, or choose another --out")

    try:
        preset, available = checkpoint_info(args.ckpt)
    except CheckpointError as error:
        parser.error(f"--ckpt: {error}")
    defaults = sampling_defaults(preset)
    try:
        # Default: the EMA full.sample would pick (the preset's best if the run kept it, else the nearest kept).
        emas = tuple(normalize_ema(ema) for ema in args.emas) if args.emas else (choose_ema(preset, available),)
    except ValueError:
        parser.error(f"--emas: each must be a half-life in kimg or 'raw', got {args.emas}")
    missing = [ema for ema in emas if ema != "raw" and ema not in available]
    if missing:   # checked up front, not after hours of searching the other EMAs
        parser.error(f"--emas: the checkpoint has no EMA {missing}; available (half-life kimg): {available} or 'raw'")
    checkpoint = load_checkpoint(args.ckpt, mmap=True)   # up front too: a diverged EMA fails now, not mid-search
    for ema in emas:
        bad = first_non_finite(checkpoint["model"] if ema == "raw" else checkpoint["ema"][ema])
        if bad is not None:
            parser.error(f"--ckpt: {args.ckpt!r}: the {'raw weights' if ema == 'raw' else f'EMA {ema}'} hold NaN "
                         f"or inf (tensor {bad!r}): the run diverged; use an earlier checkpoint")
    del checkpoint
    intervals = tuple(args.intervals) if args.intervals else ((defaults["t_min"], defaults["t_max"]),)
    try:
        ref_mu, ref_sigma = load_statistics(args.ref, dim=POOL_DIM)
    except ValueError as error:
        parser.error(f"--ref: {error}")
    try:
        extractor = build_inception(args.inception_weights, device)
    except FileNotFoundError as error:   # the message names the weights file and where to put it
        parser.error(f"--inception-weights: {error}")
    except InceptionWeightsError as error:
        parser.error(str(error))

    cfg = SearchConfig(omegas=tuple(args.omegas), intervals=intervals, emas=emas, num=args.num,
                       seed=args.seed, batch_size=args.batch_size, is_splits=args.is_splits,
                       progress=not args.no_progress)
    rows: list[dict] = []
    table = sys.stderr if args.json else sys.stdout   # with --json, stdout holds the JSON only
    print(TABLE_HEADER, file=table, flush=True)

    def record() -> dict:
        return {"ckpt": args.ckpt, "ref": args.ref, "num": args.num, "seed": args.seed, "rows": rows}

    def on_row(row: dict) -> None:
        rows.append(row)
        print(format_row(row), file=table, flush=True)
        if args.out:
            write_json(Path(args.out) / RESULT_NAME, record())

    try:
        search(lambda ema: load_for_sampling(args.ckpt, ema, device)[0], extractor, ref_mu, ref_sigma, cfg,
               on_row=on_row)
    except (CheckpointError, NonFiniteSamplesError) as error:   # finished rows are saved already
        parser.error(f"--ckpt: {error}")
    except OSError as error:   # writing --out failed (a full disk): the printed rows above are the record
        where = error.filename or (Path(args.out) / RESULT_NAME if args.out else "a file")
        print(f"{parser.prog}: error: writing {str(where)!r} failed: {error.strerror or error}; the rows printed "
              f"above are the record", file=sys.stderr)
        sys.exit(1)
    print("\n" + format_table(rows), file=table)
    if args.json:   # strict JSON: a NaN metric is null, never a bare NaN token
        print(json.dumps(finite_or_null(record()), indent=2, allow_nan=False))


if __name__ == "__main__":
    main()
