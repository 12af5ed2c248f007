"""Tests of ``pmf_ref.path``: the noising path and the x <-> u conversions, the (r, t) samplers, and the
guidance draws (omega, the guidance interval, label drop).

Oracles: endpoints and linearity of the path, round trips of the conversions, the Gaussian
closed form (``tests/oracles.py``) for the x-field at r = 0 and r = t, and per-example
references under ``torch.func.vmap``. For the samplers: the order invariant 0 <= r <= t <= 1, binomial
tolerances on rates (the r = t fraction, label drop), the moments of logit(t), and closed-form CDFs
(Kolmogorov-Smirnov at fixed seeds): t is the max of two i.i.d. logit-normals (CDF F^2) and r on r < t
rows their min (CDF 1 - (1 - F)^2); p(omega) ∝ omega^(-beta) has a closed-form CDF too.
"""
import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from scipy import stats

import pmf_ref as P
from oracles import GaussianOracle, integrate_velocity
from strategies import (EDGE_CLIP, EDGE_ONE_STEP, batch_sizes, data_shapes, gaussian, generator, seeds, time_pairs,
                        times, times_below_clip)

F64_TOL = 1e-12
N_DRAWS = 20_000
KS_CRITICAL = 1.95 / math.sqrt(N_DRAWS)
"""Kolmogorov-Smirnov critical value at level ~0.001 (asymptotic 1.95 / sqrt(n))."""
SIGMAS = 5.0

fractions = st.floats(0.0, 1.0)
logit_means = st.floats(-2.0, 2.0)
logit_stds = st.floats(0.1, 2.0)


def _times(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def logit_normal_cdf(t, mean=P.P_MEAN, std=P.P_STD):
    t = torch.as_tensor(t, dtype=torch.float64)
    return torch.special.ndtr((torch.logit(t) - mean) / std)


def _assert_rate(count: int, n: int, p: float):
    tolerance = SIGMAS * math.sqrt(p * (1 - p) / n) + 1.0 / n
    assert abs(count / n - p) <= tolerance, (count / n, p, tolerance)


def _assert_ordered(r, t):
    assert bool((0 <= r).all()) and bool((r <= t).all()) and bool((t <= 1).all())


def omega_cdf(omega, *, s_max: float, beta: float):
    """Closed-form CDF of p(omega) ∝ omega^(-beta) on [1, m], m = 1 + s_max."""
    m = 1.0 + s_max
    omega = torch.as_tensor(omega, dtype=torch.float64).clamp(1.0, m)
    if beta == 1.0:
        return torch.log(omega) / math.log(m)
    return (omega ** (1 - beta) - 1) / (m ** (1 - beta) - 1)


# ----------------------------------------------------------------------------- interpolate

@given(shape=data_shapes(), seed=seeds(), t=times())
@example(shape=(3, 2), seed=0, t=0.0)
@example(shape=(3, 2), seed=0, t=1.0)
@example(shape=(3, 2), seed=0, t=P.T_EPS)
def test_interpolate_matches_per_example_formula(shape, seed, t):
    x, e = gaussian(shape, seed), gaussian(shape, seed + 1)
    t_batch = torch.linspace(0, 1, shape[0], dtype=torch.float64) * t
    z_t = P.interpolate(x, e, t_batch)
    reference = torch.func.vmap(lambda x1, e1, t1: (1 - t1) * x1 + t1 * e1)(x, e, t_batch)
    torch.testing.assert_close(z_t, reference, rtol=0, atol=F64_TOL)


@given(shape=data_shapes(), seed=seeds())
def test_interpolate_endpoints_are_data_and_noise(shape, seed):
    x, e = gaussian(shape, seed), gaussian(shape, seed + 1)
    zeros, ones = torch.zeros(shape[0], dtype=x.dtype), torch.ones(shape[0], dtype=x.dtype)
    assert torch.equal(P.interpolate(x, e, zeros), x)
    assert torch.equal(P.interpolate(x, e, ones), e)


@given(shape=data_shapes(), seed=seeds(), t=times(0.0, 0.999))
def test_conditional_velocity_is_time_derivative_of_path(shape, seed, t):
    x, e = gaussian(shape, seed), gaussian(shape, seed + 1)
    t_batch = torch.full((shape[0],), t, dtype=torch.float64)
    _, dz_dt = torch.func.jvp(lambda tt: P.interpolate(x, e, tt), (t_batch,), (torch.ones_like(t_batch),))
    torch.testing.assert_close(P.conditional_velocity(x, e), dz_dt, rtol=0, atol=F64_TOL)
    torch.testing.assert_close(P.conditional_velocity(x, e), e - x, rtol=0, atol=0)


def test_interpolate_under_vmap_of_batch_of_one_matches_batched():
    x, e = gaussian((5, 3, 2), 0), gaussian((5, 3, 2), 1)
    t = torch.rand(5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    per_example = torch.func.vmap(lambda x1, e1, t1: P.interpolate(x1[None], e1[None], t1[None])[0])
    torch.testing.assert_close(per_example(x, e, t), P.interpolate(x, e, t), rtol=0, atol=F64_TOL)


# ----------------------------------------------------------------------------- conversions

@given(shape=data_shapes(), seed=seeds(), t=times())
@example(shape=(2, 3), seed=0, t=0.0)
@example(shape=(2, 3), seed=0, t=P.T_EPS)
@example(shape=(2, 3), seed=0, t=1.0)
def test_average_velocity_from_x_round_trip(shape, seed, t):
    """x -> u -> x and u -> x -> u are identities for every t, including t < t_eps (the clip is shared)."""
    z_t, x_hat = gaussian(shape, seed), gaussian(shape, seed + 1)
    t_batch = torch.full((shape[0],), t, dtype=torch.float64)
    u = P.average_velocity_from_x(z_t, x_hat, t_batch)
    torch.testing.assert_close(P.x_from_average_velocity(z_t, u, t_batch), x_hat, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(P.average_velocity_from_x(z_t, P.x_from_average_velocity(z_t, x_hat, t_batch),
                                                         t_batch), x_hat, rtol=1e-12, atol=1e-12)


@given(shape=data_shapes(), seed=seeds(), t=times_below_clip())
@example(shape=(2, 3), seed=0, t=0.0)
def test_average_velocity_from_x_round_trip_below_clip(shape, seed, t):
    """Below t_eps the conversion divides by t_eps, not t; the round trip still holds."""
    z_t, x_hat = gaussian(shape, seed), gaussian(shape, seed + 1)
    t_batch = torch.full((shape[0],), t, dtype=torch.float64)
    u = P.average_velocity_from_x(z_t, x_hat, t_batch)
    torch.testing.assert_close(u, (z_t - x_hat) / P.T_EPS, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(P.x_from_average_velocity(z_t, u, t_batch), x_hat, rtol=1e-12, atol=1e-12)


@given(shape=data_shapes(), seed=seeds(), t=times())
@example(shape=(2, 3), seed=0, t=0.0)
@example(shape=(2, 3), seed=0, t=P.T_EPS)
@example(shape=(2, 3), seed=0, t=1.0)
def test_target_velocity_is_conditional_velocity_above_clip(shape, seed, t):
    """v_t = (z_t - x) / max(t, t_eps) = e - x for t >= t_eps and (t / t_eps)(e - x) below."""
    x, e = gaussian(shape, seed), gaussian(shape, seed + 1)
    t_batch = torch.full((shape[0],), t, dtype=torch.float64)
    v_t = P.target_velocity(P.interpolate(x, e, t_batch), x, t_batch)
    expected = (e - x) * (1.0 if t >= P.T_EPS else t / P.T_EPS)
    torch.testing.assert_close(v_t, expected, rtol=1e-10, atol=1e-10)


@given(seed=seeds(), pair=time_pairs(min_t=P.T_EPS))
@example(seed=0, pair=EDGE_CLIP)
@example(seed=0, pair=EDGE_ONE_STEP)
@example(seed=0, pair=(0.0, 0.5))
def test_x_field_at_r_zero_is_ode_endpoint(seed, pair):
    """x(z_t, 0, t) = z_t - t u(z_t, 0, t) is the flow map to t = 0 (Gaussian data, t >= t_eps)."""
    _, t = pair
    oracle = GaussianOracle(mu=gaussian((3,), seed), sigma=0.6, s=1.0)
    z_t = gaussian((4, 3), seed + 1, scale=1.5)
    t_batch, zeros = torch.full((4,), t, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)
    x_field = P.x_from_average_velocity(z_t, oracle.average_velocity(z_t, zeros, t_batch), t_batch)
    torch.testing.assert_close(x_field, oracle.flow_map(z_t, t_batch, zeros), rtol=1e-10, atol=1e-10)


def test_x_field_at_r_zero_is_ode_endpoint_by_integration():
    """Same property against an RK4 integration of the oracle's velocity (checks the oracle too)."""
    oracle = GaussianOracle(mu=torch.tensor([0.5, -1.0], dtype=torch.float64), sigma=0.4, s=1.0)
    z_t = gaussian((3, 2), 7)
    t = 0.8
    t_batch, zeros = torch.full((3,), t, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    x_field = P.x_from_average_velocity(z_t, oracle.average_velocity(z_t, zeros, t_batch), t_batch)
    torch.testing.assert_close(x_field, integrate_velocity(oracle.velocity, z_t, t, 0.0, steps=200),
                               rtol=1e-8, atol=1e-8)


@given(seed=seeds(), t=times(P.T_EPS, 1.0))
@example(seed=0, t=P.T_EPS)
@example(seed=0, t=1.0)
def test_x_field_at_r_equal_t_is_posterior_mean(seed, t):
    """x(z_t, t, t) = z_t - t v(z_t, t) = E[x | z_t], JiT's denoised target (Gaussian closed form)."""
    oracle = GaussianOracle(mu=gaussian((3,), seed), sigma=0.8, s=1.0)
    z_t = gaussian((4, 3), seed + 1)
    t_batch = torch.full((4,), t, dtype=torch.float64)
    x_field = P.x_from_average_velocity(z_t, oracle.average_velocity(z_t, t_batch, t_batch), t_batch)
    torch.testing.assert_close(x_field, oracle.posterior_mean(z_t, t_batch), rtol=1e-10, atol=1e-10)


def test_conversions_under_vmap_match_per_example_formula():
    z_t, x_hat = gaussian((6, 2, 3), 0), gaussian((6, 2, 3), 1)
    t = _times([0.0, 0.01, P.T_EPS, 0.3, 0.9, 1.0])
    reference_u = torch.func.vmap(lambda z1, x1, t1: (z1 - x1) / torch.clamp(t1, min=P.T_EPS))(z_t, x_hat, t)
    batched_u = P.average_velocity_from_x(z_t, x_hat, t)
    torch.testing.assert_close(batched_u, reference_u, rtol=0, atol=F64_TOL)
    vmapped_u = torch.func.vmap(lambda z1, x1, t1: P.average_velocity_from_x(z1[None], x1[None], t1[None])[0])
    torch.testing.assert_close(vmapped_u(z_t, x_hat, t), batched_u, rtol=0, atol=F64_TOL)
    vmapped_x = torch.func.vmap(lambda z1, u1, t1: P.x_from_average_velocity(z1[None], u1[None], t1[None])[0])
    torch.testing.assert_close(vmapped_x(z_t, batched_u, t), P.x_from_average_velocity(z_t, batched_u, t),
                               rtol=0, atol=F64_TOL)


# ----------------------------------------------------------------------------- expand_like

@pytest.mark.parametrize("shape", [(4,), (4, 3), (4, 3, 2, 2)])
def test_expand_like_broadcasts_per_example(shape):
    t = torch.arange(4, dtype=torch.float64)
    x = torch.ones(shape, dtype=torch.float64)
    expanded = P.expand_like(t, x)
    assert expanded.shape == (4,) + (1,) * (len(shape) - 1)
    assert torch.equal((expanded * x).flatten(1)[:, 0] if len(shape) > 1 else expanded * x, t)


# ----------------------------------------------------------------------------- times: invariants

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


# ----------------------------------------------------------------------------- times: distributions

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


# ----------------------------------------------------------------------------- times: ablation samplers

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


# ----------------------------------------------------------------------------- times: the released sampler

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


# ----------------------------------------------------------------------------- guidance draws: omega

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


# ----------------------------------------------------------------------------- guidance draws: interval

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


# ----------------------------------------------------------------------------- guidance draws: label drop

@pytest.mark.parametrize("p", [0.0, P.LABEL_DROP_PROB, 0.5, 1.0])
def test_label_drop_mask_rate(p):
    mask = P.label_drop_mask(N_DRAWS, p=p, generator=generator(9))
    assert mask.dtype == torch.bool and mask.shape == (N_DRAWS,)
    _assert_rate(int(mask.sum()), N_DRAWS, p)


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


# ----------------------------------------------------------------------------- guidance draws: determinism

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
