"""Plumbing shared by the tutorials: fast mode, output folder, figures, printed numbers, a small MLP.

Nothing here is part of the method -- every equation the tutorials use comes from ``pmf_ref``.

* ``PMF_TUTORIAL_FAST=1`` shrinks training steps and sample counts (the test suite sets it). Figures
  of under-trained models are then stamped "fast mode: under-trained".
* ``PMF_TUTORIAL_OUT=DIR`` chooses the folder the figures go to (default ``runs/tutorials/NN/``).
* :func:`save_figure` writes a PNG and, inside Jupyter or VS Code's interactive window, also shows
  the figure in the cell's output. No matplotlib backend is forced.
* :func:`report` prints ``name = value`` lines; the tests parse them to check the numbers.

Each tutorial finds this file from any working directory through the installed ``pmf_ref``
(``pip install -e .`` puts the repository, and so ``tutorials/``, next to it).
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn

from full import io

# torch's first forward-mode JVP loads decompositions through the deprecated torch.jit.script and
# warns about it; the warning is torch's internal business, not the reader's.
warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*is deprecated", category=FutureWarning)

FAST = os.environ.get("PMF_TUTORIAL_FAST", "0") not in ("", "0")
"""True when the test suite (or an impatient reader) asks for a quick run."""
REPO_ROOT = Path(__file__).resolve().parents[1]
NUM_THREADS = 1
"""Networks this small run fastest on one thread: a second one costs more in synchronisation than it
saves in arithmetic, and far more on a busy machine (measured: the tiny ViT's backward pass was >10x
slower with 2 threads than with 1 while other jobs shared the 2 cores)."""
FAST_STAMP = "fast mode: under-trained"


def setup(number: str, seed: int = 0, num_threads: int = NUM_THREADS) -> Path:
    """Seed torch and numpy, limit threads, and return (creating it) the output folder of tutorial ``number``.

    The thread count is the one global setting a tutorial changes (it persists in a notebook kernel).
    """
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.set_num_threads(min(num_threads, torch.get_num_threads()))
    out = Path(os.environ.get("PMF_TUTORIAL_OUT", REPO_ROOT / "runs" / "tutorials" / number))
    out.mkdir(parents=True, exist_ok=True)
    print(f"tutorial {number}: fast mode {'on' if FAST else 'off'}; figures go to {out}")
    return out


def steps(full: int, fast: int) -> int:
    """Pick the full-mode or the fast-mode size of a loop."""
    return fast if FAST else full


def in_notebook() -> bool:
    """True inside an IPython kernel (Jupyter, VS Code's interactive window), where plt.show() draws inline."""
    ipython = sys.modules.get("IPython")
    return ipython is not None and ipython.get_ipython() is not None


def save_figure(fig: plt.Figure, path: Path, *, trained: bool = False) -> None:
    """Write ``fig`` to ``path`` atomically (temporary file, then ``os.replace``), then show or close it.

    Args:
        fig: the figure.  path: a .png path.
        trained: the figure shows a trained model; in fast mode it is stamped "fast mode: under-trained".
    """
    if FAST and trained:
        fig.text(0.5, 0.5, FAST_STAMP, ha="center", va="center", fontsize=26, color="red", alpha=0.4,
                 rotation=12, transform=fig.transFigure)
    path = Path(path)
    io.save_figure(fig, path, dpi=110, bbox_inches="tight")
    print(f"wrote {path}")
    if in_notebook():
        plt.show()          # the inline backend draws the figure into this cell's output
    else:
        plt.close(fig)      # a script (or the tests) only wants the file


def report(name: str, value: float) -> float:
    """Print one number as ``name = value`` (the tests look for these lines) and return it."""
    value = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    print(f"{name} = {value:.10g}")
    return value


# ----------------------------------------------------------------------------- a small network

class MLP(nn.Module):
    """A small SiLU MLP on a concatenation of its inputs: ``MLP(d_in, d_out)(*tensors)``.

    Smooth activations keep ``du/dt`` (a JVP) a smooth function; the last layer starts at zero so
    every parametrisation starts from the same "predict nothing" output.
    """

    def __init__(self, d_in: int, d_out: int, width: int = 128, depth: int = 4):
        super().__init__()
        layers: list[nn.Module] = []
        d = d_in
        for _ in range(depth - 1):
            layers += [nn.Linear(d, width), nn.SiLU()]
            d = width
        layers.append(nn.Linear(d, d_out))
        nn.init.zeros_(layers[-1].weight)
        nn.init.zeros_(layers[-1].bias)
        self.layers = nn.Sequential(*layers)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        columns = [i if i.ndim == 2 else i[:, None] for i in inputs]        # (B,) -> (B, 1)
        return self.layers(torch.cat(columns, dim=1))
