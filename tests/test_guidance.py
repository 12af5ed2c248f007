"""Tests of ``pmf_ref.guidance``: guidance-scale and interval samplers, gating, guided target, label drop.

Oracles: the closed-form CDF of p(omega) ∝ omega^(-beta) (Kolmogorov-Smirnov at fixed seeds),
binomial tolerances for rates, explicit tables for the gating, and a per-example reference under
``vmap`` for the guided velocity.
"""
import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from scipy import stats

import pmf_ref as P
from strategies import batch_sizes, gaussian, generator, guidance_scales, seeds

N_DRAWS = 20_000
KS_CRITICAL = 1.95 / math.sqrt(N_DRAWS)
"""Kolmogorov-Smirnov critical value at level ~0.001 for n draws (asymptotic 1.95 / sqrt(n))."""
BINOMIAL_SIGMAS = 5.0


def omega_cdf(omega, *, s_max: float, beta: float):
    """Closed-form CDF of p(omega) ∝ omega^(-beta) on [1, m], m = 1 + s_max."""
    m = 1.0 + s_max
    omega = torch.as_tensor(omega, dtype=torch.float64).clamp(1.0, m)
    if beta == 1.0:
        return torch.log(omega) / math.log(m)
    return (omega ** (1 - beta) - 1) / (m ** (1 - beta) - 1)


def _assert_rate(count: int, n: int, p: float):
    tolerance = BINOMIAL_SIGMAS * math.sqrt(p * (1 - p) / n) + 1.0 / n
    assert abs(count / n - p) <= tolerance, (count / n, p, tolerance)


# ----------------------------------------------------------------------------- omega

@given(seed=seeds(), s_max=st.floats(0.0, 10.0), beta=st.floats(0.0, 3.0), n=st.integers(0, 50))
@example(seed=0, s_max=P.OMEGA_S_MAX, beta=1.0, n=10)
@example(seed=0, s_max=0.0, beta=2.0, n=10)
def test_sample_omega_lies_in_training_range(seed, s_max, beta, n):
    omega = P.sample_omega(n, s_max=s_max, beta=beta, generator=generator(seed))
    assert omega.shape == (n,) and omega.dtype == torch.float32
    assert bool((omega >= 1.0).all()) and bool((omega <= 1.0 + s_max).all())


@pytest.mark.parametrize("beta", [0.0, 1.0, 2.0])
def test_sample_omega_matches_closed_form_cdf(beta):
    omega = P.sample_omega(N_DRAWS, beta=beta, generator=generator(1234), dtype=torch.float64)
    result = stats.kstest(omega.numpy(), lambda w: omega_cdf(w, s_max=P.OMEGA_S_MAX, beta=beta).numpy())
    assert result.statistic < KS_CRITICAL, result


def test_sample_omega_cdf_check_detects_wrong_beta():
    """Negative control: beta = 2 draws are far from the beta = 1 CDF."""
    omega = P.sample_omega(N_DRAWS, beta=2.0, generator=generator(1234), dtype=torch.float64)
    result = stats.kstest(omega.numpy(), lambda w: omega_cdf(w, s_max=P.OMEGA_S_MAX, beta=1.0).numpy())
    assert result.statistic > 5 * KS_CRITICAL


# ----------------------------------------------------------------------------- guidance interval

@given(seed=seeds(), n=batch_sizes(64))
def test_sample_guidance_interval_ordering_and_diagonal_rows(seed, n):
    r, t = P.sample_time_pair(n, generator=generator(seed), dtype=torch.float64)
    t_min, t_max = P.sample_guidance_interval(r, t, generator=generator(seed + 1))
    assert t_min.shape == t_max.shape == (n,) and t_min.dtype == torch.float64
    assert bool((0 <= t_min).all() and (t_min <= 0.5).all() and (0.5 <= t_max).all() and (t_max <= 1).all())
    diagonal = r == t
    assert bool((t_min[diagonal] == 0).all()) and bool((t_max[diagonal] == 1).all())


def test_sample_guidance_interval_is_uniform_off_diagonal():
    r = torch.zeros(N_DRAWS)
    t = torch.full((N_DRAWS,), 0.5)
    t_min, t_max = P.sample_guidance_interval(r, t, generator=generator(5))
    assert stats.kstest(t_min.numpy(), stats.uniform(0.0, 0.5).cdf).statistic < KS_CRITICAL
    assert stats.kstest(t_max.numpy(), stats.uniform(0.5, 0.5).cdf).statistic < KS_CRITICAL


# ----------------------------------------------------------------------------- gating

def test_effective_guidance_scale_gates_by_interval_and_drop():
    omega = torch.tensor([3.0, 3.0, 3.0, 3.0, 3.0, 3.0])
    t = torch.tensor([0.05, 0.1, 0.4, 0.7, 0.9, 0.4])
    t_min = torch.full((6,), 0.1)
    t_max = torch.full((6,), 0.7)
    dropped = torch.tensor([False, False, False, False, False, True])
    expected = torch.tensor([1.0, 3.0, 3.0, 3.0, 1.0, 1.0])  # closed interval; dropped rows unguided
    assert torch.equal(P.effective_guidance_scale(omega, t, t_min=t_min, t_max=t_max, dropped=dropped), expected)
    expected_no_drop = torch.tensor([1.0, 3.0, 3.0, 3.0, 1.0, 3.0])
    assert torch.equal(P.effective_guidance_scale(omega, t, t_min=0.1, t_max=0.7), expected_no_drop)


@given(seed=seeds(), n=batch_sizes(32))
def test_effective_guidance_scale_on_diagonal_rows_is_omega(seed, n):
    """On r = t rows the sampled interval is [0, 1], so every t is inside."""
    gen = generator(seed)
    t = torch.rand(n, generator=gen)
    t_min, t_max = P.sample_guidance_interval(t.clone(), t, generator=gen)
    omega = P.sample_omega(n, generator=gen)
    assert torch.equal(P.effective_guidance_scale(omega, t, t_min=t_min, t_max=t_max), omega)


# ----------------------------------------------------------------------------- guided velocity

@given(seed=seeds(), batch=batch_sizes(), omega=guidance_scales())
@example(seed=0, batch=3, omega=1.0)
def test_guided_velocity_matches_per_example_formula(seed, batch, omega):
    v_t, v_c, v_u = (gaussian((batch, 2, 3), seed + k) for k in range(3))
    omegas = torch.linspace(1.0, omega, batch, dtype=torch.float64)
    reference = torch.func.vmap(lambda a, b, c, w: a + (1 - 1 / w) * (b - c))(v_t, v_c, v_u, omegas)
    torch.testing.assert_close(P.guided_velocity(v_t, v_c, v_u, omegas), reference, rtol=1e-13, atol=1e-13)
    vmapped = torch.func.vmap(lambda a, b, c, w: P.guided_velocity(a[None], b[None], c[None], w[None])[0])
    torch.testing.assert_close(vmapped(v_t, v_c, v_u, omegas), reference, rtol=1e-13, atol=1e-13)


@given(seed=seeds(), batch=batch_sizes())
def test_guided_velocity_is_v_t_at_unit_omega(seed, batch):
    v_t, v_c, v_u = (gaussian((batch, 4), seed + k) for k in range(3))
    assert torch.equal(P.guided_velocity(v_t, v_c, v_u, torch.ones(batch, dtype=torch.float64)), v_t)


def test_guided_velocity_fixed_point_is_classifier_free_guidance():
    """If v_c is the network's own guided output, v_g = v_t + (1 - 1/w)(v_g - v_u) solves to
    v_g = w v_t + (1 - w) v_u: the (1 - 1/omega) factor is what makes the trained field standard CFG."""
    v_t, v_u = gaussian((3, 4), 0), gaussian((3, 4), 1)
    omega = torch.tensor([1.0, 2.5, 8.0], dtype=torch.float64)
    cfg = omega[:, None] * v_t + (1 - omega[:, None]) * v_u
    torch.testing.assert_close(P.guided_velocity(v_t, cfg, v_u, omega), cfg, rtol=1e-13, atol=1e-13)


# ----------------------------------------------------------------------------- label drop

@pytest.mark.parametrize("p", [0.0, P.LABEL_DROP_PROB, 0.5, 1.0])
def test_label_drop_mask_rate(p):
    mask = P.label_drop_mask(N_DRAWS, p=p, generator=generator(9))
    assert mask.dtype == torch.bool and mask.shape == (N_DRAWS,)
    _assert_rate(int(mask.sum()), N_DRAWS, p)


@given(seed=seeds(), batch=batch_sizes(16))
def test_drop_labels_replaces_only_dropped_rows(seed, batch):
    gen = generator(seed)
    y = torch.randint(0, 10, (batch,), generator=gen)
    dropped = P.label_drop_mask(batch, p=0.5, generator=gen)
    labels = P.drop_labels(y, dropped, null_label=10)
    assert torch.equal(labels[dropped], torch.full_like(y[dropped], 10))
    assert torch.equal(labels[~dropped], y[~dropped])


# ----------------------------------------------------------------------------- determinism

@given(seed=seeds())
def test_guidance_samplers_are_deterministic_given_generator(seed):
    def draw(s):
        gen = generator(s)
        r, t = P.sample_time_pair(16, generator=gen)
        return (P.sample_omega(16, generator=gen), *P.sample_guidance_interval(r, t, generator=gen),
                P.label_drop_mask(16, p=0.5, generator=gen))

    first, again, other = draw(seed), draw(seed), draw(seed + 1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])


# ----------------------------------------------------------------------------- released label drop

def test_label_drop_mask_diagonal_drops_only_r_equal_t_rows_at_the_released_rate():
    n, draws, p = 16, 4000, P.LABEL_DROP_PROB
    gen = generator(21)
    counts, off_diagonal_drops = [], 0
    for _ in range(draws):
        r, t = P.sample_time_pair_released(n, generator=gen)
        dropped = P.label_drop_mask_diagonal(r, t, p=p, generator=gen)
        off_diagonal_drops += int((dropped & (r < t)).sum())
        counts.append(int(dropped.sum()))
    assert off_diagonal_drops == 0
    mean = sum(counts) / draws
    assert abs(mean - n * p) < 5 * math.sqrt(n / 2 * 2 * p * (1 - 2 * p) / draws), mean   # Binomial(8, 0.2)


def test_guidance_scale_for_target_is_ungated_on_the_diagonal():
    omega = torch.tensor([3.0, 3.0, 3.0, 3.0])
    t = torch.tensor([0.9, 0.9, 0.5, 0.5])
    r = torch.tensor([0.9, 0.1, 0.5, 0.1])
    t_min, t_max = torch.tensor([0.2, 0.2, 0.6, 0.4]), torch.tensor([0.6, 0.6, 0.8, 0.6])
    got = P.guidance_scale_for_target(omega, r, t, t_min=t_min, t_max=t_max)
    assert got.tolist() == [3.0, 1.0, 3.0, 3.0]
