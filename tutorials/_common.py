"""Plumbing shared by the tutorials: fast mode, output folder, figure saving, printed numbers.

Nothing here is part of the method -- every equation the tutorials use comes from ``pmf_ref``.

* ``PMF_TUTORIAL_FAST=1`` shrinks training steps and sample counts (the test suite sets it).
* ``PMF_TUTORIAL_OUT=DIR`` chooses the folder the figures go to (default ``runs/tutorials/NN/``).
* :func:`report` prints ``name = value`` lines; the tests parse them to check the numbers.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the tutorials write PNG files, they never open windows
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

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


def setup(number: str, seed: int = 0, num_threads: int = NUM_THREADS) -> Path:
    """Seed torch and numpy, limit threads, and return (creating it) the output folder of tutorial ``number``."""
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


def save_figure(fig: plt.Figure, path: Path) -> None:
    """Write ``fig`` to ``path`` atomically (temporary file, then ``os.replace``) and close it."""
    path = Path(path)
    handle, tmp = tempfile.mkstemp(suffix=path.suffix, dir=path.parent)
    os.close(handle)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    plt.close(fig)
    print(f"wrote {path}")


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
