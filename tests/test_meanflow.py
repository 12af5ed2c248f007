"""Tests of ``pmf_ref.meanflow``: the JVP, the MeanFlow identity, compound velocity and tangents; the
guidance equations (gating, guided target, label replacement); the losses (reductions, adaptive
weighting, stop-gradient structure, the assembled pMF / guided / flow-matching losses).

Oracles: the Gaussian closed form (``tests/oracles.py``: analytic u, v, flow map and du/dt),
float64 central finite differences on small random networks (an MLP and an attention block
written here with matmul + softmax), per-example references under ``vmap``, autograd
of a plain forward pass, and explicit tables for the gating. For the losses: a second formulation of
the same loss (``||u - sg(u_tgt)||^2`` via ``meanflow_target``; the r = t flow-matching loss); a
hand-assembled guided loss written here from ``torch.func.jvp`` and the paper's equations; and a Monte
Carlo check on Gaussian data that the loss gradient vanishes in conditional mean at the true field.
"""
import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import pmf_ref as P
from oracles import GaussianOracle, integrate_velocity
from strategies import (EDGE_CLIP, EDGE_EQUAL, EDGE_ONE_STEP, batch_sizes, data_shapes, gaussian, generator,
                        guidance_scales, seeds, time_pairs, times)

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
GRAD_TOL = 1e-10


def _random_times(batch: int, seed: int, *, equal_rows: int = 1):
    """(r, t) float64 with the first ``equal_rows`` rows on r = t, one row at (0, 1) when B > 1."""
    gen = generator(seed)
    t = torch.rand(batch, generator=gen, dtype=torch.float64)
    r = t * torch.rand(batch, generator=gen, dtype=torch.float64)
    r[:equal_rows] = t[:equal_rows]
    if batch > equal_rows:
        r[-1], t[-1] = 0.0, 1.0
    return r, t


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


# ----------------------------------------------------------------------------- guidance equations: gating

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


# ----------------------------------------------------------------------------- guidance equations: guided velocity

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


# ----------------------------------------------------------------------------- guidance equations: label replacement, the target's omega

@given(seed=seeds(), batch=batch_sizes(16))
def test_drop_labels_replaces_only_dropped_rows(seed, batch):
    gen = generator(seed)
    y = torch.randint(0, 10, (batch,), generator=gen)
    dropped = P.label_drop_mask(batch, p=0.5, generator=gen)
    labels = P.drop_labels(y, dropped, null_label=10)
    assert torch.equal(labels[dropped], torch.full_like(y[dropped], 10))
    assert torch.equal(labels[~dropped], y[~dropped])


def test_guidance_scale_for_target_is_ungated_on_the_diagonal():
    omega = torch.tensor([3.0, 3.0, 3.0, 3.0])
    t = torch.tensor([0.9, 0.9, 0.5, 0.5])
    r = torch.tensor([0.9, 0.1, 0.5, 0.1])
    t_min, t_max = torch.tensor([0.2, 0.2, 0.6, 0.4]), torch.tensor([0.6, 0.6, 0.8, 0.6])
    got = P.guidance_scale_for_target(omega, r, t, t_min=t_min, t_max=t_max)
    assert got.tolist() == [3.0, 1.0, 3.0, 3.0]


# ----------------------------------------------------------------------------- losses: squared error, weighting

@given(shape=data_shapes(), seed=seeds())
def test_squared_error_is_per_example_sum(shape, seed):
    prediction, target = gaussian(shape, seed), gaussian(shape, seed + 1)
    reference = torch.func.vmap(lambda a, b: ((a - b) ** 2).sum())(prediction, target)
    torch.testing.assert_close(P.squared_error(prediction, target), reference, rtol=1e-13, atol=1e-13)
    vmapped = torch.func.vmap(lambda a, b: P.squared_error(a[None], b[None])[0])(prediction, target)
    torch.testing.assert_close(vmapped, reference, rtol=1e-13, atol=1e-13)


def test_squared_error_of_vectors_is_elementwise():
    prediction, target = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([0.0, 4.0, -1.0])
    assert torch.equal(P.squared_error(prediction, target), torch.tensor([1.0, 4.0, 0.0]))


@given(seed=seeds(), batch=batch_sizes())
@example(seed=0, batch=1)
@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_adaptively_weighted_value_and_gradient(p, seed, batch):
    """adp(L) = L / sg((L + c)^p): value L/(L+c)^p, gradient 1/(L+c)^p (not the full derivative)."""
    L = gaussian((batch,), seed).abs().mul(3.0).requires_grad_(True)
    weighted = P.adaptively_weighted(L, c=P.ADAPTIVE_C, p=p)
    expected = L.detach() / (L.detach() + P.ADAPTIVE_C) ** p
    torch.testing.assert_close(weighted.detach(), expected, rtol=1e-13, atol=1e-13)
    (grad,) = torch.autograd.grad(weighted.sum(), L)
    torch.testing.assert_close(grad, 1.0 / (L.detach() + P.ADAPTIVE_C) ** p, rtol=1e-13, atol=1e-13)
    vmapped = torch.func.vmap(lambda l1: P.adaptively_weighted(l1[None], p=p)[0])(L.detach())
    torch.testing.assert_close(vmapped, expected, rtol=1e-13, atol=1e-13)


# ----------------------------------------------------------------------------- losses: stop-gradient structure

def _param_grads(loss: torch.Tensor, net: torch.nn.Module):
    return torch.autograd.grad(loss, list(net.parameters()))


def _assert_grads_close(grads_a, grads_b, tol=GRAD_TOL):
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@given(seed=seeds(), batch=batch_sizes())
@example(seed=0, batch=3)
@pytest.mark.parametrize("p", [0.0, 1.0])
def test_pmf_loss_gradient_equals_detached_target_formulation(p, seed, batch):
    """grad ||u + (t-r) sg(du/dt) - v_t||^2 = grad ||u - sg(v_t - (t-r) du/dt)||^2 (same value too)."""
    x_net = TimeMLP(dim=4, width=12, seed=seed)
    x, e = gaussian((batch, 4), seed + 1), gaussian((batch, 4), seed + 2)
    r, t = _random_times(batch, seed + 3)
    terms = P.pmf_loss(x_net, x, e, r, t, p=p)

    u_fn = P.u_fn_from_x_fn(x_net)
    z_t = P.interpolate(x, e, t)
    v_t = P.target_velocity(z_t, x, t)
    jvp = P.average_velocity_jvp(u_fn, z_t, r, t, v_tangent=P.tangent_from_model(u_fn, z_t, t, has_aux=True),
                                 has_aux=True)
    second = P.adaptively_weighted(P.squared_error(jvp.u, P.meanflow_target(v_t, jvp.dudt, r, t)), p=p)
    torch.testing.assert_close(terms.loss, second, rtol=1e-12, atol=1e-12)
    _assert_grads_close(_param_grads(terms.loss.mean(), x_net), _param_grads(second.mean(), x_net))


def test_pmf_loss_gradient_differs_without_stop_gradient():
    """The check above can fail: differentiating through du/dt gives another gradient."""
    x_net = TimeMLP(dim=4, width=12, seed=1)
    x, e = gaussian((4, 4), 2), gaussian((4, 4), 3)
    r, t = _random_times(4, 4)
    terms = P.pmf_loss(x_net, x, e, r, t, p=0.0)
    u_fn = P.u_fn_from_x_fn(x_net)
    z_t = P.interpolate(x, e, t)
    tangent = P.tangent_from_model(u_fn, z_t, t, has_aux=True)
    # A JVP whose tangent keeps its graph (the core's does not: du/dt is stop-gradient by construction).
    u, dudt, _ = torch.func.jvp(u_fn, (z_t, r, t), (tangent, torch.zeros_like(r), torch.ones_like(t)), has_aux=True)
    no_stop = P.squared_error(u + (t - r)[:, None] * dudt, P.target_velocity(z_t, x, t))
    torch.testing.assert_close(terms.loss, no_stop, rtol=1e-12, atol=1e-12)  # same value ...
    difference = max((a - b).abs().max().item()
                     for a, b in zip(_param_grads(terms.loss.mean(), x_net), _param_grads(no_stop.mean(), x_net)))
    assert difference > 1e-4                                                 # ... other gradient


@given(seed=seeds(), batch=batch_sizes())
def test_velocity_loss_of_x_prediction_equals_pmf_loss(seed, batch):
    x_net = TimeMLP(dim=3, width=8, seed=seed)
    x, e = gaussian((batch, 3), seed + 1), gaussian((batch, 3), seed + 2)
    r, t = _random_times(batch, seed + 3)
    pmf = P.pmf_loss(x_net, x, e, r, t)
    velocity = P.velocity_loss(P.u_fn_from_x_fn(x_net), x, e, r, t, has_aux=True)
    for a, b in zip(pmf[:4], velocity[:4]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(pmf.aux, x_net(x * (1 - t[:, None]) + e * t[:, None], r, t), rtol=1e-13, atol=1e-13)


@given(seed=seeds(), batch=batch_sizes())
@example(seed=0, batch=3)
def test_velocity_loss_matches_hand_assembled_alg1(seed, batch):
    """u-prediction: tangent sg(u(z,t,t)), V = u + (t-r) sg(JVP), L = adp(sum (V - v_t)^2)."""
    u_net = TimeMLP(dim=3, width=8, seed=seed)
    x, e = gaussian((batch, 3), seed + 1), gaussian((batch, 3), seed + 2)
    r, t = _random_times(batch, seed + 3)
    terms = P.velocity_loss(u_net, x, e, r, t)

    z_t = (1 - t[:, None]) * x + t[:, None] * e
    v_t = (z_t - x) / t.clamp(min=P.T_EPS)[:, None]
    with torch.no_grad():
        tangent = u_net(z_t, t, t)
    u, dudt = torch.func.jvp(u_net, (z_t, r, t), (tangent, torch.zeros_like(r), torch.ones_like(t)))
    raw = ((u + (t - r)[:, None] * dudt.detach() - v_t) ** 2).sum(dim=1)
    loss = raw / (raw.detach() + P.ADAPTIVE_C)
    torch.testing.assert_close(terms.raw, raw, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(terms.loss, loss, rtol=1e-12, atol=1e-12)
    _assert_grads_close(_param_grads(terms.loss.sum(), u_net), _param_grads(loss.sum(), u_net))


@given(seed=seeds(), batch=batch_sizes())
@example(seed=0, batch=2)
def test_flow_matching_loss_equals_pmf_loss_on_diagonal(seed, batch):
    """At r = t the compound velocity is u, so pMF's loss with p = 0 is JiT's flow-matching loss."""
    x_net = TimeMLP(dim=3, width=8, seed=seed)
    x, e = gaussian((batch, 3), seed + 1), gaussian((batch, 3), seed + 2)
    _, t = _random_times(batch, seed + 3)
    t[0] = P.T_EPS / 2                                           # one row below the clip
    flow_matching = P.flow_matching_loss(x_net, x, e, t)
    pmf = P.pmf_loss(x_net, x, e, t.clone(), t, p=0.0)
    torch.testing.assert_close(flow_matching, pmf.loss, rtol=1e-12, atol=1e-12)
    _assert_grads_close(_param_grads(flow_matching.sum(), x_net), _param_grads(pmf.loss.sum(), x_net))


# ----------------------------------------------------------------------------- losses: true field minimises the loss

MC_SAMPLES = 4000
MC_SIGMAS = 5.0
"""Tolerance in Monte Carlo standard errors (fixed seeds, 12 coordinates)."""


def _conditional_mean_gradient(parametrisation: str, oracle_net: GaussianOracle, oracle_data: GaussianOracle):
    """Mean over x, e | z_t of d L / d(offset), L the unweighted (p = 0) velocity loss, for 4 fixed z_t.

    The network is the average velocity of ``oracle_net`` (u-prediction) or the x-field built from it
    (x-prediction), plus a zero offset per z_t whose gradient is the conditional mean gradient.
    Returns (mean gradient (4, D), standard error (4, D), v of net - v of data at z_t (4, D)).
    """
    t_points = torch.tensor([0.3, 0.6, 0.9, 1.0], dtype=torch.float64)
    r_points = torch.tensor([0.0, 0.2, 0.9, 0.0], dtype=torch.float64)
    z_points = gaussian((4, 3), 100)
    group = torch.arange(4).repeat_interleave(MC_SAMPLES)
    z, r, t = z_points[group], r_points[group], t_points[group]
    x, e = oracle_data.sample_posterior(z, t, generator(101))
    offset = torch.zeros(4, 3, dtype=torch.float64, requires_grad=True)

    if parametrisation == "u":
        terms = P.velocity_loss(lambda zz, rr, tt: oracle_net.u_fn(zz, rr, tt) + offset[group], x, e, r, t, p=0.0)
        scale = torch.ones(4, dtype=torch.float64)
    else:
        def x_fn(zz, rr, tt):
            return zz - tt.clamp(min=P.T_EPS)[:, None] * oracle_net.u_fn(zz, rr, tt) + offset[group]
        terms = P.pmf_loss(x_fn, x, e, r, t, p=0.0)
        scale = 1.0 / t_points.clamp(min=P.T_EPS)                # d u / d x_hat = -1 / max(t, t_eps)
    (grad,) = torch.autograd.grad(terms.loss.sum() / MC_SAMPLES, offset)
    # d L / d V = 2 (V - v_t); v_t = e - x has conditional std posterior_std / t per coordinate.
    standard_error = 2 * scale * oracle_data.posterior_std(t_points) / t_points / MC_SAMPLES ** 0.5
    velocity_gap = oracle_net.velocity(z_points, t_points) - oracle_data.velocity(z_points, t_points)
    return grad, standard_error[:, None].expand(4, 3), velocity_gap


@pytest.mark.parametrize("parametrisation", ["u", "x"])
def test_loss_gradient_vanishes_in_conditional_mean_at_true_field(parametrisation):
    oracle = GaussianOracle(mu=torch.tensor([0.5, -1.0, 0.2], dtype=torch.float64), sigma=0.7, s=1.0)
    grad, standard_error, _ = _conditional_mean_gradient(parametrisation, oracle, oracle)
    assert (grad.abs() <= MC_SIGMAS * standard_error).all(), (grad / standard_error)


@pytest.mark.parametrize("parametrisation", ["u", "x"])
def test_loss_gradient_does_not_vanish_at_perturbed_field(parametrisation):
    """A self-consistent but wrong field (mean shifted by 0.3): mean gradient = +-2 (v_net - v) scaled."""
    oracle = GaussianOracle(mu=torch.tensor([0.5, -1.0, 0.2], dtype=torch.float64), sigma=0.7, s=1.0)
    wrong = GaussianOracle(mu=oracle.mu + 0.3, sigma=0.7, s=1.0)
    grad, standard_error, gap = _conditional_mean_gradient(parametrisation, wrong, oracle)
    t_points = torch.tensor([0.3, 0.6, 0.9, 1.0], dtype=torch.float64)
    expected = 2 * gap if parametrisation == "u" else -2 * gap / t_points[:, None]
    assert (grad - expected).abs().max() <= MC_SIGMAS * standard_error.max()
    assert (grad.abs() > MC_SIGMAS * standard_error).any()


# ----------------------------------------------------------------------------- losses: guided loss

class ConditionedMLP(torch.nn.Module):
    """x_net(z, r, t, cond) or v_net(z, t, cond): an MLP on [z, r, t, cond] (cond: (B, k) tensor)."""

    def __init__(self, dim: int, cond_dim: int, seed: int):
        super().__init__()
        self.inner = TimeMLP(dim + cond_dim, 16, seed)
        self.dim = dim

    def forward(self, z, r, t, cond):
        return self.inner(torch.cat([z, cond], dim=1), r, t)[:, : self.dim]


NULL = 0.0   # the "null label" feature of the toy conditioning


def _guided_setup(seed: int, batch: int):
    """Two conditioned MLPs (u-head, v-head) on the conditioning [label feature, 1 - 1/omega], the bound
    network callables of pmf_guided_loss, and the draws (first half of the rows r = t, as released)."""
    x_head, v_head = ConditionedMLP(3, 2, seed), ConditionedMLP(3, 2, seed + 1)
    x, e = gaussian((batch, 3), seed + 2), gaussian((batch, 3), seed + 3)
    gen = generator(seed + 4)
    r, t = P.sample_time_pair_released(batch, generator=gen, dtype=torch.float64)
    omega = P.sample_omega(batch, generator=gen, dtype=torch.float64)
    t_min, t_max = P.sample_guidance_interval(r, t, generator=gen)
    dropped = P.label_drop_mask_diagonal(r, t, p=0.5, generator=gen)
    label = gaussian((batch, 1), seed + 6)

    def cond_of(label_feature, w):
        return torch.cat([label_feature, (1 - 1 / w)[:, None]], dim=1)

    label_dropped = torch.where(dropped[:, None], torch.full_like(label, NULL), label)

    def denoise_uv(z, rr, tt):
        cond = cond_of(label_dropped, omega)
        return x_head(z, rr, tt, cond), v_head(z, rr, tt, cond)

    def guidance_denoise(z, tt, w):
        return v_head(z, tt, tt, cond_of(label, w)), v_head(z, tt, tt, cond_of(torch.full_like(label, NULL),
                                                                              torch.ones_like(w)))
    nets = dict(x_head=x_head, v_head=v_head, label=label, label_dropped=label_dropped, cond_of=cond_of)
    kw = dict(omega=omega, t_min=t_min, t_max=t_max, dropped=dropped)
    return denoise_uv, guidance_denoise, nets, x, e, r, t, kw


@given(seed=seeds(), batch=batch_sizes(8))
@example(seed=0, batch=4)
def test_pmf_guided_loss_matches_hand_assembled_reference(seed, batch):
    denoise_uv, guidance_denoise, nets, x, e, r, t, kw = _guided_setup(seed, batch)
    terms = P.pmf_guided_loss(denoise_uv, guidance_denoise, x, e, r, t, **kw)
    x_head, v_head, cond_of = nets["x_head"], nets["v_head"], nets["cond_of"]

    clip = t.clamp(min=P.T_EPS)[:, None]
    z_t = (1 - t[:, None]) * x + t[:, None] * e
    v_t = (z_t - x) / clip
    omega = kw["omega"]
    inside = (t >= kw["t_min"]) & (t <= kw["t_max"])
    w = torch.where((r == t) | inside, omega, torch.ones_like(omega))
    with torch.no_grad():
        v_c = (z_t - v_head(z_t, t, t, cond_of(nets["label"], w))) / clip
        v_n = (z_t - v_head(z_t, t, t, cond_of(torch.full_like(nets["label"], NULL), torch.ones_like(w)))) / clip
    v_g = v_t + (1 - 1 / w)[:, None] * (v_c - v_n)
    v_g = torch.where(kw["dropped"][:, None], v_t, v_g)
    cond = cond_of(nets["label_dropped"], omega)

    def u_fn(z, rr, tt):
        c = tt.clamp(min=P.T_EPS)[:, None]
        return (z - x_head(z, rr, tt, cond)) / c, (z - v_head(z, rr, tt, cond)) / c

    u, dudt, v = torch.func.jvp(u_fn, (z_t, r, t), (v_c, torch.zeros_like(r), torch.ones_like(t)), has_aux=True)
    raw_u = ((u + (t - r)[:, None] * dudt.detach() - v_g) ** 2).sum(dim=1)
    raw_v = ((v - v_g) ** 2).sum(dim=1)
    loss_u, loss_v = raw_u / (raw_u.detach() + P.ADAPTIVE_C), raw_v / (raw_v.detach() + P.ADAPTIVE_C)

    torch.testing.assert_close(terms.v_g, v_g, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(terms.raw_u, raw_u, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(terms.raw_v, raw_v, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(terms.loss_u, loss_u, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(terms.loss_v, loss_v, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(terms.x_pred, z_t - t[:, None] * u, rtol=1e-13, atol=1e-13)
    assert not terms.v_g.requires_grad
    params = list(x_head.parameters()) + list(v_head.parameters())
    _assert_grads_close(torch.autograd.grad((terms.loss_u + terms.loss_v).mean(), params),
                        torch.autograd.grad((loss_u + loss_v).mean(), params), tol=1e-9)


def test_pmf_guided_loss_gradients_reach_each_head_only_through_its_own_term():
    """L_u trains only the u-head (tangent and target are detached); L_v trains only the v-head."""
    denoise_uv, guidance_denoise, nets, x, e, r, t, kw = _guided_setup(3, 6)
    terms = P.pmf_guided_loss(denoise_uv, guidance_denoise, x, e, r, t, **kw)
    grads_u_on_v = torch.autograd.grad(terms.loss_u.sum(), list(nets["v_head"].parameters()), retain_graph=True,
                                       allow_unused=True)
    assert all(g is None or torch.equal(g, torch.zeros_like(g)) for g in grads_u_on_v)
    grads_v_on_x = torch.autograd.grad(terms.loss_v.sum(), list(nets["x_head"].parameters()), allow_unused=True)
    assert all(g is None or torch.equal(g, torch.zeros_like(g)) for g in grads_v_on_x)


def test_pmf_guided_target_is_v_t_for_unit_omega_dropped_rows_and_outside_the_interval():
    denoise_uv, guidance_denoise, nets, x, e, r, t, kw = _guided_setup(7, 8)
    v_t = P.target_velocity(P.interpolate(x, e, t), x, t)

    def v_g(**changes):
        return P.pmf_guided_loss(denoise_uv, guidance_denoise, x, e, r, t, **dict(kw, **changes)).v_g

    torch.testing.assert_close(v_g(omega=torch.ones_like(kw["omega"])), v_t, rtol=0, atol=0)
    torch.testing.assert_close(v_g(omega=torch.full_like(kw["omega"], 5.0), dropped=torch.ones_like(r, dtype=torch.bool)
                                   & (r == t))[r == t], v_t[r == t], rtol=0, atol=0)
    # r < t rows outside their interval regress v_t; r = t rows keep the ungated omega.
    outside = v_g(omega=torch.full_like(kw["omega"], 5.0), dropped=torch.zeros_like(kw["dropped"]),
                  t_min=torch.ones_like(t), t_max=torch.ones_like(t))
    off_diagonal = (r < t) & (t < 1)
    torch.testing.assert_close(outside[off_diagonal], v_t[off_diagonal], rtol=0, atol=0)
    assert not torch.allclose(outside[r == t], v_t[r == t])


@pytest.mark.parametrize("loss", ["pmf", "guided"])
def test_denoised_output_has_parameter_gradients_of_plain_forward(loss):
    """The returned x_hat / x_pred (for a perceptual loss) back-propagates like the u-head's own
    denoised image (pmf_loss) or like ``z_t - t u`` (pmf_guided_loss)."""
    denoise_uv, guidance_denoise, nets, x, e, r, t, kw = _guided_setup(11, 5)
    x_head = nets["x_head"]
    z_t = P.interpolate(x, e, t)
    weights = gaussian((5, 3), 12)
    cond = nets["cond_of"](nets["label_dropped"], kw["omega"])
    if loss == "pmf":
        def x_fn(z, rr, tt):
            return x_head(z, rr, tt, cond)
        x_hat = P.pmf_loss(x_fn, x, e, r, t).aux
        reference = x_head(z_t, r, t, cond)
    else:
        x_hat = P.pmf_guided_loss(denoise_uv, guidance_denoise, x, e, r, t, **kw).x_pred
        u = (z_t - x_head(z_t, r, t, cond)) / t.clamp(min=P.T_EPS)[:, None]
        reference = z_t - t[:, None] * u
    params = list(x_head.parameters())
    _assert_grads_close(torch.autograd.grad((weights * x_hat).sum(), params),
                        torch.autograd.grad((weights * reference).sum(), params), tol=1e-12)
