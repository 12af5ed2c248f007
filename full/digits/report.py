"""Tables (markdown) and figures (sample grids + metric bars) of the digits experiments."""
from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")   # files only; no display on the benchmark machines
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

from .. import io

METRIC_LABELS = {"fd": "Fréchet distance (lower is better)", "accuracy": "class accuracy (higher is better)",
                 "off_subspace_rms": "off-subspace RMS (0 for real digits)"}


def _number(value: float | None) -> float:
    """A metric as a float: JSON files hold NaN / inf as null (full.io.write_json), read back as None."""
    return float("nan") if value is None else value


def _fmt(value: float | None, digits: int = 2) -> str:
    return f"{_number(value):.{digits}f}"


def markdown_table(experiment: str, rows: list[dict], floor: dict, paper: dict[str, str]) -> str:
    """One markdown table: a row per (arm, omega), then the held-out floor.

    Args:
        rows: dicts with "label", "omega", "weights", "metrics", "final_raw_u", "train_seconds".
        floor: metrics of the held-out real digits.  paper: the paper's number per arm label.
    """
    lines = ["| arm | omega | FD | class acc. | off-subspace RMS | final raw loss | train s | paper (FID) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        m = {name: _number(value) for name, value in row["metrics"].items()}
        lines.append(f"| {row['label']} | {row['omega']:g} | {_fmt(m['fd'])} | {_fmt(100 * m['accuracy'], 1)}% | "
                     f"{_fmt(m['off_subspace_rms'], 3)} | {_fmt(row['final_raw_u'], 1)} | "
                     f"{row['train_seconds']:.0f} | {paper.get(row['label'], '')} |")
    lines.append(f"| held-out real digits (floor) | - | {_fmt(floor['fd'])} | {_fmt(100 * floor['accuracy'], 1)}% | "
                 f"{_fmt(floor['off_subspace_rms'], 3)} | - | - | - |")
    return "\n".join(lines) + "\n"


def _tile(grid: np.ndarray) -> np.ndarray:
    """(10, k, res, res) -> one (10 res, k res) image, class per row."""
    classes, k, res, _ = grid.shape
    return grid.transpose(0, 2, 1, 3).reshape(classes * res, k * res)


def save_figure(path: Path, title: str, panels: list[tuple[str, list]], rows: list[dict], floor: dict) -> None:
    """Sample grids (one panel per arm, a row per class) above bar charts of the three metrics.

    Args:
        panels: (caption, grid (10, k, res, res) as nested lists in [-1, 1]).
        rows: as :func:`markdown_table`; one bar per row.  floor: the held-out metrics (dashed lines).
    """
    n = max(len(panels), 3)
    figure = plt.figure(figsize=(max(2.4 * n, 11.0), 7.6))
    figure.suptitle(title)
    for i, (caption, grid) in enumerate(panels):
        axis = figure.add_subplot(2, n, i + 1)
        axis.imshow(_tile(np.asarray(grid)), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
        axis.set_title(textwrap.fill(caption, 24), fontsize=7)
        axis.axis("off")
    names = [f"{row['label']} (w={row['omega']:g})" for row in rows]
    for j, metric in enumerate(METRIC_LABELS):
        axis = figure.add_subplot(2, 3, 4 + j)
        values = [_number(row["metrics"][metric]) for row in rows]
        axis.barh(range(len(values)), values, color="tab:blue")
        axis.axvline(floor[metric], color="k", linestyle="--", linewidth=1, label="held-out floor")
        axis.set_yticks(range(len(values)))
        axis.set_yticklabels(names if j == 0 else [], fontsize=6)
        axis.invert_yaxis()
        axis.set_title(METRIC_LABELS[metric], fontsize=8)
        if metric == "fd":   # FDs span 3 decades; ticks 1, 3, 10, 30, ... in plain numbers (minor labels overlap)
            axis.set_xscale("log")
            axis.xaxis.set_major_locator(LogLocator(subs=(1.0, 3.0)))
            axis.xaxis.set_major_formatter(FormatStrFormatter("%g"))
            axis.xaxis.set_minor_formatter(NullFormatter())
        axis.tick_params(labelsize=7)
        if j == 2:
            axis.legend(fontsize=6)
    # Room on the left for the bar labels (tight_layout cannot fit image panels and long labels together).
    figure.subplots_adjust(left=0.27, right=0.98, top=0.9, bottom=0.06, hspace=0.25, wspace=0.2)
    io.save_figure(figure, path, dpi=110)
    plt.close(figure)
