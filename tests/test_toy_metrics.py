"""Toy metrics on distributions with known distances."""
import math

import hypothesis.strategies as st
import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings

from toy.metrics import energy_distance, sliced_wasserstein


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
