"""Figures of the toy sweep: the paper's Fig. 2 layout (rows x / u, columns D) and the loss curves."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import matplotlib
import matplotlib.pyplot as plt
import numpy as np

from full import io

from .data import sample_2d

DENSITY_SAMPLES = 100_000   # data points behind the grey true-density histogram
DENSITY_SEED = 424242
PLOT_LIMIT = 3.0            # the normalised datasets fit in [-2.5, 2.5]^2; failures show as blobs
SAMPLES_SHOWN = 2000        # 1-NFE samples drawn per panel (of the evaluated ones)
LOSS_SMOOTHING = 25         # moving-average window of the loss curves, in steps
ROW_LABELS = {"x": "x-prediction (pMF)", "u": "u-prediction (iMF)"}


def save_figure(figure: matplotlib.figure.Figure, path: str | os.PathLike) -> Path:
    """Write a PNG atomically (``full.io``: temp file beside it, fsync, rename)."""
    return io.save_figure(figure, path, dpi=120, bbox_inches="tight")


def _first_seed(runs: Sequence) -> dict[tuple[str, int], object]:
    """One run per (prediction, D): the lowest seed, so the grid shows a single experiment."""
    chosen: dict[tuple[str, int], object] = {}
    for run in sorted(runs, key=lambda run: run.record["seed"]):
        chosen.setdefault((run.record["prediction"], run.record["dim"]), run)
    return chosen


def _caption(record: dict) -> str:
    lines = [f"swd {record['swd']:.3f}"]
    for name in ("precision", "coverage"):
        if name in record:
            lines.append(f"{name} {record[name]:.3f} ({record[name] / record[name + '_floor']:.1f}x floor)")
    lines.append(f"off-plane {record['off_manifold']:.2g}")
    return "\n".join(lines)


def plot_grid(runs: Sequence, *, path: str | os.PathLike | None = None) -> matplotlib.figure.Figure:
    """Paper Fig. 2: 1-NFE samples (projected back by P^T, red) over the true density (grey).

    Rows: x-prediction, u-prediction (those present); columns: D, ascending. Each panel notes its
    run's sliced Wasserstein distance, its precision and coverage distances (with their ratio to
    the data-vs-data floor) and the samples' mean distance from the data plane.

    Args:
        runs: ``ToyRun`` objects of one dataset (``toy.run_sweep``'s result).
        path: if given, the PNG is written there (atomically).
    Returns:
        the matplotlib Figure (close it with ``plt.close(fig)`` when done).
    """
    if not runs:
        raise ValueError("plot_grid needs at least one run")
    chosen = _first_seed(runs)
    predictions = [p for p in ("x", "u") if any(key[0] == p for key in chosen)]
    dims = sorted({key[1] for key in chosen})
    dataset = runs[0].record["dataset"]
    density = sample_2d(dataset, DENSITY_SAMPLES, seed=DENSITY_SEED).numpy()
    bins = np.linspace(-PLOT_LIMIT, PLOT_LIMIT, 121)

    figure, axes = plt.subplots(len(predictions), len(dims), figsize=(2.6 * len(dims), 2.7 * len(predictions)),
                                squeeze=False)
    for i, prediction in enumerate(predictions):
        for j, dim in enumerate(dims):
            axis = axes[i, j]
            axis.hist2d(density[:, 0], density[:, 1], bins=bins, cmap="Greys", cmin=1)
            run = chosen.get((prediction, dim))
            if run is not None:
                shown = run.samples_2d[:SAMPLES_SHOWN]
                axis.scatter(shown[:, 0], shown[:, 1], s=1.5, color="tab:red", alpha=0.5, linewidths=0)
                axis.text(0.03, 0.03, _caption(run.record), transform=axis.transAxes, fontsize=6.5, va="bottom")
            axis.set_xlim(-PLOT_LIMIT, PLOT_LIMIT)
            axis.set_ylim(-PLOT_LIMIT, PLOT_LIMIT)
            axis.set_aspect("equal")
            axis.set_xticks([])
            axis.set_yticks([])
            if i == 0:
                axis.set_title(f"D = {dim}")
            if j == 0:
                axis.set_ylabel(ROW_LABELS[prediction])
    figure.suptitle(f"1-NFE samples, projected back by P^T ({dataset}; grey: true density)", fontsize=10)
    figure.tight_layout()
    if path is not None:
        save_figure(figure, path)
    return figure


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    window = max(1, min(window, len(values)))
    return np.convolve(values, np.ones(window) / window, mode="valid")


def plot_losses(runs: Sequence, *, path: str | os.PathLike | None = None) -> matplotlib.figure.Figure:
    """Loss curves, one panel per D: the batch mean of the raw (unweighted) loss ``||V - v_t||^2``.

    Not divided by D: off the data plane z_t determines e exactly, so a model that has learned
    the field has the same irreducible (in-plane) loss at every D; what grows with D is the error
    of a model that cannot undo the off-plane noise. A moving average of ``LOSS_SMOOTHING`` steps;
    every seed drawn.
    """
    if not runs:
        raise ValueError("plot_losses needs at least one run")
    dims = sorted({run.record["dim"] for run in runs})
    figure, axes = plt.subplots(1, len(dims), figsize=(3.0 * len(dims), 2.8), squeeze=False)
    colours = {"x": "tab:blue", "u": "tab:orange"}
    for j, dim in enumerate(dims):
        axis = axes[0, j]
        labelled: set[str] = set()
        for run in runs:
            if run.record["dim"] != dim:
                continue
            prediction = run.record["prediction"]
            curve = _smooth(run.losses, LOSS_SMOOTHING)
            axis.plot(np.arange(len(curve)) + LOSS_SMOOTHING // 2, curve, color=colours[prediction], lw=1,
                      label=None if prediction in labelled else ROW_LABELS[prediction])
            labelled.add(prediction)
        axis.set_yscale("log")
        axis.set_title(f"D = {dim}")
        axis.set_xlabel("step")
        if j == 0:
            axis.set_ylabel("raw loss ||V - v_t||^2")
            axis.legend(fontsize=7)
    figure.tight_layout()
    if path is not None:
        save_figure(figure, path)
    return figure
