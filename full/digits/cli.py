"""The paper's ablations on real images in minutes: pMF on scikit-learn's 8x8 digits, upsampled.

    python -m full.digits prediction          # (a) x- vs u-prediction as the patch dimension grows
    python -m full.digits optimizer           # (b) Muon vs Adam
    python -m full.digits sampler             # (c) full plane vs r = t only vs r = 0 only vs both lines
    python -m full.digits guidance            # (d) omega = 1 vs the trained-in guidance
    python -m full.digits snr                 # (e) diagnostic: (a)'s 64 px arms at noise scale 4
    python -m full.digits all --quick         # every experiment, tiny budget (< 3 min on 2 cores)

Each experiment trains the tiny ViT preset with the unchanged trainer (``full.train.train``: same loss,
time sampler, optimiser, EMA and trained-in guidance), draws 50 one-step samples per class, and scores
them with a small digits CNN trained deterministically on the training split (cached): the Fréchet
distance of its features, its accuracy on the class each sample was asked for, and the pixel energy
outside the span of upsampled digits. The same numbers on the 500 held-out real digits are the floor.
Outputs in ``--out``: ``<experiment>.json``, ``<experiment>.png`` (sample grids + bars), ``<experiment>.md``
(table beside the paper's numbers), and the cached arms under ``runs/``.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import cli
from ..io import write_json, write_text
from .classifier import CACHE_NAME, load_or_train_classifier
from .data import TRAIN_SIZE
from .experiments import EXPERIMENTS, PAPER_NUMBERS, experiment_arms
from .metrics import DigitsEvaluator
from .report import markdown_table, save_figure
from .runs import Budget, run_arm
from ..train import EXIT_DIVERGED, DivergenceError

# Default budget: each experiment fits 30 min on an idle 2-core CPU (the largest, "prediction", has six arms).
DEFAULT_STEPS = 600
DEFAULT_BATCH = 32
DEFAULT_LR = 1e-3       # pMF's constant lr
DEFAULT_PER_CLASS = 50  # 500 samples, as many as the held-out floor set
QUICK_STEPS = 4
QUICK_BATCH = 8
QUICK_PER_CLASS = 5
SEED_LIMIT = 2 ** 31    # seeds lie in [0, 2^31), as in full.guidance_search: offsets added to it stay in range
EMA_KIMG = 2000.0       # B/16's sampling EMA; ramp-limited to 5% of the images seen in runs this short
SAMPLE_INTERVAL = (0.1, 0.7)   # B/16's best guidance interval (the tiny preset's default)
FIGURE_OMEGAS = (1.0, 2.0, 4.5, 8.5)   # grids shown for the guided arm of experiment (d)


@dataclass(frozen=True)
class DigitsConfig:
    experiments: tuple[str, ...]
    budget: Budget
    out: str
    threads: int
    progress: bool
    fresh: bool
    report_only: bool = False



def run_experiment(name: str, cfg: DigitsConfig, evaluator: DigitsEvaluator) -> dict:
    """Train / load every arm of ``name``, then write its JSON, table and figure; returns the summary."""
    out = Path(cfg.out)
    arms = experiment_arms(name)
    start = time.perf_counter()
    results, missing = [], []
    for label, spec in arms:
        print(f"[{name}] {label}", flush=True)
        result = run_arm(spec, cfg.budget, evaluator, out=out, sample_interval=SAMPLE_INTERVAL,
                         progress=cfg.progress, fresh=cfg.fresh, report_only=cfg.report_only)
        if result is None:
            missing.append(label)
        else:
            results.append((label, spec, result))
    if not results:
        print(f"python -m full.digits: error: --report-only: no arm of {name} is cached under {out} "
              f"(drop --report-only to train them)", file=sys.stderr)
        raise SystemExit(2)
    floor = evaluator.floor(arms[0][1].resolution)   # identical at every resolution (exact round trip)
    rows = [{"label": label, "omega": float(omega), "weights": "ema",
             "metrics": result["metrics"]["ema"][str(float(omega))],
             "raw_metrics": result["metrics"]["raw"][str(float(omega))],
             "final_raw_u": result["final_raw_u"], "train_seconds": result["train_seconds"], "key": result["key"]}
            for label, spec, result in results for omega in spec.omegas]
    if name == "guidance":
        label, _, guided = results[0]
        panels = [(f"{label}, omega {omega:g}", guided["grid"][str(omega)]) for omega in FIGURE_OMEGAS
                  if str(omega) in guided["grid"]]
        panels += [(f"{label}, omega 1", result["grid"]["1.0"]) for label, _, result in results[1:]]
    else:
        panels = [(f"{label}, omega 1", result["grid"]["1.0"]) for label, _, result in results]
    summary = {"experiment": name, "budget": asdict(cfg.budget), "floor": floor, "rows": rows,
               "loss_curves": {label: result["loss_curve"] for label, _, result in results},
               "paper": PAPER_NUMBERS[name], "missing_arms": missing, "seconds": time.perf_counter() - start}
    table = markdown_table(name, rows, floor, PAPER_NUMBERS[name])
    if missing:
        table += f"\nNot trained (run without --report-only to train): {'; '.join(missing)}.\n"
    write_json(out / f"{name}.json", summary)
    write_text(out / f"{name}.md", table)
    save_figure(out / f"{name}.png", f"digits: {name} ({cfg.budget.steps} steps x {cfg.budget.batch_size})",
                panels, rows, floor)
    print(table, flush=True)
    return summary


def run(cfg: DigitsConfig) -> dict[str, dict]:
    torch.set_num_threads(cfg.threads)
    evaluator = DigitsEvaluator(load_or_train_classifier(cfg.out))
    return {name: run_experiment(name, cfg, evaluator) for name in cfg.experiments}


def main(argv: list[str] | None = None) -> dict[str, dict]:
    parser = cli.Parser("python -m full.digits", __doc__.split("\n\n")[0])
    parser.add_argument("experiment", choices=(*EXPERIMENTS, "all"),
                        help="prediction: (a) x vs u at growing patch dim; optimizer: (b) Muon vs Adam; "
                             "sampler: (c) (r, t) sampler ablation; guidance: (d) omega sweep; "
                             "snr: (e) diagnostic, (a)'s 64 px arms at noise scale 4 (the 16 px signal-to-noise "
                             "ratio); all: every one")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny budget for smoke tests ({QUICK_STEPS} steps of {QUICK_BATCH}, "
                             f"{QUICK_PER_CLASS} samples per class); overrides --steps/--batch-size/--per-class")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="training steps per arm")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="training batch size")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR, help="constant learning rate (Muon and Adam)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of weights, data order and training noise, in [0, 2^31) (default: 0)")
    parser.add_argument("--per-class", type=int, default=DEFAULT_PER_CLASS,
                        help="one-step samples per class scored per arm and omega (floor set: 50 per class)")
    cli.add_out(parser, "runs/digits", "<experiment>.json, .md (table) and .png (figure), the cached classifier "
                                       f"{CACHE_NAME} and the cached arms under runs/")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="training precision (full.train --precision): fp32, or bf16 autocast of every pass, "
                             "the JVP's included (default: fp32)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--fresh", action="store_true", help="retrain arms even if a cached result exists")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: tabulate the arms already cached under --out (missing arms are listed)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.per_class = QUICK_STEPS, QUICK_BATCH, QUICK_PER_CLASS
    for flag, value, minimum in (("--steps", args.steps, 1), ("--batch-size", args.batch_size, 1),
                                 ("--per-class", args.per_class, 2), ("--threads", args.threads, 1)):
        if value < minimum:
            parser.error(f"{flag} must be >= {minimum}, got {value}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        parser.error(f"--lr must be a finite number > 0, got {args.lr}")
    if not 0 <= args.seed < SEED_LIMIT:
        parser.error(f"--seed must lie in [0, 2^31), got {args.seed}")
    if args.batch_size > TRAIN_SIZE:   # a batch larger than the data would never be drawn
        parser.error(f"--batch-size {args.batch_size} exceeds the {TRAIN_SIZE} training digits")
    cli.check_out(parser, args.out)
    experiments = EXPERIMENTS if args.experiment == "all" else (args.experiment,)
    budget = Budget(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                    per_class=args.per_class, ema_kimg=EMA_KIMG, precision=args.precision)
    try:
        return run(DigitsConfig(experiments=experiments, budget=budget, out=args.out, threads=args.threads,
                                progress=not args.no_progress, fresh=args.fresh, report_only=args.report_only))
    except DivergenceError as error:   # nothing of the diverged arm is cached; the finished arms are
        print(f"python -m full.digits: error: {error}", file=sys.stderr)
        raise SystemExit(EXIT_DIVERGED) from None

