"""Toy data: 2-D point clouds and their embedding in D dimensions by a fixed orthonormal map.

A dataset is a 2-D distribution, normalised so every cloud has mean 0 and unit variance per
coordinate on average (one isotropic scale, so its shape is kept); it is lifted to R^D by
``x = P x_2d`` with a random column-orthonormal ``P in R^{D x 2}`` (pMF Fig. 2, JiT Fig. 2).
In the row-vector layout used here, ``x = x_2d @ P.T`` with x of shape (B, D).
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np
import sklearn.datasets
import torch

DATASETS = ("swiss_roll", "moons", "checkerboard", "8gaussians")
"""Names accepted by :func:`sample_2d`; the first is the default (the papers' figure)."""

SWISS_ROLL_NOISE = 0.5          # in the raw sklearn units, where the roll's radius reaches ~14
MOONS_NOISE = 0.05              # in the raw sklearn units, where each moon has radius 1
EIGHT_GAUSSIANS_RADIUS = 2.0    # centres on this circle before normalisation
EIGHT_GAUSSIANS_STD = 0.2
CHECKERBOARD_CELLS = 4          # a 4 x 4 board, 8 filled cells
NORMALISATION_SAMPLES = 200_000  # size of the fixed sample that sets each dataset's mean and scale
NORMALISATION_SEED = 12345


def _swiss_roll(n: int, rng: np.random.RandomState) -> np.ndarray:
    # The 3-D roll's (x, z) coordinates form the 2-D spiral; y is the roll's length.
    points, _ = sklearn.datasets.make_swiss_roll(n, noise=SWISS_ROLL_NOISE, random_state=rng)
    return points[:, [0, 2]]


def _moons(n: int, rng: np.random.RandomState) -> np.ndarray:
    points, _ = sklearn.datasets.make_moons(n, noise=MOONS_NOISE, random_state=rng)
    return points


def _checkerboard(n: int, rng: np.random.RandomState) -> np.ndarray:
    # Uniform in the cells (i, j) of a board on [0, k)^2 with i + j even.
    k = CHECKERBOARD_CELLS
    cells = np.array([(i, j) for i in range(k) for j in range(k) if (i + j) % 2 == 0])
    chosen = cells[rng.randint(len(cells), size=n)]
    return chosen + rng.uniform(size=(n, 2))


def _eight_gaussians(n: int, rng: np.random.RandomState) -> np.ndarray:
    angles = 2 * math.pi * rng.randint(8, size=n) / 8
    centres = EIGHT_GAUSSIANS_RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return centres + EIGHT_GAUSSIANS_STD * rng.standard_normal((n, 2))


_RAW: dict[str, Callable[[int, np.random.RandomState], np.ndarray]] = {
    "swiss_roll": _swiss_roll, "moons": _moons, "checkerboard": _checkerboard, "8gaussians": _eight_gaussians,
}


def _check_dataset(name: str) -> None:
    if name not in _RAW:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS)}; got {name!r}")


@functools.lru_cache(maxsize=None)
def _normalisation(name: str) -> tuple[np.ndarray, float]:
    """(mean (2,), scale) of a large fixed sample, so the transform is the same for every call."""
    raw = _RAW[name](NORMALISATION_SAMPLES, np.random.RandomState(NORMALISATION_SEED))
    mean = raw.mean(axis=0)
    scale = float(np.sqrt(((raw - mean) ** 2).mean()))  # RMS over both coordinates: one isotropic scale
    return mean, scale


def sample_2d(name: str, n: int, *, seed: int | np.random.RandomState) -> torch.Tensor:
    """Draw n points of a normalised 2-D dataset (mean 0, unit variance per coordinate on average).

    Args:
        name: one of :data:`DATASETS`.  n: number of points.
        seed: an int (a fresh numpy RandomState) or a RandomState to draw from (a data stream).
    Returns:
        x_2d, (n, 2), float32.
    """
    _check_dataset(name)
    mean, scale = _normalisation(name)
    rng = seed if isinstance(seed, np.random.RandomState) else np.random.RandomState(seed)
    raw = _RAW[name](n, rng)
    return torch.from_numpy((raw - mean) / scale).float()


def random_projection(dim: int, *, seed: int) -> torch.Tensor:
    """A random column-orthonormal ``P in R^{D x 2}`` (P^T P = I): QR of a seeded Gaussian matrix.

    The sign of each column is fixed by making R's diagonal positive, so P is a deterministic
    function of (dim, seed). For D = 2 it is a random rotation or reflection of the plane.

    Args:
        dim: D >= 2.  seed: seeds the Gaussian matrix.
    Returns:
        P, (D, 2), float32.
    """
    if dim < 2:
        raise ValueError(f"dim must be >= 2 (the data are 2-D), got {dim}")
    generator = torch.Generator().manual_seed(seed)
    gaussian = torch.randn(dim, 2, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)                     # q (D, 2), r (2, 2)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    return q.float()


def embed(x_2d: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """Lift 2-D points into R^D, ``x = P x_2d`` (rows: ``x_2d @ P.T``). (n, 2), (D, 2) -> (n, D)."""
    return x_2d @ projection.T


def project(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """Coordinates on the data plane, ``P^T x`` (rows: ``x @ P``). (n, D), (D, 2) -> (n, 2)."""
    return x @ projection


def off_manifold(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """Distance of each point from the data plane, ``||(I - P P^T) x||``. (n, D) -> (n,)."""
    return (x - embed(project(x, projection), projection)).norm(dim=1)
