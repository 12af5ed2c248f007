"""Distances between two 2-D point clouds: sliced Wasserstein-2, the energy distance, and a
precision-type and a coverage-type nearest-neighbour distance.

All compare the 1-NFE samples (projected back to the plane by P^T) with fresh data samples.
What each one sees:

* ``sliced_wasserstein``, ``energy_distance``: the whole distribution -- where the mass is *and* how
  much of it; a broad blob over the data's support can score close to a sharp sample that puts the
  wrong share of its mass on each part of the data.
* ``precision_distance``: how far a typical sample lies from the data (mean distance from a sample
  to its nearest data point) -- samples between the arms of a roll, or a blob, score badly; a
  sample that covers only part of the data scores well.
* ``coverage_distance``: how far a typical data point lies from the samples (mean distance from a
  data point to its nearest sample) -- parts of the data that no sample reaches score badly.

Each has a floor: its value for a second, independent data sample of the same size (a perfect model).
The off-manifold residual lives in :mod:`toy.data` (it needs P).
"""
from __future__ import annotations

import math

import torch

SWD_PROJECTIONS = 128
"""Number of slicing directions; they are equally spaced on [0, pi), a deterministic quadrature
of the uniform average over directions (exact for quadratics such as a mean shift)."""
ENERGY_CHUNK = 1024  # rows of the pairwise-distance matrix held at once
NEAREST_CHUNK = 2048  # rows of a's distance matrix to b held at once by nearest_neighbour_distance


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


def nearest_neighbour_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance from each point of a to its nearest point of b, ``d_i = min_j |a_i - b_j|`` (float64).

    Args:
        a, b: point clouds, (n, d) and (m, d), m >= 1.
    Returns:
        d, (n,).
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or b.shape[0] == 0:
        raise ValueError(f"a and b must be (n, d) and (m >= 1, d), got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.double(), b.double()
    # The direct |a_i - b_j| (not cdist's |a|^2 + |b|^2 - 2 a.b): exact 0 for a point found in both.
    return torch.cat([torch.cdist(a[start:start + NEAREST_CHUNK], b, compute_mode="donot_use_mm_for_euclid_dist")
                      .min(dim=1).values for start in range(0, a.shape[0], NEAREST_CHUNK)])


def precision_distance(samples: torch.Tensor, data: torch.Tensor) -> float:
    """Precision-type distance ``mean_i min_j |s_i - x_j|``: how far a sample lies from the data.

    Lower is better; 0 iff every sample is a data point. Blind to data that no sample reaches.

    Args:
        samples: (n, d).  data: (m, d).
    Returns:
        the mean distance, a float >= 0.
    """
    return float(nearest_neighbour_distance(samples, data).mean())


def coverage_distance(samples: torch.Tensor, data: torch.Tensor) -> float:
    """Coverage-type distance ``mean_j min_i |x_j - s_i|``: how far a data point lies from the samples.

    Lower is better; 0 iff every data point is a sample. Blind to samples far from all the data.

    Args:
        samples: (n, d).  data: (m, d).
    Returns:
        the mean distance, a float >= 0.
    """
    return float(nearest_neighbour_distance(data, samples).mean())
