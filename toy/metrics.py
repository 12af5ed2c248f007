"""Distances between two 2-D point clouds: sliced Wasserstein-2 and the energy distance.

Both compare the 1-NFE samples (projected back to the plane by P^T) with fresh data samples.
The off-manifold residual lives in :mod:`toy.data` (it needs P).
"""
from __future__ import annotations

import math

import torch

SWD_PROJECTIONS = 128
"""Number of slicing directions; they are equally spaced on [0, pi), a deterministic quadrature
of the uniform average over directions (exact for quadratics such as a mean shift)."""
ENERGY_CHUNK = 1024  # rows of the pairwise-distance matrix held at once


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, *, projections: int = SWD_PROJECTIONS) -> float:
    """Sliced Wasserstein-2 distance ``SW2(a, b) = sqrt(mean_theta W2^2(theta . a, theta . b))``.

    Each 1-D W2^2 between equal-size empirical measures is the mean squared difference of the
    sorted projections. For N(m1, I) vs N(m2, I) in 2-D: ``SW2 = |m1 - m2| / sqrt(2)``.

    Args:
        a, b: point clouds, (n, 2) each (same n).  projections: directions theta_k = pi k / K.
    Returns:
        SW2, a float >= 0.
    """
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"a and b must be (n, d) with the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[1] != 2:
        raise ValueError(f"sliced_wasserstein expects 2-D points, got dimension {a.shape[1]}")
    angles = torch.arange(projections, dtype=torch.float64) * math.pi / projections
    theta = torch.stack([angles.cos(), angles.sin()], dim=0)                   # (2, K)
    a_sorted = (a.double() @ theta).sort(dim=0).values                         # (n, K)
    b_sorted = (b.double() @ theta).sort(dim=0).values
    return float((a_sorted - b_sorted).square().mean().sqrt())


def _mean_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """``mean_{i,j} |a_i - b_j|`` over all pairs (diagonal included), chunked to bound memory."""
    total = 0.0
    for start in range(0, a.shape[0], ENERGY_CHUNK):
        total += float(torch.cdist(a[start:start + ENERGY_CHUNK], b).sum())
    return total / (a.shape[0] * b.shape[0])


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Energy distance (Szekely) ``E = 2 E|X - Y| - E|X - X'| - E|Y - Y'|``, V-statistic.

    E >= 0, and E = 0 iff the distributions are equal; the V-statistic is exactly 0 for identical
    samples. (scipy.stats.energy_distance reports a square root of a scaled version of this.)

    Args:
        a, b: point clouds, (n, d) and (m, d).
    Returns:
        E, a float.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must be (n, d) and (m, d), got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.double(), b.double()
    return 2 * _mean_distance(a, b) - _mean_distance(a, a) - _mean_distance(b, b)
