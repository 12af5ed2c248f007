"""Tests of ``pmf_ref.time``: the (r, t) samplers.

Oracles: the order invariant 0 <= r <= t <= 1, binomial tolerances on the r = t fraction, the
moments of logit(t), and closed-form CDFs (Kolmogorov-Smirnov at fixed seeds): t is the max of
two i.i.d. logit-normals (CDF F^2) and r on r < t rows their min (CDF 1 - (1 - F)^2).
"""
import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from scipy import stats

import pmf_ref as P
from strategies import generator, seeds

N_DRAWS = 20_000
KS_CRITICAL = 1.95 / math.sqrt(N_DRAWS)
"""Kolmogorov-Smirnov critical value at level ~0.001 (asymptotic 1.95 / sqrt(n))."""
SIGMAS = 5.0

fractions = st.floats(0.0, 1.0)
logit_means = st.floats(-2.0, 2.0)
logit_stds = st.floats(0.1, 2.0)


def logit_normal_cdf(t, mean=P.P_MEAN, std=P.P_STD):
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.special.ndtr((torch.logit(t) - mean) / std)


def _assert_rate(count: int, n: int, p: float):
    tolerance = SIGMAS * math.sqrt(p * (1 - p) / n) + 1.0 / n
    assert abs(count / n - p) <= tolerance, (count / n, p, tolerance)


def _assert_ordered(r, t):
    assert bool((0 <= r).all()) and bool((r <= t).all()) and bool((t <= 1).all())


# ----------------------------------------------------------------------------- invariants

@given(seed=seeds(), n=st.integers(0, 200), mean=logit_means, std=logit_stds, equal_fraction=fractions,
       uniform_fraction=fractions)
@example(seed=0, n=10, mean=P.P_MEAN, std=P.P_STD, equal_fraction=1.0, uniform_fraction=1.0)
@example(seed=0, n=10, mean=P.P_MEAN, std=P.P_STD, equal_fraction=0.0, uniform_fraction=0.0)
def test_sample_time_pair_is_ordered(seed, n, mean, std, equal_fraction, uniform_fraction):
    r, t = P.sample_time_pair(n, mean=mean, std=std, equal_fraction=equal_fraction,
                              uniform_fraction=uniform_fraction, generator=generator(seed))
    assert r.shape == t.shape == (n,) and r.dtype == t.dtype == torch.float32
    _assert_ordered(r, t)


@pytest.mark.parametrize("sampler", [P.sample_time_pair, P.sample_time_pair_diagonal,
                                     P.sample_time_pair_endpoint, P.sample_time_pair_two_lines])
@given(seed=seeds(), n=st.integers(0, 100))
def test_every_time_sampler_is_ordered_and_deterministic(sampler, seed, n):
    r, t = sampler(n, generator=generator(seed), dtype=torch.float64)
    assert r.dtype == torch.float64 and r.shape == (n,)
    _assert_ordered(r, t)
    r_again, t_again = sampler(n, generator=generator(seed), dtype=torch.float64)
    assert torch.equal(r, r_again) and torch.equal(t, t_again)
    if n >= 8:
        _, t_other = sampler(n, generator=generator(seed + 1), dtype=torch.float64)
        assert not torch.equal(t, t_other)


@pytest.mark.parametrize("equal_fraction", [0.0, 0.25, P.EQUAL_FRACTION, 1.0])
def test_sample_time_pair_equal_fraction(equal_fraction):
    r, t = P.sample_time_pair(N_DRAWS, equal_fraction=equal_fraction, generator=generator(3))
    _assert_rate(int((r == t).sum()), N_DRAWS, equal_fraction)


# ----------------------------------------------------------------------------- distributions

@pytest.mark.parametrize("mean,std", [(P.P_MEAN, P.P_STD), (0.0, 0.8), (-0.4, 1.0)])
def test_sample_logit_normal_moments_of_logit(mean, std):
    t = P.sample_logit_normal(N_DRAWS, mean=mean, std=std, generator=generator(4), dtype=torch.float64)
    logit = torch.logit(t)
    assert abs(logit.mean().item() - mean) <= SIGMAS * std / math.sqrt(N_DRAWS)
    assert abs(logit.std().item() - std) <= SIGMAS * std / math.sqrt(2 * N_DRAWS)


def test_sample_time_pair_marginals_are_max_and_min_of_two_logit_normals():
    r, t = P.sample_time_pair(N_DRAWS, generator=generator(6), dtype=torch.float64)
    off_diagonal = r < t
    t_cdf = lambda q: logit_normal_cdf(q).numpy() ** 2                    # noqa: E731
    r_cdf = lambda q: 1 - (1 - logit_normal_cdf(q).numpy()) ** 2          # noqa: E731
    assert stats.kstest(t.numpy(), t_cdf).statistic < KS_CRITICAL
    assert stats.kstest(r[off_diagonal].numpy(), r_cdf).statistic < KS_CRITICAL * math.sqrt(2)  # ~n/2 rows
    # negative control: t is not a single logit-normal draw
    assert stats.kstest(t.numpy(), lambda q: logit_normal_cdf(q).numpy()).statistic > 5 * KS_CRITICAL


def test_sample_time_pair_uniform_mix():
    """uniform_fraction = 1: t = max of two U(0, 1) (CDF q^2); 0.1 (pMF-H): mixture 0.9 F^2 + 0.1 q^2."""
    _, t = P.sample_time_pair(N_DRAWS, uniform_fraction=1.0, generator=generator(7), dtype=torch.float64)
    assert stats.kstest(t.numpy(), lambda q: q ** 2).statistic < KS_CRITICAL
    _, t = P.sample_time_pair(N_DRAWS, uniform_fraction=0.1, generator=generator(8), dtype=torch.float64)
    mixture = lambda q: 0.9 * logit_normal_cdf(q).numpy() ** 2 + 0.1 * q ** 2  # noqa: E731
    assert stats.kstest(t.numpy(), mixture).statistic < KS_CRITICAL
    assert stats.kstest(t.numpy(), lambda q: logit_normal_cdf(q).numpy() ** 2).statistic > 1.5 * KS_CRITICAL


# ----------------------------------------------------------------------------- ablation samplers

def test_ablation_samplers_structure():
    gen = generator(10)
    r, t = P.sample_time_pair_diagonal(N_DRAWS, generator=gen)
    assert torch.equal(r, t)
    assert stats.kstest(t.double().numpy(), lambda q: logit_normal_cdf(q).numpy()).statistic < KS_CRITICAL
    r, t = P.sample_time_pair_endpoint(N_DRAWS, generator=gen)
    assert bool((r == 0).all()) and bool((t > 0).all())
    r, t = P.sample_time_pair_two_lines(N_DRAWS, equal_fraction=0.3, generator=gen)
    on_diagonal, at_zero = r == t, r == 0
    assert bool((on_diagonal | at_zero).all())
    _assert_rate(int(on_diagonal.sum()), N_DRAWS, 0.3)


# ----------------------------------------------------------------------------- the released sampler

@given(seed=seeds(), n=st.integers(0, 64), equal_fraction=fractions, uniform_fraction=fractions)
@example(seed=0, n=7, equal_fraction=0.5, uniform_fraction=0.1)
def test_sample_time_pair_released_has_an_exact_diagonal_prefix(seed, n, equal_fraction, uniform_fraction):
    r, t = P.sample_time_pair_released(n, equal_fraction=equal_fraction, uniform_fraction=uniform_fraction,
                                       generator=generator(seed), dtype=torch.float64)
    _assert_ordered(r, t)
    diagonal = P.diagonal_rows(n, equal_fraction)
    assert int(diagonal.sum()) == math.ceil(n * equal_fraction - 1e-9)
    assert bool((r[diagonal] == t[diagonal]).all())
    assert bool((r[~diagonal] < t[~diagonal]).all())    # ties of two continuous draws have probability 0


@given(n=st.integers(0, 64), a=st.integers(0, 32), b=st.integers(0, 32))
def test_diagonal_rows_exact_share_in_every_even_block(n, a, b):
    diagonal = P.diagonal_rows(n)
    lo, hi = sorted((2 * a, 2 * b))
    hi = min(hi, n - n % 2)
    lo = min(lo, hi)
    assert int(diagonal[lo:hi].sum()) == (hi - lo) // 2


def test_sample_time_pair_released_diagonal_t_is_one_logit_normal_draw():
    """On the r = t rows t is a single logit-normal draw (mean ~0.67 at (0.8, 0.8)); off the diagonal
    t and r are the max and min of two, as in the paper's sampler."""
    r, t = P.sample_time_pair_released(2 * N_DRAWS, generator=generator(9), dtype=torch.float64)
    rows = P.diagonal_rows(2 * N_DRAWS)
    diagonal, off = t[rows], ~rows
    assert stats.kstest(diagonal.numpy(), lambda q: logit_normal_cdf(q).numpy()).statistic < KS_CRITICAL
    assert abs(diagonal.mean().item() - 0.668) < 0.01
    assert stats.kstest(t[off].numpy(), lambda q: logit_normal_cdf(q).numpy() ** 2).statistic < KS_CRITICAL
    assert stats.kstest(r[off].numpy(), lambda q: 1 - (1 - logit_normal_cdf(q).numpy()) ** 2).statistic < KS_CRITICAL
    # negative control: the paper-style sampler's diagonal t is the max of two (mean ~0.76)
    r_p, t_p = P.sample_time_pair(2 * N_DRAWS, generator=generator(9), dtype=torch.float64)
    assert t_p[r_p == t_p].mean().item() > 0.74
