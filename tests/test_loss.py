"""Tests of ``pmf_ref.loss``: reductions, adaptive weighting, stop-gradient structure, and the
assembled pMF / guided / flow-matching losses.

Oracles: per-example references under ``vmap``; a second formulation of the same loss
(``||u - sg(u_tgt)||^2`` via ``meanflow_target``; the r = t flow-matching loss); a hand-assembled
guided loss written here from ``torch.func.jvp`` and the paper's equations; and a Monte
Carlo check on Gaussian data that the loss gradient vanishes in conditional mean at the true field.
"""
import pytest
import torch
from hypothesis import example, given

import pmf_ref as P
from oracles import GaussianOracle
from strategies import (EDGE_CLIP, EDGE_EQUAL, EDGE_ONE_STEP, batch_sizes, data_shapes, gaussian, generator,
                        sample_shapes, seeds, time_pairs)
from test_meanflow import TimeMLP

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


# ----------------------------------------------------------------------------- squared error, weighting

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


# ----------------------------------------------------------------------------- stop-gradient structure

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


# ----------------------------------------------------------------------------- true field minimises the loss

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


# ----------------------------------------------------------------------------- guided loss

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
