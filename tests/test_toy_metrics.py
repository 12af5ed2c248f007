"""Toy metrics on distributions with known distances."""
import math

import hypothesis.strategies as st
import numpy as np
import pytest
import scipy.spatial
import scipy.stats
import torch
from hypothesis import given, settings

from toy.metrics import (NEAREST_CHUNK, coverage_distance, energy_distance, nearest_neighbour_distance,
                         precision_distance, sliced_wasserstein)


def _gaussian(n, seed, mean=(0.0, 0.0)):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=generator, dtype=torch.float64) + torch.tensor(mean, dtype=torch.float64)


def test_distances_vanish_on_identical_samples():
    a = _gaussian(2000, 0)
    shuffled = a[torch.randperm(2000, generator=torch.Generator().manual_seed(1))]
    assert sliced_wasserstein(a, shuffled) < 1e-12
    assert abs(energy_distance(a, shuffled)) < 1e-10


@settings(max_examples=10)
@given(shift_x=st.floats(-3, 3), shift_y=st.floats(-3, 3))
def test_sliced_wasserstein_of_a_translation(shift_x, shift_y):
    # Translating every point by m moves each 1-D projection by m.theta, so SW2^2 = mean(m.theta)^2 = |m|^2 / 2.
    a = _gaussian(200, 2)
    b = a + torch.tensor([shift_x, shift_y], dtype=torch.float64)
    assert sliced_wasserstein(a, b) == pytest.approx(math.hypot(shift_x, shift_y) / math.sqrt(2), abs=1e-9)


def test_sliced_wasserstein_of_shifted_gaussians():
    # Independent samples of N(0, I) and N(m, I): SW2 -> |m| / sqrt(2) (plus sampling noise).
    a, b = _gaussian(8192, 3), _gaussian(8192, 4, mean=(1.5, -2.0))
    assert sliced_wasserstein(a, b) == pytest.approx(2.5 / math.sqrt(2), abs=0.03)


@settings(max_examples=10)
@given(scale=st.floats(0.1, 10.0))
def test_sliced_wasserstein_scales_linearly(scale):
    a, b = _gaussian(200, 5), _gaussian(200, 6, mean=(0.5, 0.0))
    assert sliced_wasserstein(scale * a, scale * b) == pytest.approx(scale * sliced_wasserstein(a, b), rel=1e-9)


@given(seed=st.integers(0, 1000), n=st.integers(5, 60), m=st.integers(5, 60))
def test_energy_distance_matches_scipy_in_one_dimension(seed, n, m):
    # scipy's 1-D energy_distance is sqrt(2 E|X-Y| - E|X-X'| - E|Y-Y'|) of the empirical measures.
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=n), rng.normal(1.0, 2.0, size=m)
    expected = scipy.stats.energy_distance(a, b) ** 2
    got = energy_distance(torch.from_numpy(a).unsqueeze(1), torch.from_numpy(b).unsqueeze(1))
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_energy_distance_of_shifted_gaussians():
    # X - Y ~ N(m, 2I) has a Rice(|m|, sqrt 2) norm and X - X' a Rayleigh(sqrt 2) norm, so
    # E = 2 E|X - Y| - 2 E|X - X'| = 2 rice.mean - 2 sqrt(pi).
    shift = 2.0
    sigma = math.sqrt(2.0)
    expected = 2 * scipy.stats.rice.mean(shift / sigma, scale=sigma) - 2 * math.sqrt(math.pi)
    a, b = _gaussian(4000, 7), _gaussian(4000, 8, mean=(shift, 0.0))
    assert energy_distance(a, b) == pytest.approx(expected, abs=0.03)


# ---------------------------------------------------------------- nearest-neighbour distances

def _grid(k):
    """The k x k integer lattice {0, ..., k-1}^2, (k^2, 2), float64."""
    axis = torch.arange(k, dtype=torch.float64)
    return torch.cartesian_prod(axis, axis)


@settings(max_examples=15)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 40), m=st.integers(1, 40), dim=st.sampled_from([1, 2, 5]))
def test_nearest_neighbour_distance_matches_brute_force(seed, n, m, dim):
    # Oracle: a plain double loop over pairs in numpy (no cdist, no chunking).
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(n, dim)), rng.normal(size=(m, dim))
    expected = [min(math.dist(p, q) for q in b) for p in a]
    got = nearest_neighbour_distance(torch.from_numpy(a), torch.from_numpy(b))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)


def test_nearest_neighbour_distance_chunks_agree_with_kd_tree():
    # More rows than one chunk: scipy's k-d tree is an independent reference.
    a, b = _gaussian(NEAREST_CHUNK + 37, 11), _gaussian(500, 12)
    expected, _ = scipy.spatial.cKDTree(b.numpy()).query(a.numpy())
    np.testing.assert_allclose(nearest_neighbour_distance(a, b).numpy(), expected, rtol=1e-12, atol=1e-12)


def test_precision_of_an_offset_lattice():
    # Samples at lattice + (0.3, 0.4), inside the lattice: the nearest data point is the lower-left corner, at 0.5.
    data = _grid(10)
    samples = _grid(9) + torch.tensor([0.3, 0.4], dtype=torch.float64)
    assert precision_distance(samples, data) == pytest.approx(0.5, abs=1e-12)


def test_precision_sees_outliers_and_coverage_sees_missing_data():
    data = _grid(10)
    # A sample that is the data plus 4 far outliers at (100, 0) (91 from the nearest point (9, 0)):
    # every data point has itself as a sample (coverage 0); precision = 4 * 91 / 104.
    outliers = torch.tensor([[100.0, 0.0]] * 4, dtype=torch.float64)
    with_outliers = torch.cat([data, outliers])
    assert coverage_distance(with_outliers, data) == pytest.approx(0.0, abs=1e-12)
    assert precision_distance(with_outliers, data) == pytest.approx(4 * 91 / 104, rel=1e-12)
    # A sample that covers only the left half (x <= 4): precision 0; each point of column x = 5..9
    # is (x - 4) from the nearest sample, so coverage = 10 * (1 + 2 + 3 + 4 + 5) / 100 = 1.5.
    left_half = data[data[:, 0] <= 4]
    assert precision_distance(left_half, data) == pytest.approx(0.0, abs=1e-12)
    assert coverage_distance(left_half, data) == pytest.approx(1.5, rel=1e-12)


def test_nearest_neighbour_distances_vanish_on_identical_samples():
    a = _gaussian(300, 13)
    shuffled = a[torch.randperm(300, generator=torch.Generator().manual_seed(2))]
    assert precision_distance(shuffled, a) == 0.0 and coverage_distance(shuffled, a) == 0.0
