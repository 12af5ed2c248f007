"""``python -m toy``: the pMF Fig. 2 sweep, x- vs u-prediction as the observation dimension D grows.

Default: D in {2, 8, 16, 512} x {x, u} on a Swiss roll, on the CPU, into runs/toy/.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings

from full import cli

from .data import DATASETS
from .model import PREDICTIONS
from .sweep import DEFAULT_DIMS, DEFAULT_RECIPE, check_out, run_sweep, sweep_configs
from .train import COMPUTE_DTYPES, LR_SCHEDULES, TANGENTS, ToyDivergenceError

R = DEFAULT_RECIPE
MAX_LR = 1.0
# Adam moves every weight by about lr per step; above 1 a single step outweighs the weights themselves
# (the recipe's lr is 2e-3). Measured, D = 8, u-prediction, 200 steps: lr 1e3 gives NaN at step 2,
# lr 10 inf at step 2 (both stopped by the divergence guard), lr 0.1-1 a raw loss of 4e4-9e25 and a
# collapsed model.
EXIT_DIVERGED = 3   # as full.train


def _parser() -> argparse.ArgumentParser:
    parser = cli.Parser(
        prog="python -m toy",
        description="Train a ReLU MLP on a 2-D dataset embedded in R^D by a random orthonormal P, with the\n"
                    "same pMF velocity loss, predicting x (pMF) or u (iMF); report 1-NFE sample quality per D\n"
                    "(pMF paper Fig. 2). Writes metrics.json, samples.png, loss_curves.png and table.md.")
    parser.add_argument("--dims", type=int, nargs="+", default=list(DEFAULT_DIMS), metavar="D",
                        help="observation dimensions D >= 2 (default: %(default)s; "
                             "a wider sweep: 2 8 16 32 64 128 256 512 1024)")
    parser.add_argument("--predictions", nargs="+", choices=PREDICTIONS, default=list(PREDICTIONS),
                        help="network output: x = denoised point (pMF), u = average velocity (iMF) (default: x u)")
    parser.add_argument("--dataset", choices=DATASETS, default=R.dataset,
                        help="2-D data distribution, normalised to mean 0 and unit RMS (default: %(default)s)")
    parser.add_argument("--seed", "--seeds", dest="seeds", type=int, nargs="+", default=[R.seed], metavar="SEED",
                        help="one or more seeds; each seeds P, the init, the data and the evaluation noise; "
                             "with several the table gives mean +- std (default: 0)")
    cli.add_out(parser, "runs/toy", "metrics.json, samples.png, loss_curves.png and table.md (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the files of an earlier run in --out (without it such a folder is refused)")
    recipe = parser.add_argument_group("training recipe (the defaults are toy.DEFAULT_RECIPE)")
    recipe.add_argument("--steps", type=int, default=R.steps,
                        help="Adam steps per run, each on a fresh batch (default: %(default)s)")
    recipe.add_argument("--batch-size", type=int, default=R.batch_size,
                        help="fresh data points per step (default: %(default)s)")
    recipe.add_argument("--lr", type=float, default=R.lr,
                        help=f"Adam's peak learning rate, in (0, {MAX_LR:g}]; a run whose loss becomes NaN or inf "
                             f"stops the sweep (exit {EXIT_DIVERGED}) (default: %(default)s)")
    recipe.add_argument("--warmup-steps", type=int, default=R.warmup_steps,
                        help="the lr rises linearly from lr / N to lr over the first N steps; 0 = no warm-up "
                             "(default: %(default)s)")
    recipe.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=R.lr_schedule,
                        help="lr over the run: constant, or decayed to 0 at the last step by a half cosine or "
                             "linearly (default: %(default)s)")
    recipe.add_argument("--tangent", choices=TANGENTS, default=R.tangent,
                        help="JVP tangent for z: 'model' = sg(u(z_t, t, t)) (pMF Alg. 1), 'conditional' = e - x "
                             "(original MeanFlow) (default: %(default)s)")
    recipe.add_argument("--adaptive-power", type=float, default=R.adaptive_power,
                        help="p of the loss's adaptive weight L / sg(L + c)^p, >= 0: pMF uses 1, 0 is the plain "
                             "squared error; lower p spreads mass more faithfully but samples less sharply "
                             "(README toy section) (default: %(default)s)")
    recipe.add_argument("--uniform-fraction", type=float, default=R.uniform_fraction,
                        help="share of rows with (t, r) from U(0, 1)^2, the rest logit-normal, in [0, 1] "
                             "(default: %(default)s; pMF ImageNet: 0, pMF-H: 0.1)")
    recipe.add_argument("--time-mean", type=float, default=R.time_mean,
                        help="mean of the logit-normal t, r of the other rows (default: %(default)s; "
                             "pMF ImageNet: 0.8)")
    recipe.add_argument("--time-std", type=float, default=R.time_std,
                        help="std of that logit-normal, > 0 (default: %(default)s; pMF ImageNet: 0.8)")
    recipe.add_argument("--equal-fraction", type=float, default=R.equal_fraction,
                        help="share of rows with r = t, in [0, 1] (default: %(default)s, as in pMF)")
    recipe.add_argument("--corner-fraction", type=float, default=R.corner_fraction,
                        help="share of rows set to (r, t) = (0, 1), the point one-step sampling evaluates, in [0, 1] "
                             "(default: %(default)s)")
    recipe.add_argument("--width", type=int, default=R.width,
                        help="hidden width of the MLP (default: %(default)s, as in pMF)")
    recipe.add_argument("--depth", type=int, default=R.depth,
                        help="Linear layers of the MLP, >= 2 (default: %(default)s, as in pMF)")
    recipe.add_argument("--ema-decay", type=float, default=R.ema_decay,
                        help="EMA of the weights that draws the samples, in [0, 1); 0 = raw weights "
                             "(default: %(default)s)")
    recipe.add_argument("--compute-dtype", choices=COMPUTE_DTYPES, default=R.compute_dtype,
                        help="matmul precision of the training step: auto = bfloat16 autocast on a CPU with "
                             "native bf16 matmuls (AMX or AVX512-BF16), else float32; weights, EMA and "
                             "evaluation stay float32 (default: %(default)s)")
    parser.add_argument("--eval-samples", type=int, default=R.eval_samples,
                        help="1-NFE samples (and fresh data samples) compared by the metrics; the metrics' floors "
                             "grow as this shrinks (default: %(default)s)")
    cli.add_device(parser, default=R.device)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="runs trained at once, each in its own process on one CPU thread; 1 = one process "
                             "using all threads (default: %(default)s = min(2, CPU count); use 1 with --device cuda)")
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bars")
    return parser


def _check(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every user error ends here in one line and exit 2, before any training."""
    for name, values in (("--dims", args.dims), ("--seeds", args.seeds), ("--predictions", args.predictions)):
        repeated = sorted({value for value in values if values.count(value) > 1})
        if repeated:
            parser.error(f"{name}: each value once, got {' '.join(map(str, repeated))} more than once")
    if min(args.dims) < 2:
        parser.error(f"--dims: every D must be >= 2 (the data are 2-D), got {min(args.dims)}")
    for name, value, low in (("--steps", args.steps, 1), ("--batch-size", args.batch_size, 2),
                             ("--width", args.width, 1), ("--depth", args.depth, 2),
                             ("--eval-samples", args.eval_samples, 2), ("--workers", args.workers, 1),
                             ("--warmup-steps", args.warmup_steps, 0)):
        if value < low:
            parser.error(f"{name} must be >= {low}, got {value}")
    finite = {name: math.isfinite(value) for name, value in (
        ("--lr", args.lr), ("--time-mean", args.time_mean), ("--time-std", args.time_std),
        ("--adaptive-power", args.adaptive_power))}
    for name, value, ok, expected in (
            ("--lr", args.lr, finite["--lr"] and 0 < args.lr <= MAX_LR, f"a number in (0, {MAX_LR:g}]"),
            ("--time-mean", args.time_mean, finite["--time-mean"], "a finite number"),
            ("--time-std", args.time_std, finite["--time-std"] and args.time_std > 0, "a finite number > 0"),
            ("--uniform-fraction", args.uniform_fraction, 0 <= args.uniform_fraction <= 1, "in [0, 1]"),
            ("--equal-fraction", args.equal_fraction, 0 <= args.equal_fraction <= 1, "in [0, 1]"),
            ("--corner-fraction", args.corner_fraction, 0 <= args.corner_fraction <= 1, "in [0, 1]"),
            ("--ema-decay", args.ema_decay, 0 <= args.ema_decay < 1, "in [0, 1)"),
            ("--adaptive-power", args.adaptive_power, finite["--adaptive-power"] and args.adaptive_power >= 0,
             "a finite number >= 0")):
        if not ok:   # also catches nan, which fails every comparison
            parser.error(f"{name} must be {expected}, got {value}")
    args.device = str(cli.resolve_device(parser, args.device))
    try:
        check_out(args.out, overwrite=args.overwrite)
    except (ValueError, FileExistsError) as error:
        parser.error(f"--out: {error}")


def _recipe_overrides(args: argparse.Namespace) -> dict:
    return dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                lr_schedule=args.lr_schedule,
                tangent=args.tangent, adaptive_power=args.adaptive_power, uniform_fraction=args.uniform_fraction,
                time_mean=args.time_mean, time_std=args.time_std, equal_fraction=args.equal_fraction,
                corner_fraction=args.corner_fraction, depth=args.depth, width=args.width, ema_decay=args.ema_decay,
                compute_dtype=args.compute_dtype, eval_samples=args.eval_samples, device=args.device)


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    _check(parser, args)
    overrides = _recipe_overrides(args)
    try:   # every value is valid before the first run starts
        sweep_configs(dims=args.dims, predictions=args.predictions, seeds=args.seeds, dataset=args.dataset,
                      **overrides)
    except ValueError as error:
        parser.error(str(error))

    # torch's first forward-mode AD call loads decompositions through the deprecated torch.jit.script
    # and warns; the warning is torch's, not this program's, and would cut through the progress bars.
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=FutureWarning)
    start = time.time()
    try:
        runs = run_sweep(dims=args.dims, predictions=args.predictions, seeds=args.seeds, dataset=args.dataset,
                         out=args.out, overwrite=args.overwrite, progress=not args.no_progress,
                         workers=args.workers, **overrides)
    except ToyDivergenceError as error:   # nothing was written: the outputs come after the last run
        print(f"{parser.prog}: error: {error}; nothing was written to {args.out}", file=sys.stderr)
        sys.exit(EXIT_DIVERGED)
    except (MemoryError, RuntimeError) as error:   # torch's CPU allocator raises a RuntimeError when it runs out
        if not isinstance(error, MemoryError) and "allocate memory" not in str(error):
            raise
        print(f"{parser.prog}: error: out of memory: --dims {max(args.dims)}, --width {args.width}, --batch-size "
              f"{args.batch_size} need more memory than this machine has (lower them); nothing was written to "
              f"{args.out}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted (Ctrl-C); nothing was written to {args.out}", file=sys.stderr)
        sys.exit(cli.EXIT_INTERRUPTED)
    except OSError as error:   # writing the outputs (a full disk): each file is whole or absent (full.io)
        print(f"{parser.prog}: error: writing {error.filename or args.out!r} failed: {error.strerror or error}",
              file=sys.stderr)
        sys.exit(1)
    wall = time.time() - start
    out = args.out
    print(open(os.path.join(out, "table.md")).read(), end="")
    cpu = [run.cpu_seconds for run in runs]
    print(f"\n{len(runs)} runs in {wall:.0f} s wall ({args.workers} process(es)); training CPU time per run "
          f"{min(cpu):.0f}-{max(cpu):.0f} s, {sum(cpu):.0f} s in all.")
    for name, filename in (("figure (paper Fig. 2 layout)", "samples.png"), ("loss curves", "loss_curves.png"),
                           ("table", "table.md"), ("metrics", "metrics.json")):
        print(f"{name + ':':30s}{os.path.join(out, filename)}")


if __name__ == "__main__":
    main()
