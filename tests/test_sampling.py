"""Tests of ``pmf_ref.sampling``: one-step and multi-step generation.

Oracles: an x-prediction network evaluated directly at (e, 0, 1); the Gaussian flow map of
``tests/oracles.py`` (the exact average velocity composes to it for any number of steps; the
instantaneous velocity, used as u, converges to it like Euler's method).
"""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pmf_ref as P
from oracles import GaussianOracle
from strategies import batch_sizes, gaussian, seeds
from test_meanflow import TimeMLP


def _oracle(kind: str = "gaussian") -> GaussianOracle:
    return GaussianOracle(mu=torch.tensor([1.0, -0.5, 0.25], dtype=torch.float64),
                          sigma=0.5 if kind == "gaussian" else 0.0, s=1.0)


def _flow_to_data(oracle: GaussianOracle, e: torch.Tensor) -> torch.Tensor:
    ones, zeros = torch.ones(e.shape[0], dtype=e.dtype), torch.zeros(e.shape[0], dtype=e.dtype)
    return oracle.flow_map(e, ones, zeros)


@given(seed=seeds(), batch=batch_sizes())
def test_sample_one_step_of_x_prediction_is_x_at_zero_one(seed, batch):
    x_net = TimeMLP(dim=4, width=8, seed=seed)
    e = gaussian((batch, 4), seed + 1)
    x = P.sample_one_step(P.u_fn_from_x_fn(x_net), e, has_aux=True)
    ones, zeros = torch.ones(batch, dtype=e.dtype), torch.zeros(batch, dtype=e.dtype)
    torch.testing.assert_close(x, x_net(e, zeros, ones), rtol=1e-13, atol=1e-13)
    assert not x.requires_grad


@pytest.mark.parametrize("kind", ["gaussian", "point"])
def test_sample_one_step_with_true_field_is_flow_map(kind):
    oracle = _oracle(kind)
    e = gaussian((5, 3), 0)
    torch.testing.assert_close(P.sample_one_step(oracle.u_fn, e), _flow_to_data(oracle, e), rtol=1e-12, atol=1e-12)


@given(seed=seeds(), steps=st.integers(1, 12))
def test_sample_multi_step_with_true_average_velocity_is_exact_for_any_steps(seed, steps):
    """phi_{t_k -> t_{k+1}} composes to phi_{1 -> 0}: no discretisation error for the true u."""
    oracle = _oracle()
    e = gaussian((4, 3), seed)
    x = P.sample_multi_step(oracle.u_fn, e, steps=steps)
    torch.testing.assert_close(x, _flow_to_data(oracle, e), rtol=1e-11, atol=1e-11)


def test_sample_multi_step_with_one_step_equals_one_step():
    x_net = TimeMLP(dim=3, width=8, seed=2)
    e = gaussian((4, 3), 3)
    u_fn = P.u_fn_from_x_fn(x_net)
    torch.testing.assert_close(P.sample_multi_step(u_fn, e, steps=1, has_aux=True),
                               P.sample_one_step(u_fn, e, has_aux=True), rtol=0, atol=1e-14)


def test_sample_multi_step_with_instantaneous_velocity_converges_like_euler():
    """u = v (a flow-matching model) gives Euler's method: error -> 0 at first order in 1/N."""
    oracle = _oracle()
    e = gaussian((64, 3), 4)
    exact = _flow_to_data(oracle, e)
    errors = [(P.sample_multi_step(oracle.v_fn, e, steps=n) - exact).abs().max().item() for n in (4, 16, 64, 256)]
    assert errors[0] > 1e-3                                          # one coarse step is visibly off
    for coarse, fine in zip(errors, errors[1:]):
        assert 2.5 < coarse / fine < 6.0, errors                     # 4x steps -> ~4x smaller error


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sample_multi_step_keeps_dtype_and_shape(dtype):
    e = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=dtype)
    x = P.sample_multi_step(lambda z, r, t: 0.5 * z, e, steps=3)
    assert x.dtype == dtype and x.shape == e.shape
    torch.testing.assert_close(x, e * (1 - 1 / 6) ** 3, rtol=1e-6, atol=1e-6)  # z <- z - (1/3)(z/2), 3 times
