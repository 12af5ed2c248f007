"""The sweep D x {x, u} (x seeds): train every run, write metrics.json, the figures and the table."""
from __future__ import annotations

import dataclasses
import multiprocessing
import os
import signal
import statistics
import sys
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import torch
from tqdm.auto import tqdm

from full.io import unwritable_reason, write_json, write_text

from .model import PREDICTIONS
from .plots import plot_grid, plot_losses, save_figure
from .train import ToyConfig, ToyRun, train

DEFAULT_DIMS = (2, 8, 16, 512)      # pMF Fig. 2
DEFAULT_RECIPE = ToyConfig()
"""The recipe of ``make demo`` (every run of a sweep shares it; only dataset, D, prediction and seed vary)."""
METRICS = ("swd", "energy", "precision", "coverage", "off_manifold", "final_loss")
FLOORED = ("swd", "energy", "precision", "coverage")   # metrics whose records carry a data-vs-data floor
FILES = {"metrics": "metrics.json", "samples": "samples.png", "losses": "loss_curves.png", "table": "table.md"}


def check_out(out: str | os.PathLike, *, overwrite: bool) -> None:
    """Fail before any training if ``out`` cannot be written, or already holds a sweep's files (unless overwrite).

    Creates the folder and a probe file in it (removed again). Raises ``ValueError`` with one line.
    """
    out = Path(out)
    problem = unwritable_reason(out, folder=True)
    if problem:
        raise ValueError(problem)
    folders = [name for name in FILES.values() if (out / name).is_dir()]
    if folders:   # found now, not by a failed rename after the whole sweep
        raise ValueError(f"{str(out / folders[0])!r} is a folder; the sweep writes a file of that name")
    existing = [name for name in FILES.values() if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{str(out)!r} already holds {', '.join(existing)} of an earlier run; "
                              f"pass --overwrite (overwrite=True) to replace them, or choose another folder")


def _cell(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.4g}" if len(values) == 1 else f"{mean:.4g} ± {statistics.stdev(values):.2g}"


def format_table(records: Sequence[dict], *, floor: dict[str, float] | None = None) -> str:
    """Markdown table, one row per (prediction, D): each metric's mean (and +- std over seeds).

    precision and coverage also show their ratio to the data-vs-data floor, ``(1.8x)``. The last
    row is the floor: the mean of the records' ``*_floor`` values, or ``floor`` when given.
    """
    groups: dict[tuple[str, int], list[dict]] = {}
    for record in records:
        groups.setdefault((record["prediction"], record["dim"]), []).append(record)
    lines = ["| prediction | D | seeds | " + " | ".join(METRICS) + " |",
             "|---|---:|---:|" + "---:|" * len(METRICS)]
    for (prediction, dim), rows in sorted(groups.items(), key=lambda item: (item[0][0] != "x", item[0][1])):
        cells = []
        for metric in METRICS:
            cell = _cell([row[metric] for row in rows])
            if metric in ("precision", "coverage"):
                ratios = [row[metric] / row[f"{metric}_floor"] for row in rows]
                cell += f" ({statistics.fmean(ratios):.1f}x)"
            cells.append(cell)
        lines.append(f"| {prediction} | {dim} | {len(rows)} | " + " | ".join(cells) + " |")
    if floor is None and records and all(f"{metric}_floor" in records[0] for metric in FLOORED):
        floor = {metric: statistics.fmean(record[f"{metric}_floor"] for record in records) for metric in FLOORED}
    if floor is not None:
        cells = [f"{floor[metric]:.4g}" if metric in floor else ("0" if metric == "off_manifold" else "-")
                 for metric in METRICS]
        lines.append("| data vs data | - | - | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sweep_configs(*, dims: Sequence[int] = DEFAULT_DIMS, predictions: Sequence[str] = PREDICTIONS,
                  seeds: Sequence[int] = (0,), dataset: str = "swiss_roll", recipe: ToyConfig = DEFAULT_RECIPE,
                  **overrides) -> list[ToyConfig]:
    """One ``ToyConfig`` per (seed, D, prediction): the recipe with ``overrides`` (any ToyConfig field).

    Raises ValueError on an unknown field, a duplicate D, prediction or seed, or a bad value.
    """
    unknown = sorted(set(overrides) - {field.name for field in dataclasses.fields(ToyConfig)})
    if unknown:
        raise ValueError(f"unknown ToyConfig field(s): {', '.join(unknown)}")
    for name, axis in (("dims", dims), ("predictions", predictions), ("seeds", seeds)):
        if len(axis) == 0 or len(set(axis)) != len(axis):
            raise ValueError(f"{name} must be non-empty without repeats, got {list(axis)}")
    recipe = dataclasses.replace(recipe, dataset=dataset, **overrides)
    return [dataclasses.replace(recipe, dim=dim, prediction=prediction, seed=seed)
            for seed in seeds for dim in dims for prediction in predictions]


def run_sweep(*, dims: Sequence[int] = DEFAULT_DIMS, predictions: Sequence[str] = PREDICTIONS,
              seeds: Sequence[int] = (0,), dataset: str = "swiss_roll", recipe: ToyConfig = DEFAULT_RECIPE,
              out: str | os.PathLike | None = None, overwrite: bool = False, progress: bool = True,
              workers: int = 1, **overrides) -> list[ToyRun]:
    """Train one model per (seed, D, prediction) and evaluate its 1-NFE samples.

    Args:
        dims, predictions, seeds, dataset: the sweep's axes.
        recipe: the settings every run shares (default: ``DEFAULT_RECIPE``, the ``make demo`` recipe);
            ``overrides`` replace single fields of it, e.g. ``steps=500``.
        out: folder for metrics.json, samples.png, loss_curves.png and table.md (nothing is written
            when None); checked before any training, and files of an earlier run there are only
            replaced with ``overwrite=True``.
        workers: runs trained at once in separate processes, each on one thread (independent runs
            parallelise far better than one run's small matmuls).
    Returns:
        the runs, each a ``ToyRun`` whose ``record`` is one metrics.json row.
    """
    configs = sweep_configs(dims=dims, predictions=predictions, seeds=seeds, dataset=dataset, recipe=recipe,
                            **overrides)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if out is not None:
        check_out(out, overwrite=overwrite)
    if workers == 1:
        runs = [train(config, progress=progress)
                for config in tqdm(configs, desc="toy sweep", disable=not progress, dynamic_ncols=True)]
    else:
        runs = _run_parallel(configs, workers, progress)
    if out is not None:
        write_outputs(runs, out, overwrite=True)   # checked above; the files are this sweep's now
    return runs


PARENT_POLL_S = 1.0   # how often a pool worker checks that the sweep that started it is still alive


def exit_with_parent(parent_pid: int, *, poll_s: float = PARENT_POLL_S) -> None:
    """Pool-worker initializer: a daemon thread ends this process once ``parent_pid`` is no longer its parent.

    A sweep killed by a signal cannot shut its ProcessPoolExecutor down, and spawned workers would train on
    for minutes; with this they stop within ``poll_s`` (the orphan is re-parented, so its ppid changes).
    Workers ignore Ctrl-C (the terminal sends it to every process of the group): the parent handles it
    and ends them, so the user sees one line, not a traceback per worker.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _train_one_thread(config: ToyConfig) -> ToyRun:
    torch.set_num_threads(1)
    # torch's own deprecation warning on the first forward-mode AD call; not ours to fix.
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=FutureWarning)
    return train(config, progress=False)


RESOURCE_TRACKER_FILTER = "ignore:resource_tracker:UserWarning"


def _run_parallel(configs: list[ToyConfig], workers: int, progress: bool) -> list[ToyRun]:
    """Train the runs in a process pool; each run seeds itself, so results do not depend on workers."""
    # Largest D first: the slowest runs start early and the pool stays busy to the end.
    order = sorted(range(len(configs)), key=lambda i: -configs[i].dim)
    runs: list[ToyRun | None] = [None] * len(configs)
    context = multiprocessing.get_context("spawn")
    # Workers stopped on Ctrl-C or a diverged run leave their queue semaphores to multiprocessing's resource
    # tracker, which frees them and then warns on stderr, after our one-line message. The tracker is a separate
    # process that takes only -W options (sys.warnoptions), so its warning is silenced there.
    if RESOURCE_TRACKER_FILTER not in sys.warnoptions:
        sys.warnoptions.append(RESOURCE_TRACKER_FILTER)
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=exit_with_parent,
                             initargs=(os.getpid(),)) as pool:
        futures = {pool.submit(_train_one_thread, configs[i]): i for i in order}
        bar = tqdm(total=len(configs), desc=f"toy sweep ({workers} processes)", disable=not progress,
                   dynamic_ncols=True)
        try:
            for future in as_completed(futures):
                run = future.result()   # re-raises a worker's error (a diverged run) here
                runs[futures[future]] = run
                bar.set_postfix_str(f"done {run.config.prediction}-pred D={run.config.dim} "
                                    f"precision={run.record['precision']:.3f}")
                bar.update()
        except BaseException:   # a diverged run or Ctrl-C: stop the other runs now, not after minutes
            pool.shutdown(wait=False, cancel_futures=True)
            for child in multiprocessing.active_children():
                child.terminate()
            raise
        finally:
            bar.close()
    return runs


def write_outputs(runs: Sequence[ToyRun], out: str | os.PathLike, *, overwrite: bool = False) -> dict[str, Path]:
    """Write metrics.json, the two figures and table.md into ``out`` (each atomically); return their paths.

    Refuses (``FileExistsError``, before writing anything) if ``out`` holds any of them already,
    unless ``overwrite``.
    """
    if not runs:
        raise ValueError("write_outputs needs at least one run")
    check_out(out, overwrite=overwrite)
    out = Path(out)
    paths = {name: out / filename for name, filename in FILES.items()}
    records = [run.record for run in runs]
    write_json(paths["metrics"], records)
    for plot, name in ((plot_grid, "samples"), (plot_losses, "losses")):
        figure = plot(runs)
        save_figure(figure, paths[name])
        plt.close(figure)
    write_text(paths["table"], format_table(records))
    return paths
