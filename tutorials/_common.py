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

import pmf_ref as P
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


# ----------------------------------------------------------------------------- references (not the method)

class GaussianFlow:
    """The closed-form flow of Gaussian data ``x ~ N(mu, sigma^2 I)`` with noise ``e ~ N(0, I)`` (float64).

    ``z_t`` is ``N(m(t), s(t)^2 I)`` with ``m(t) = (1 - t) mu`` and ``s(t)^2 = (1 - t)^2 sigma^2 + t^2``;
    the ODE moves every point along its standardised coordinate ``(z - m(t)) / s(t)``. These are the
    *reference* that tutorials 02, 07 and 09 check ``pmf_ref`` against; the method never knows them.
    Shapes: z (B, D) or (D,); t, r (B,) or ().
    """

    def __init__(self, mu: torch.Tensor, sigma: float):
        self.mu, self.sigma = mu.double(), float(sigma)

    def m(self, t):
        return (1 - t)[..., None] * self.mu                                  # t (B,) -> (B, D); t () -> (D,)

    def s(self, t):
        return torch.sqrt((1 - t) ** 2 * self.sigma**2 + t**2)

    def ds_dt(self, t):
        return (t - (1 - t) * self.sigma**2) / self.s(t)

    def velocity(self, z, t):
        """Marginal velocity v(z, t) = E[e - x | z_t = z] = m'(t) + s'(t) / s(t) (z - m(t))."""
        return -self.mu + P.expand_like(self.ds_dt(t) / self.s(t), z) * (z - self.m(t))

    def flow_map(self, z, t, r):
        """Where the ODE trajectory through z at time t is at time r: m(r) + s(r) / s(t) (z - m(t))."""
        return self.m(r) + P.expand_like(self.s(r) / self.s(t), z) * (z - self.m(t))

    def average_velocity(self, z, r, t):
        """u(z, r, t) = (z_t - z_r) / (t - r) along the exact trajectory (r < t; the r = t limit is v)."""
        return (z - self.flow_map(z, t, r)) / P.expand_like(t - r, z)

    def sample_posterior(self, z, t, k: int, generator: torch.Generator):
        """k draws of x | z_t = z (Gaussian, by Bayes' rule), (k, B, D); z (B, D), t (B,)."""
        precision = (1 - t) ** 2 / t**2 + 1 / self.sigma**2
        mean = ((1 - t)[:, None] * z / (t**2)[:, None] + self.mu / self.sigma**2) / precision[:, None]
        draws = torch.randn(k, *z.shape, generator=generator, dtype=torch.float64)
        return mean + draws / precision.sqrt()[:, None]


def rk4(velocity, z: torch.Tensor, t_from: float, t_to: float, num_steps: int) -> torch.Tensor:
    """Integrate dz/dt = velocity(z, t) from t_from to t_to (either direction) with classical RK4.

    ``velocity(z, t)`` takes a float t. Used for the exact one-step maps of tutorials 07 and 09 and the
    exact denoised field of tutorial 08 -- references, not the method.
    """
    dt = (t_to - t_from) / num_steps
    for k in range(num_steps):
        t = t_from + k * dt
        k1 = velocity(z, t)
        k2 = velocity(z + dt / 2 * k1, t + dt / 2)
        k3 = velocity(z + dt / 2 * k2, t + dt / 2)
        k4 = velocity(z + dt * k3, t + dt)
        z = z + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return z


def ema_step(ema: nn.Module, network: nn.Module, step: int, decay: float) -> None:
    """The toy's EMA with its warm-up, ``decay_k = min(decay, (1 + k) / (EMA_WARMUP + k))`` (``toy.train``)."""
    from toy.train import EMA_WARMUP, update_ema
    update_ema(ema, network, min(decay, (1 + step) / (EMA_WARMUP + step)))


# ----------------------------------------------------------------------------- digits with the tiny ViT (06, 08)

DIGITS_CLASSES = 10
DIGITS_ARCH = dict(num_classes=DIGITS_CLASSES, channels=1, depth=2, head_depth=1)
"""``pMF-T/4`` shortened to one trunk block and one block per head, for 1-channel digits."""
DIGITS_LR, DIGITS_BATCH = 3e-3, 64
"""Deviations for a short CPU run (tutorial 06, section 4): lr 3e-3 instead of 1e-3, batch 64."""


def digits_model(resolution: int, patch: int, *, prediction: str = "x", bottleneck: int = 16, seed: int = 0):
    """A freshly initialised shortened ``pMF-T/4`` for digits (seeded)."""
    from full.model import build_model
    torch.manual_seed(seed)
    return build_model("pMF-T/4", resolution=resolution, patch=patch, bottleneck=bottleneck,
                       prediction=prediction, **DIGITS_ARCH)


def library_step(model: nn.Module):
    """The library's training-step object for ``model`` with ``pMF-T/4``'s recipe (no perceptual loss)."""
    from full.step import TrainingStep
    return TrainingStep.from_preset(model, "pMF-T/4")


def train_digits(model: nn.Module, num_steps: int, *, loss_fn=None, seed: int = 0):
    """Train ``model`` on the digits at its resolution; return ``(ema_model, raw_u per step)``.

    Each step: a batch of digits, the step's randomness from the library step's ``draw_randomness``,
    then ``loss_fn(model, x, y, randomness) -> (loss, raw_u)`` -- by default the library's
    ``TrainingStep`` itself (tutorial 06 passes its written-out step and checks the two agree).
    Muon + Nesterov Adam (``full.optim``), one EDM EMA of half-life 2000 kimg (``full.ema``).
    """
    from full.digits.data import DigitsDataset
    from full.ema import EMASet
    from full.optim import build_optimizer
    step_object = library_step(model)
    if loss_fn is None:
        def loss_fn(model_, x, y, randomness):
            terms = step_object(x, y, randomness)
            return terms["loss"], terms["raw_u"].mean()
    optimizer = build_optimizer(model, kind="muon", lr=DIGITS_LR)
    emas = EMASet(model, (2000.0,))
    data = DigitsDataset(model.resolution)
    g = torch.Generator().manual_seed(seed)
    raw_u = []
    for step in range(num_steps):
        rows = torch.randint(len(data), (DIGITS_BATCH,), generator=g)
        x, y = data.images[rows], data.labels[rows]
        randomness = step_object.draw_randomness(x, generator=g)
        loss, raw = loss_fn(model, x, y, randomness)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        emas.update(model, batch=DIGITS_BATCH, images_seen=step * DIGITS_BATCH)
        raw_u.append(float(raw.detach()))
    return next(iter(emas.models.values())), np.array(raw_u)


@torch.no_grad()
def sample_digits(network: nn.Module, y: torch.Tensor, z_1: torch.Tensor, omega: float = 1.0,
                  t_min: float = 0.1, t_max: float = 0.7) -> torch.Tensor:
    """One network call per image, ``x = z_1 - u(z_1, 0, 1 | y, omega, [t_min, t_max])`` (x- or u-prediction)."""
    from full.sample import generate
    return generate(network, z_1, y, omega=omega, t_min=t_min, t_max=t_max)


def tile(images: torch.Tensor, rows: int, columns: int, gap: float = 1.0) -> torch.Tensor:
    """(rows * k, 1, H, W) images in row-major order -> one (rows (H + 1), columns (W + 1)) picture, 1-px gaps
    of value ``gap`` (1: white in a grey colour map)."""
    grid = torch.nn.functional.pad(images.clamp(-1, 1), (0, 1, 0, 1), value=gap)   # gap right and below
    grid = grid.reshape(rows, -1, *grid.shape[-2:])[:, :columns]                      # (rows, columns, H + 1, W + 1)
    return grid.permute(0, 2, 1, 3).reshape(rows * grid.shape[2], columns * grid.shape[3])


def unseen_part(network: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Each patch's component in the null space of the patch embedding's p x p conv, (B, p*p*C, patches)."""
    weight = network.patch_embed.reduce.weight.detach().flatten(1)              # (bottleneck, p*p*C)
    null_projector = torch.eye(weight.shape[1]) - torch.linalg.pinv(weight) @ weight
    patches = torch.nn.functional.unfold(images, kernel_size=network.patch, stride=network.patch)
    return null_projector @ patches
