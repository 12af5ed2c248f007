"""The sweep D x {x, u} (x seeds): train every run, write metrics.json, the figures and the table."""
from __future__ import annotations

import json
import multiprocessing
import os
import statistics
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import torch
from tqdm.auto import tqdm

from .data import DATASETS, sample_2d
from .metrics import energy_distance, sliced_wasserstein
from .model import DEPTH, PREDICTIONS, WIDTH
from .plots import plot_grid, plot_losses
from .train import EVAL_SAMPLES, TIME_MEAN, TIME_STD, ToyConfig, ToyRun, train

DEFAULT_DIMS = (2, 8, 16, 512)      # pMF Fig. 2
DEFAULT_STEPS = 2000
DEFAULT_BATCH_SIZE = 512
DEFAULT_LR = 1e-3
METRICS = ("swd", "energy", "off_manifold", "final_loss")
FLOOR_SEEDS = (7, 8)  # two independent data samples: the metrics' value for a perfect model
FILES = {"metrics": "metrics.json", "samples": "samples.png", "losses": "loss_curves.png", "table": "table.md"}


def reference_floor(dataset: str, samples: int = EVAL_SAMPLES) -> dict[str, float]:
    """swd and energy between two independent data samples of the evaluation size: the value a
    perfect model would get (sampling noise of the metrics)."""
    a = sample_2d(dataset, samples, seed=FLOOR_SEEDS[0])
    b = sample_2d(dataset, samples, seed=FLOOR_SEEDS[1])
    return {"swd": sliced_wasserstein(a, b), "energy": energy_distance(a, b)}


def _write_text(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def format_table(records: Sequence[dict], *, floor: dict[str, float] | None = None) -> str:
    """Markdown table, one row per (prediction, D): each metric's mean (and +- std over seeds)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for record in records:
        groups.setdefault((record["prediction"], record["dim"]), []).append(record)
    lines = ["| prediction | D | seeds | swd | energy | off_manifold | final_loss |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for (prediction, dim), rows in sorted(groups.items(), key=lambda item: (item[0][0] != "x", item[0][1])):
        cells = []
        for metric in METRICS:
            values = [row[metric] for row in rows]
            mean = statistics.fmean(values)
            cells.append(f"{mean:.4g}" if len(values) == 1 else f"{mean:.4g} ± {statistics.stdev(values):.2g}")
        lines.append(f"| {prediction} | {dim} | {len(rows)} | " + " | ".join(cells) + " |")
    if floor is not None:
        lines.append(f"| data vs data | - | - | {floor['swd']:.4g} | {floor['energy']:.4g} | 0 | - |")
    return "\n".join(lines) + "\n"


def run_sweep(*, dims: Sequence[int] = DEFAULT_DIMS, predictions: Sequence[str] = PREDICTIONS,
              dataset: str = "swiss_roll", steps: int = DEFAULT_STEPS, batch_size: int = DEFAULT_BATCH_SIZE,
              lr: float = DEFAULT_LR, seeds: Sequence[int] = (0,), tangent: str = "model",
              time_mean: float = TIME_MEAN, time_std: float = TIME_STD, depth: int = DEPTH, width: int = WIDTH,
              eval_samples: int = EVAL_SAMPLES, device: str = "cpu", out: str | os.PathLike | None = None,
              progress: bool = True, workers: int = 1) -> list[ToyRun]:
    """Train one model per (seed, D, prediction) and evaluate its 1-NFE samples.

    Args: the sweep's axes (dims, predictions, seeds) and the settings shared by every run (see
        ``ToyConfig``). out: folder for metrics.json, samples.png, loss_curves.png and table.md
        (nothing is written when None). workers: runs trained at once in separate processes,
        each on one thread (independent runs parallelise far better than one run's small matmuls).
    Returns:
        the runs, each a ``ToyRun`` whose ``record`` is one metrics.json row.
    """
    if any(dim < 2 for dim in dims):
        raise ValueError(f"dims must all be >= 2, got {list(dims)}")
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}; got {dataset!r}")
    configs = [ToyConfig(dataset=dataset, dim=dim, prediction=prediction, steps=steps, batch_size=batch_size,
                         lr=lr, seed=seed, tangent=tangent, time_mean=time_mean, time_std=time_std,
                         depth=depth, width=width, eval_samples=eval_samples, device=device)
               for seed in seeds for dim in dims for prediction in predictions]
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers == 1:
        runs = [train(config, progress=progress)
                for config in tqdm(configs, desc="toy sweep", disable=not progress, dynamic_ncols=True)]
    else:
        runs = _run_parallel(configs, workers, progress)
    if out is not None:
        write_outputs(runs, out)
    return runs


def _train_one_thread(config: ToyConfig) -> ToyRun:
    torch.set_num_threads(1)
    # torch's own deprecation warning on the first forward-mode AD call; not ours to fix.
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=FutureWarning)
    return train(config, progress=False)


def _run_parallel(configs: list[ToyConfig], workers: int, progress: bool) -> list[ToyRun]:
    """Train the runs in a process pool; each run seeds itself, so results do not depend on workers."""
    # Largest D first: the slowest runs start early and the pool stays busy to the end.
    order = sorted(range(len(configs)), key=lambda i: -configs[i].dim)
    runs: list[ToyRun | None] = [None] * len(configs)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        futures = {pool.submit(_train_one_thread, configs[i]): i for i in order}
        bar = tqdm(total=len(configs), desc=f"toy sweep ({workers} processes)", disable=not progress,
                   dynamic_ncols=True)
        for future in as_completed(futures):
            run = future.result()
            runs[futures[future]] = run
            bar.set_postfix_str(f"done {run.config.prediction}-pred D={run.config.dim} swd={run.record['swd']:.3f}")
            bar.update()
        bar.close()
    return runs


def write_outputs(runs: Sequence[ToyRun], out: str | os.PathLike) -> dict[str, Path]:
    """Write metrics.json, the two figures and table.md into ``out``; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / filename for name, filename in FILES.items()}
    records = [run.record for run in runs]
    _write_text(paths["metrics"], json.dumps(records, indent=2) + "\n")
    for plot, name in ((plot_grid, "samples"), (plot_losses, "losses")):
        figure = plot(runs, path=paths[name])
        plt.close(figure)
    floor = reference_floor(records[0]["dataset"], len(runs[0].samples_2d))
    _write_text(paths["table"], format_table(records, floor=floor))
    return paths
