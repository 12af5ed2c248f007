"""Tests of ``pmf_ref.path``: the noising path and the x <-> u conversions.

Oracles: endpoints and linearity of the path, round trips of the conversions, the Gaussian
closed form (``tests/oracles.py``) for the x-field at r = 0 and r = t, and per-example
references under ``torch.func.vmap``.
"""
import pytest
import torch
from hypothesis import example, given

import pmf_ref as P
from oracles import GaussianOracle, integrate_velocity
from strategies import (EDGE_CLIP, EDGE_EQUAL, EDGE_ONE_STEP, data_shapes, gaussian, seeds, time_pairs,
                        times, times_below_clip)

F64_TOL = 1e-12


def _times(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


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
