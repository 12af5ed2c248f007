"""``python -m toy``: the pMF Fig. 2 sweep, x- vs u-prediction as the observation dimension D grows.

Default: D in {2, 8, 16, 512} x {x, u} on a Swiss roll, on the CPU, into runs/toy/.
"""
from __future__ import annotations

import argparse
import os
import time
import warnings

import torch

from .data import DATASETS
from .model import DEPTH, PREDICTIONS, WIDTH
from .sweep import DEFAULT_BATCH_SIZE, DEFAULT_DIMS, DEFAULT_LR, DEFAULT_STEPS, run_sweep, write_outputs
from .train import EVAL_SAMPLES, TANGENTS, TIME_MEAN, TIME_STD


class _OneLineErrorParser(argparse.ArgumentParser):
    """Bad flags print one line (``python -m toy: error: ...``), not the whole usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineErrorParser(
        prog="python -m toy",
        description="Train a ReLU MLP on a 2-D dataset embedded in R^D by a random orthonormal P, with the "
                    "same pMF velocity loss, predicting x (pMF) or u (iMF); report 1-NFE sample quality per D "
                    "(pMF paper Fig. 2). Writes metrics.json, samples.png, loss_curves.png and table.md.")
    parser.add_argument("--dims", type=int, nargs="+", default=list(DEFAULT_DIMS), metavar="D",
                        help="observation dimensions D >= 2 (default: %(default)s; "
                             "a wider sweep: 2 8 16 32 64 128 256 512 1024)")
    parser.add_argument("--predictions", nargs="+", choices=PREDICTIONS, default=list(PREDICTIONS),
                        help="network output: x = denoised point (pMF), u = average velocity (iMF) (default: x u)")
    parser.add_argument("--dataset", choices=DATASETS, default=DATASETS[0],
                        help="2-D data distribution, normalised to mean 0 and unit RMS (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                        help="Adam steps per run, each on a fresh batch (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                        help="fresh data points per step (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=DEFAULT_LR,
                        help="Adam learning rate, constant, > 0 (default: %(default)s)")
    parser.add_argument("--seed", "--seeds", dest="seeds", type=int, nargs="+", default=[0], metavar="SEED",
                        help="one or more seeds; each seeds P, the init, the data and the evaluation noise; "
                             "with several the table gives mean +- std (default: 0)")
    parser.add_argument("--out", default="runs/toy", help="output folder (default: %(default)s)")
    parser.add_argument("--tangent", choices=TANGENTS, default=TANGENTS[0],
                        help="JVP tangent for z: 'model' = sg(u(z_t, t, t)) (pMF Alg. 1), 'conditional' = e - x "
                             "(original MeanFlow) (default: %(default)s)")
    parser.add_argument("--time-mean", type=float, default=TIME_MEAN,
                        help="mean of the logit-normal t, r sampler (default: %(default)s; pMF ImageNet: 0.8)")
    parser.add_argument("--time-std", type=float, default=TIME_STD,
                        help="std of the logit-normal t, r sampler, > 0 (default: %(default)s; pMF ImageNet: 0.8)")
    parser.add_argument("--width", type=int, default=WIDTH,
                        help="hidden width of the MLP (default: %(default)s, as in pMF)")
    parser.add_argument("--depth", type=int, default=DEPTH,
                        help="Linear layers of the MLP, >= 2 (default: %(default)s, as in pMF)")
    parser.add_argument("--eval-samples", type=int, default=EVAL_SAMPLES,
                        help="1-NFE samples (and fresh data samples) compared by the metrics; the swd noise floor "
                             "grows as this shrinks (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="runs trained at once, each in its own process on one CPU thread; 1 = one process "
                             "using all threads (default: %(default)s = min(2, CPU count); use 1 with --device cuda)")
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bars")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    if min(args.dims) < 2:
        parser.error(f"--dims: every D must be >= 2 (the data are 2-D), got {min(args.dims)}")
    for name, value, low in (("--steps", args.steps, 1), ("--batch-size", args.batch_size, 2),
                             ("--width", args.width, 1), ("--depth", args.depth, 2),
                             ("--eval-samples", args.eval_samples, 2), ("--workers", args.workers, 1)):
        if value < low:
            parser.error(f"{name} must be >= {low}, got {value}")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    if not args.time_std > 0:
        parser.error(f"--time-std must be > 0, got {args.time_std}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device: unknown device {args.device!r} (use cpu, cuda or cuda:N)")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device: cuda requested but torch.cuda.is_available() is False")

    # torch's first forward-mode AD call loads decompositions through the deprecated torch.jit.script
    # and warns; the warning is torch's, not this program's, and would cut through the progress bars.
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=FutureWarning)
    start = time.time()
    runs = run_sweep(dims=args.dims, predictions=args.predictions, dataset=args.dataset, steps=args.steps,
                     batch_size=args.batch_size, lr=args.lr, seeds=args.seeds, tangent=args.tangent,
                     time_mean=args.time_mean, time_std=args.time_std, depth=args.depth, width=args.width,
                     eval_samples=args.eval_samples, device=args.device, progress=not args.no_progress,
                     workers=args.workers)
    paths = write_outputs(runs, args.out)
    print(paths["table"].read_text(), end="")
    print(f"\n{len(runs)} runs in {time.time() - start:.0f} s ({args.workers} process(es)).")
    print(f"figure (paper Fig. 2 layout): {paths['samples']}")
    print(f"loss curves:                  {paths['losses']}")
    print(f"table:                        {paths['table']}")
    print(f"metrics:                      {paths['metrics']}")


if __name__ == "__main__":
    main()
