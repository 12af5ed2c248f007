"""Tests of ``pmf_ref.meanflow``: the JVP, the MeanFlow identity, compound velocity and tangents.

Oracles: the Gaussian closed form (``tests/oracles.py``: analytic u, v, flow map and du/dt),
float64 central finite differences on small random networks (an MLP and an attention block
written here with matmul + softmax), per-example references under ``vmap``, and autograd
of a plain forward pass.
"""
import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import pmf_ref as P
from oracles import GaussianOracle, integrate_velocity
from strategies import (EDGE_CLIP, EDGE_EQUAL, EDGE_ONE_STEP, batch_sizes, gaussian, generator, seeds,
                        time_pairs, times)

ORACLE_TOL = 1e-9
"""Analytic float64 quantities agree to ~1e-14; the slack covers sd(t) near 0 for small t."""
FD_STEP = 1e-6
"""Central-difference step: truncation error ~ h^2 = 1e-12, rounding ~ 1e-16 / h = 1e-10."""
FD_TOL = 1e-6

oracle_kinds = st.sampled_from(["gaussian", "point"])


def _oracle(kind: str, seed: int) -> GaussianOracle:
    mu = gaussian((3,), seed)
    return GaussianOracle(mu=mu, sigma=0.7 if kind == "gaussian" else 0.0, s=1.3)


def _batch_times(pair, batch):
    r, t = pair
    return (torch.full((batch,), r, dtype=torch.float64), torch.full((batch,), t, dtype=torch.float64))


# The single-point oracle u = (z - mu)/t is defined for t > 0 only; t >= t_eps covers the pins.
oracle_time_pairs = time_pairs(min_t=0.0).filter(lambda pair: pair[1] >= 0.01)


# ----------------------------------------------------------------------------- the oracle itself

@given(seed=seeds(), pair=time_pairs(min_t=0.0).filter(lambda pair: pair[1] - pair[0] > 1e-3))
@example(seed=0, pair=EDGE_ONE_STEP)
def test_oracle_average_velocity_matches_its_definition(seed, pair):
    """The stable closed form g(r, t) w - mu equals (z - phi_{t->r}(z)) / (t - r)."""
    oracle = _oracle("gaussian", seed)
    z = gaussian((4, 3), seed + 1)
    r, t = _batch_times(pair, 4)
    torch.testing.assert_close(oracle.average_velocity(z, r, t), oracle.average_velocity_by_definition(z, r, t),
                               rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("kind", ["gaussian", "point"])
def test_oracle_flow_map_matches_ode_integration(kind):
    oracle = _oracle(kind, 3)
    z = gaussian((4, 3), 4)
    t_batch, r_batch = torch.full((4,), 0.9, dtype=torch.float64), torch.full((4,), 0.2, dtype=torch.float64)
    torch.testing.assert_close(integrate_velocity(oracle.velocity, z, 0.9, 0.2, steps=100),
                               oracle.flow_map(z, t_batch, r_batch), rtol=1e-9, atol=1e-9)


# ----------------------------------------------------------------------------- MeanFlow identity

@given(kind=oracle_kinds, seed=seeds(), pair=oracle_time_pairs)
@example(kind="gaussian", seed=0, pair=EDGE_EQUAL)
@example(kind="gaussian", seed=0, pair=EDGE_ONE_STEP)
@example(kind="gaussian", seed=0, pair=EDGE_CLIP)
@example(kind="point", seed=0, pair=EDGE_ONE_STEP)
@example(kind="point", seed=0, pair=EDGE_EQUAL)
def test_average_velocity_jvp_matches_oracle_derivative(kind, seed, pair):
    """du/dt by ``average_velocity_jvp`` (tangent = true v) equals the analytic total derivative."""
    oracle = _oracle(kind, seed)
    z = gaussian((4, 3), seed + 1)
    r, t = _batch_times(pair, 4)
    jvp = P.average_velocity_jvp(oracle.u_fn, z, r, t, v_tangent=oracle.velocity(z, t))
    torch.testing.assert_close(jvp.u, oracle.average_velocity(z, r, t), rtol=0, atol=0)
    torch.testing.assert_close(jvp.dudt, oracle.average_velocity_dudt(z, r, t), rtol=ORACLE_TOL, atol=ORACLE_TOL)
    assert jvp.aux is None


def test_average_velocity_jvp_hands_named_tangents_to_the_given_engine():
    """``jvp=`` receives (z, r, t) with tangents (v, 0, 1), and its results come back as (u, du/dt, aux)."""
    z = gaussian((4, 3), 1)
    r, t = _batch_times(EDGE_ONE_STEP, 4)
    v = gaussian((4, 3), 2)
    calls = []

    def engine(fn, primals, tangents, *, has_aux=False):
        calls.append((primals, tangents, has_aux))
        return torch.func.jvp(fn, primals, tangents, has_aux=has_aux)

    def u_fn(z_, r_, t_):
        return z_ * t_[:, None], r_
    result = P.average_velocity_jvp(u_fn, z, r, t, v_tangent=v, has_aux=True, jvp=engine)
    (primals, (dz, dr, dt), has_aux), = calls
    assert has_aux and all(a is b for a, b in zip(primals, (z, r, t)))
    assert torch.equal(dz, v) and torch.equal(dr, torch.zeros_like(r)) and torch.equal(dt, torch.ones_like(t))
    torch.testing.assert_close(result.dudt, v * t[:, None] + z, rtol=0, atol=0)
    assert torch.equal(result.aux, r)


@given(kind=oracle_kinds, seed=seeds(), pair=oracle_time_pairs)
@example(kind="gaussian", seed=0, pair=EDGE_EQUAL)
@example(kind="gaussian", seed=0, pair=EDGE_ONE_STEP)
@example(kind="gaussian", seed=0, pair=EDGE_CLIP)
@example(kind="point", seed=0, pair=EDGE_ONE_STEP)
def test_meanflow_identity_holds_for_true_field(kind, seed, pair):
    """u = v - (t - r) du/dt, with du/dt from the core's JVP; so the compound velocity V equals v."""
    oracle = _oracle(kind, seed)
    z = gaussian((4, 3), seed + 1)
    r, t = _batch_times(pair, 4)
    v = oracle.velocity(z, t)
    jvp = P.average_velocity_jvp(oracle.u_fn, z, r, t, v_tangent=v)
    torch.testing.assert_close(jvp.u, v - (t - r)[:, None] * jvp.dudt, rtol=ORACLE_TOL, atol=ORACLE_TOL)
    torch.testing.assert_close(P.compound_velocity(jvp.u, jvp.dudt, r, t), v, rtol=ORACLE_TOL, atol=ORACLE_TOL)
    torch.testing.assert_close(P.meanflow_target(v, jvp.dudt, r, t), jvp.u, rtol=ORACLE_TOL, atol=ORACLE_TOL)


@given(kind=oracle_kinds, seed=seeds(), pair=oracle_time_pairs)
@example(kind="gaussian", seed=0, pair=EDGE_ONE_STEP)
def test_meanflow_identity_fails_for_perturbed_field(kind, seed, pair):
    """The identity is a real check: a field off by a t-dependent term violates it when r < t."""
    oracle = _oracle(kind, seed)
    z = gaussian((4, 3), seed + 1)
    r, t = _batch_times(pair, 4)
    v = oracle.velocity(z, t)

    def wrong_u(zz, rr, tt):  # u + t / 2: du/dt grows by 1/2, so the residual is t/2 + (t - r)/2
        return oracle.u_fn(zz, rr, tt) + 0.5 * tt[:, None]

    jvp = P.average_velocity_jvp(wrong_u, z, r, t, v_tangent=v)
    residual = jvp.u - (v - (t - r)[:, None] * jvp.dudt)
    expected = pair[1] - 0.5 * pair[0]
    assert expected > 0.0
    torch.testing.assert_close(residual, torch.full_like(residual, expected), rtol=0, atol=ORACLE_TOL)


@given(kind=oracle_kinds, seed=seeds(), pair=oracle_time_pairs)
@example(kind="gaussian", seed=0, pair=EDGE_ONE_STEP)
@example(kind="gaussian", seed=0, pair=EDGE_EQUAL)
@example(kind="gaussian", seed=0, pair=EDGE_CLIP)
def test_displacement_identity_lands_on_flow_map(kind, seed, pair):
    """z_r = z_t - (t - r) u(z_t, r, t) is the exact ODE solution from t to r."""
    oracle = _oracle(kind, seed)
    z = gaussian((4, 3), seed + 1)
    r, t = _batch_times(pair, 4)
    z_r = z - (t - r)[:, None] * oracle.average_velocity(z, r, t)
    if kind == "point" and pair[0] == 0.0:
        torch.testing.assert_close(z_r, oracle.mu.expand_as(z), rtol=ORACLE_TOL, atol=ORACLE_TOL)
    else:
        torch.testing.assert_close(z_r, oracle.flow_map(z, t, r), rtol=ORACLE_TOL, atol=ORACLE_TOL)


@given(kind=oracle_kinds, seed=seeds(), t=times(0.01, 1.0))
@example(kind="gaussian", seed=0, t=P.T_EPS)
@example(kind="gaussian", seed=0, t=1.0)
def test_average_velocity_on_diagonal_is_velocity(kind, seed, t):
    """u(z, t, t) = v(z, t), and at r = t the compound velocity is u itself (any du/dt)."""
    oracle = _oracle(kind, seed)
    z = gaussian((4, 3), seed + 1)
    t_batch = torch.full((4,), t, dtype=torch.float64)
    u = oracle.average_velocity(z, t_batch, t_batch)
    torch.testing.assert_close(u, oracle.velocity(z, t_batch), rtol=ORACLE_TOL, atol=ORACLE_TOL)
    arbitrary_dudt = gaussian((4, 3), seed + 2, scale=1e3)
    assert torch.equal(P.compound_velocity(u, arbitrary_dudt, t_batch, t_batch), u)


# ----------------------------------------------------------------------------- JVP vs finite differences

def _random_linear(fan_in: int, fan_out: int, gen: torch.Generator) -> torch.nn.Linear:
    layer = torch.nn.Linear(fan_in, fan_out).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(fan_out, fan_in, generator=gen, dtype=torch.float64) / math.sqrt(fan_in))
        layer.bias.copy_(0.1 * torch.randn(fan_out, generator=gen, dtype=torch.float64))
    return layer


class TimeMLP(torch.nn.Module):
    """Small tanh MLP on [z, r, t] -> an output shaped like z (the test's network)."""

    def __init__(self, dim: int, width: int, seed: int):
        super().__init__()
        gen = generator(seed)
        self.net = torch.nn.Sequential(_random_linear(dim + 2, width, gen), torch.nn.Tanh(),
                                       _random_linear(width, width, gen), torch.nn.Tanh(),
                                       _random_linear(width, dim, gen))

    def forward(self, z, r, t):
        return self.net(torch.cat([z, r[:, None], t[:, None] ** 2], dim=1))


class TimeAttention(torch.nn.Module):
    """One self-attention block on tokens (B, N, d), conditioned additively on r and t.

    Written with matmul + softmax (no fused kernel), as the pMF ViT must be for forward-mode AD.
    """

    def __init__(self, dim: int, seed: int):
        super().__init__()
        gen = generator(seed)
        self.query, self.key, self.value, self.out = (_random_linear(dim, dim, gen) for _ in range(4))
        self.time_r = torch.nn.Parameter(torch.randn(dim, generator=gen, dtype=torch.float64))
        self.time_t = torch.nn.Parameter(torch.randn(dim, generator=gen, dtype=torch.float64))

    def forward(self, z, r, t):
        h = z + r[:, None, None] * self.time_r + torch.sin(3 * t)[:, None, None] * self.time_t  # (B, N, d)
        q, k, v = self.query(h), self.key(h), self.value(h)
        attention = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(z.shape[-1]), dim=-1)  # (B, N, N)
        return z + self.out(attention @ v)


def _central_difference_dudt(u_fn, z, r, t, v_tangent):
    """du/dt ~ (u(z + h v, r, t + h) - u(z - h v, r, t - h)) / 2h, in float64."""
    plus = u_fn(z + FD_STEP * v_tangent, r, t + FD_STEP)
    minus = u_fn(z - FD_STEP * v_tangent, r, t - FD_STEP)
    return (plus - minus) / (2 * FD_STEP)


@given(seed=seeds(), pair=time_pairs(), batch=batch_sizes())
@example(seed=0, pair=EDGE_EQUAL, batch=2)
@example(seed=0, pair=EDGE_ONE_STEP, batch=2)
@example(seed=0, pair=EDGE_CLIP, batch=2)
def test_average_velocity_jvp_matches_finite_differences_mlp(seed, pair, batch):
    net = TimeMLP(dim=5, width=16, seed=seed)
    z, v_tangent = gaussian((batch, 5), seed + 1), gaussian((batch, 5), seed + 2)
    r, t = _batch_times(pair, batch)
    jvp = P.average_velocity_jvp(net, z, r, t, v_tangent=v_tangent)
    with torch.no_grad():
        expected = _central_difference_dudt(net, z, r, t, v_tangent)
    torch.testing.assert_close(jvp.dudt, expected, rtol=FD_TOL, atol=FD_TOL)


@given(seed=seeds(), pair=time_pairs(), batch=batch_sizes(3))
@example(seed=0, pair=EDGE_EQUAL, batch=2)
@example(seed=0, pair=EDGE_ONE_STEP, batch=2)
def test_average_velocity_jvp_matches_finite_differences_attention(seed, pair, batch):
    block = TimeAttention(dim=8, seed=seed)
    z, v_tangent = gaussian((batch, 5, 8), seed + 1), gaussian((batch, 5, 8), seed + 2)
    r, t = _batch_times(pair, batch)
    jvp = P.average_velocity_jvp(block, z, r, t, v_tangent=v_tangent)
    with torch.no_grad():
        expected = _central_difference_dudt(block, z, r, t, v_tangent)
    torch.testing.assert_close(jvp.dudt, expected, rtol=FD_TOL, atol=FD_TOL)


@given(seed=seeds(), pair=time_pairs(min_t=0.1, max_t=0.9))
@example(seed=0, pair=(0.1, 0.9))
def test_average_velocity_jvp_of_x_prediction_matches_finite_differences(seed, pair):
    """JVP through ``u_fn_from_x_fn`` (the 1/t conversion), away from the t_eps kink; aux = x_hat."""
    x_net = TimeMLP(dim=4, width=16, seed=seed)
    u_fn = P.u_fn_from_x_fn(x_net)
    z, v_tangent = gaussian((3, 4), seed + 1), gaussian((3, 4), seed + 2)
    r, t = _batch_times(pair, 3)
    jvp = P.average_velocity_jvp(u_fn, z, r, t, v_tangent=v_tangent, has_aux=True)
    with torch.no_grad():
        expected = _central_difference_dudt(lambda zz, rr, tt: u_fn(zz, rr, tt)[0], z, r, t, v_tangent)
        torch.testing.assert_close(jvp.aux, x_net(z, r, t), rtol=0, atol=1e-14)
    torch.testing.assert_close(jvp.u, (z - jvp.aux) / t[:, None], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jvp.dudt, expected, rtol=FD_TOL, atol=FD_TOL)


def test_average_velocity_jvp_tangents_are_dr_zero_dt_one():
    """For u = a r + b t + z . 0 the total derivative is exactly b: swapping dr and dt would give a."""
    z = torch.zeros(3, 2, dtype=torch.float64)
    r, t = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64), torch.tensor([0.5, 0.6, 0.7], dtype=torch.float64)

    def u_fn(zz, rr, tt):
        return 2.0 * rr[:, None] + 3.0 * tt[:, None] + 5.0 * zz

    jvp = P.average_velocity_jvp(u_fn, z, r, t, v_tangent=torch.ones_like(z))
    torch.testing.assert_close(jvp.dudt, torch.full_like(z, 3.0 + 5.0), rtol=0, atol=0)


# ----------------------------------------------------------------------------- nn.Module use

def test_average_velocity_jvp_closure_and_functional_call_agree():
    net = TimeMLP(dim=4, width=12, seed=11)
    z, v_tangent = gaussian((5, 4), 12), gaussian((5, 4), 13)
    r = torch.tensor([0.0, 0.1, 0.2, 0.5, 1.0], dtype=torch.float64)
    t = torch.tensor([0.0, 0.3, 0.2, 0.9, 1.0], dtype=torch.float64)
    params = {name: p.detach().clone().requires_grad_(True) for name, p in net.named_parameters()}

    def u_functional(zz, rr, tt):
        return torch.func.functional_call(net, params, (zz, rr, tt))

    by_closure = P.average_velocity_jvp(lambda zz, rr, tt: net(zz, rr, tt), z, r, t, v_tangent=v_tangent)
    by_functional = P.average_velocity_jvp(u_functional, z, r, t, v_tangent=v_tangent)
    torch.testing.assert_close(by_closure.u, by_functional.u, rtol=0, atol=0)
    torch.testing.assert_close(by_closure.dudt, by_functional.dudt, rtol=1e-14, atol=1e-14)
    with torch.no_grad():
        expected = _central_difference_dudt(net, z, r, t, v_tangent)
    torch.testing.assert_close(by_functional.dudt, expected, rtol=FD_TOL, atol=FD_TOL)


@pytest.mark.parametrize("binding", ["closure", "functional_call"])
def test_average_velocity_jvp_primal_has_parameter_gradients_of_plain_forward(binding):
    """The primal u from the JVP back-propagates into the parameters exactly like net(z, r, t)."""
    net = TimeAttention(dim=6, seed=21)
    z, v_tangent = gaussian((3, 4, 6), 22), gaussian((3, 4, 6), 23)
    weights = gaussian((3, 4, 6), 24)
    r, t = torch.tensor([0.0, 0.2, 0.7], dtype=torch.float64), torch.tensor([1.0, 0.2, 0.9], dtype=torch.float64)
    names = [name for name, _ in net.named_parameters()]
    if binding == "closure":
        params = dict(net.named_parameters())
        u_fn = net
    else:
        params = {name: p.detach().clone().requires_grad_(True) for name, p in net.named_parameters()}

        def u_fn(zz, rr, tt):
            return torch.func.functional_call(net, params, (zz, rr, tt))

    jvp = P.average_velocity_jvp(u_fn, z, r, t, v_tangent=v_tangent)
    grads_jvp = torch.autograd.grad((weights * jvp.u).sum(), [params[n] for n in names])
    grads_plain = torch.autograd.grad((weights * u_fn(z, r, t)).sum(), [params[n] for n in names])
    for name, g_jvp, g_plain in zip(names, grads_jvp, grads_plain):
        torch.testing.assert_close(g_jvp, g_plain, rtol=1e-12, atol=1e-12, msg=name)


# ----------------------------------------------------------------------------- compound velocity, target

def test_compound_velocity_passes_no_gradient_into_dudt():
    u = gaussian((4, 3), 0).requires_grad_(True)
    dudt = gaussian((4, 3), 1).requires_grad_(True)
    r, t = torch.tensor([0.0, 0.1, 0.4, 0.5], dtype=torch.float64), torch.tensor([1.0, 0.5, 0.4, 0.9], dtype=torch.float64)
    V = P.compound_velocity(u, dudt, r, t)
    torch.testing.assert_close(V, u + (t - r)[:, None] * dudt, rtol=0, atol=1e-15)
    grad_u, grad_dudt = torch.autograd.grad(V.sum(), [u, dudt], allow_unused=True)
    assert torch.equal(grad_u, torch.ones_like(u))
    assert grad_dudt is None or torch.equal(grad_dudt, torch.zeros_like(dudt))


def test_meanflow_target_is_detached():
    v = gaussian((4, 3), 0).requires_grad_(True)
    dudt = gaussian((4, 3), 1).requires_grad_(True)
    r, t = torch.zeros(4, dtype=torch.float64), torch.full((4,), 0.5, dtype=torch.float64)
    target = P.meanflow_target(v, dudt, r, t)
    assert not target.requires_grad
    torch.testing.assert_close(target, v.detach() - 0.5 * dudt.detach(), rtol=0, atol=1e-15)


@given(seed=seeds(), batch=batch_sizes())
def test_compound_velocity_and_target_under_vmap_match_per_example_reference(seed, batch):
    u, dudt, v = gaussian((batch, 2, 3), seed), gaussian((batch, 2, 3), seed + 1), gaussian((batch, 2, 3), seed + 2)
    gen = generator(seed + 3)
    t = torch.rand(batch, generator=gen, dtype=torch.float64)
    r = t * torch.rand(batch, generator=gen, dtype=torch.float64)
    reference_V = torch.func.vmap(lambda u1, d1, r1, t1: u1 + (t1 - r1) * d1)(u, dudt, r, t)
    reference_target = torch.func.vmap(lambda v1, d1, r1, t1: v1 - (t1 - r1) * d1)(v, dudt, r, t)
    torch.testing.assert_close(P.compound_velocity(u, dudt, r, t), reference_V, rtol=0, atol=1e-14)
    torch.testing.assert_close(P.meanflow_target(v, dudt, r, t), reference_target, rtol=0, atol=1e-14)
    vmapped_V = torch.func.vmap(lambda u1, d1, r1, t1: P.compound_velocity(u1[None], d1[None], r1[None], t1[None])[0])
    torch.testing.assert_close(vmapped_V(u, dudt, r, t), reference_V, rtol=0, atol=1e-14)


# ----------------------------------------------------------------------------- tangent choices

def test_tangent_from_model_is_detached_diagonal_velocity():
    net = TimeMLP(dim=3, width=8, seed=5)
    z = gaussian((4, 3), 6)
    t = torch.tensor([0.0, 0.05, 0.5, 1.0], dtype=torch.float64)
    tangent = P.tangent_from_model(net, z, t)
    assert not tangent.requires_grad
    torch.testing.assert_close(tangent, net(z, t, t).detach(), rtol=0, atol=0)
    u_fn = P.u_fn_from_x_fn(net)
    tangent_aux = P.tangent_from_model(u_fn, z, t, has_aux=True)
    torch.testing.assert_close(tangent_aux, (z - net(z, t, t).detach()) / t.clamp(min=P.T_EPS)[:, None],
                               rtol=1e-12, atol=1e-12)


def test_tangent_conditional_and_v_head():
    x, e = gaussian((4, 3), 0), gaussian((4, 3), 1)
    assert torch.equal(P.tangent_conditional(x, e), e - x)
    v_theta = gaussian((4, 3), 2).requires_grad_(True)
    tangent = P.tangent_from_v_head(v_theta)
    assert not tangent.requires_grad and torch.equal(tangent, v_theta.detach())
