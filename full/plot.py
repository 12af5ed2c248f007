"""A run's training curves in one PNG: raw loss sums, gradient norm and FID against images seen.

    python -m full.plot runs/pmf                  # writes runs/pmf/curves.png
    python -m full.plot runs/pmf --out figures       # writes figures/curves.png

Reads the run folder's ``log.jsonl`` (full.train's records) and, when present, ``fid.jsonl``
(``--fid-every``). Three panels, sharing the x-axis:

1. the raw per-image sums of squares ``raw_u`` and ``raw_v`` on a log scale -- the adaptively
   weighted terms that make up ``loss`` sit near 1 by construction and show little;
2. the gradient norm before the optimiser step (log scale);
3. FID of every evaluated EMA.

Each logged point is drawn faintly with a running geometric mean over it. After a resume the log
repeats the steps since the checkpoint; the later record of a step wins. Lines that are not records
(a write cut short by a crash, bytes that are not UTF-8, a step or images_seen that is not a number)
are skipped and counted; values that are not positive numbers are left out of their curve.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")   # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from . import cli  # noqa: E402
from .io import save_figure  # noqa: E402

LOG_FILE = "log.jsonl"
FID_FILE = "fid.jsonl"
DEFAULT_OUT = "curves.png"
LOSS_TERMS = ("raw_u", "raw_v")
PANEL_TITLES = ("raw loss (sum of squares per image)", "gradient norm", "FID")
SMOOTHING_POINTS = 25   # the running mean spans 1/25 of the logged points
FIGURE_SIZE = (7.0, 8.0)
DPI = 110


class RunLogs(NamedTuple):
    records: list[dict]       # log.jsonl, one per step, sorted by step
    fid: list[dict]           # fid.jsonl, sorted by step (empty without --fid-every)
    skipped: int              # lines that did not parse


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """(the records of a JSON-lines file, number of lines that are not records).

    A record is a UTF-8 line holding a JSON object whose ``step`` is an integer and whose
    ``images_seen`` is a finite number (the x-axis); any other line -- cut short by a crash, not
    UTF-8, another program's -- is skipped and counted. Other values are checked where they are drawn.
    """
    records, skipped = [], 0
    for raw in path.read_bytes().splitlines():
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            skipped += 1
            continue
        if (isinstance(record, dict) and isinstance(record.get("step"), int) and not isinstance(record["step"], bool)
                and _is_number(record.get("images_seen"))):
            records.append(record)
        else:
            skipped += 1
    return records, skipped


def last_per_step(records: list[dict], key: str | None = None) -> list[dict]:
    """One record per step (per ``(step, record[key])`` when ``key`` is given): the last one, sorted by step."""
    latest = {(record["step"], record.get(key) if key else None): record for record in records}
    return [latest[index] for index in sorted(latest, key=lambda pair: (pair[0], str(pair[1])))]


def read_run(run_dir: str | Path) -> RunLogs:
    """The curves of ``run_dir``. Raises FileNotFoundError without ``log.jsonl``, ValueError if it holds no record."""
    run_dir = Path(run_dir)
    log_path = run_dir / LOG_FILE
    if not log_path.is_file():
        raise FileNotFoundError(f"{str(log_path)!r} not found: is {str(run_dir)!r} a full.train output folder?")
    records, skipped = read_jsonl(log_path)
    if not records:
        raise ValueError(f"{str(log_path)!r} holds no training record yet")
    fid, fid_skipped = read_jsonl(run_dir / FID_FILE) if (run_dir / FID_FILE).is_file() else ([], 0)
    return RunLogs(last_per_step(records), last_per_step(fid, key="ema"), skipped + fid_skipped)


def running_geometric_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of log(values) over the last ``window`` points (fewer at the start), exponentiated, (N,)."""
    logs = np.log(np.clip(values, np.finfo(np.float64).tiny, None))
    sums = np.cumsum(np.concatenate([[0.0], logs]))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(0, ends - window)
    return np.exp((sums[ends] - sums[starts]) / (ends - starts))


def _series(records: list[dict], name: str) -> tuple[np.ndarray, np.ndarray]:
    """(images seen, values) of the records with a finite, positive ``name`` (a log axis needs > 0)."""
    pairs = [(record["images_seen"], record[name]) for record in records
             if _is_number(record.get(name)) and record[name] > 0]
    x, y = (np.array(column, dtype=np.float64) for column in zip(*pairs)) if pairs else (np.zeros(0), np.zeros(0))
    return x, y


def _curve(axis, x: np.ndarray, y: np.ndarray, label: str, color: str) -> None:
    if len(x) == 0:
        return
    axis.plot(x, y, color=color, alpha=0.3, linewidth=0.8)
    axis.plot(x, running_geometric_mean(y, max(1, len(y) // SMOOTHING_POINTS)), color=color, linewidth=1.6,
              label=label)


def make_figure(logs: RunLogs, title: str = "") -> plt.Figure:
    """The three panels of the module docstring (titles :data:`PANEL_TITLES`)."""
    figure, (loss_axis, grad_axis, fid_axis) = plt.subplots(3, 1, figsize=FIGURE_SIZE, sharex=True,
                                                            constrained_layout=True)
    figure.suptitle(title)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for color, name in zip(colors, LOSS_TERMS):
        _curve(loss_axis, *_series(logs.records, name), name, color)
    _curve(grad_axis, *_series(logs.records, "grad_norm"), "grad norm", colors[2])
    for axis in (loss_axis, grad_axis):
        axis.set_yscale("log")
    emas = sorted({str(record.get("ema")) for record in logs.fid})
    for color, ema in zip(colors[3:] + colors, emas):
        x, y = _series([record for record in logs.fid if str(record.get("ema")) == ema], "fid")
        fid_axis.plot(x, y, "o-", color=color, label=ema if ema == "raw" else f"EMA {ema}")
    if not logs.fid:
        fid_axis.text(0.5, 0.5, "no FID evaluations (train with --fid-every)", ha="center", va="center",
                      transform=fid_axis.transAxes, color="gray")
    for axis, panel_title in zip((loss_axis, grad_axis, fid_axis), PANEL_TITLES):
        axis.set_title(panel_title, fontsize=10)
        axis.grid(alpha=0.3, which="both")
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    fid_axis.set_xlabel("images seen")
    return figure


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the curves of ``run_dir`` to ``out/curves.png`` (``out`` a folder, default ``run_dir``); returns the path."""
    logs = read_run(run_dir)
    out = Path(out if out is not None else run_dir) / DEFAULT_OUT
    last = logs.records[-1]
    figure = make_figure(logs, title=f"{Path(run_dir).resolve().name}: step {last['step']}, "
                                     f"{last['images_seen']:,} images")
    save_figure(figure, out, dpi=DPI)
    plt.close(figure)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = cli.Parser("python -m full.plot", __doc__.split("\n\n")[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a full.train output folder (holds log.jsonl)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help=f"output folder: {DEFAULT_OUT} (default: RUN_DIR)")
    args = parser.parse_args(argv)
    if not Path(args.run_dir).is_dir():
        parser.error(f"RUN_DIR: {args.run_dir!r} is not a folder")
    if args.out is not None:
        cli.check_out(parser, args.out)
    try:
        logs_skipped = read_run(args.run_dir).skipped
    except (FileNotFoundError, ValueError) as error:
        parser.error(f"RUN_DIR: {error}")
    except OSError as error:   # a log.jsonl that is a folder, or unreadable
        parser.error(f"RUN_DIR: cannot read {error.filename or args.run_dir!r}: {error.strerror or error}")
    try:
        out = plot_run(args.run_dir, args.out)
    except OSError as error:   # a full disk while writing the PNG: nothing is left half-written (full.io)
        target = Path(args.out if args.out is not None else args.run_dir) / DEFAULT_OUT
        print(f"{parser.prog}: error: writing {str(target)!r} failed: {error.strerror or error}", file=sys.stderr)
        sys.exit(1)
    if logs_skipped:
        print(f"skipped {logs_skipped} line(s) that are not training records (a JSON object with a numeric step "
              f"and images_seen)", file=sys.stderr)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
