"""The training-step and sampling variants the benchmarks time, all composed of ``pmf_ref`` calls.

Every variant runs on one of two paths (:data:`PATHS`, :func:`on_path`):

* ``old``: the reference route inside ``full.fast_jvp.reference_ops()`` (``ENGINE_DESCRIPTIONS["func"]``);
* ``new``: the trainers' engine, ``full.fast_jvp.jvp`` (``ENGINE_DESCRIPTIONS["forward_ad"]``: one-GEMM
  linear tangents, no tangent graph, no tangent kept by saved tensors).

A variant is a zero-argument callable over fixed tensors, so repeated calls do identical work:

* ``forward``: the no-grad forward of the u path, ``x_fn(z_t, r, t)`` (the unit of the JVP's cost);
* ``jvp``: the core's JVP under ``no_grad`` (primal + tangent), tangent v = e - x;

* ``flow_matching``: JiT baseline, ``pmf_ref.flow_matching_loss`` (r = t, no JVP) + backward.
* ``alg1``: pMF Alg. 1, ``pmf_ref.pmf_loss`` (no-grad tangent pass + the core's forward-mode JVP,
  ``pmf_ref.average_velocity_jvp``, whose primal keeps its graph) + backward.
* ``released``: the released recipe (two v-head passes, JVP of the u-head, v-head loss) + backward,
  through ``full.step.TrainingStep`` (perceptual loss off: its frozen LPIPS / ConvNeXt nets are
  an extra cost that does not depend on the method).

JVP strategies for the same Alg. 1 loss (benchmark-only alternatives, identical value and gradient):

* ``jvp_primal_grad``: the core's way, one forward-mode JVP whose primal output is differentiated;
* ``jvp_func_route``: the same with the engine ``torch.func.jvp`` (the core's default), which takes
  functorch's slower path through the custom ops;
* ``jvp_nograd_plus_forward``: the core's JVP under ``torch.no_grad()`` (tangent only, nothing
  saved for backward), then a separate differentiable forward for u;
* ``double_backward``: the engine ``full.fast_jvp.double_backward_jvp`` (reverse mode twice, then a
  separate differentiable forward) -- the reference for frameworks without forward-mode AD.
"""
from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple

import torch

import pmf_ref as P

from .. import fast_jvp

XFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Batch(NamedTuple):
    x: torch.Tensor   # data, (B, ...)
    e: torch.Tensor   # noise (already scaled), (B, ...)
    r: torch.Tensor   # (B,)
    t: torch.Tensor   # (B,), r <= t


PATHS = ("old", "new")
"""``old``: inside ``full.fast_jvp.reference_ops()`` (the reference route); ``new``: the fast engine."""


def on_path(fn: Callable, path: str) -> Callable:
    """``fn`` run on ``path``: inside ``full.fast_jvp.reference_ops()`` for "old", as is for "new"."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")

    def call():
        with fast_jvp.reference_ops() if path == "old" else contextlib.nullcontext():
            return fn()
    return call


# ----------------------------------------------------------------------------- forward and JVP

def u_forward(x_fn: XFn, batch: Batch) -> torch.Tensor:
    """The no-grad forward of the u path at the batch's (z_t, r, t), (B, ...)."""
    with torch.no_grad():
        return x_fn(P.interpolate(batch.x, batch.e, batch.t), batch.r, batch.t)


def u_jvp(x_fn: XFn, batch: Batch) -> torch.Tensor:
    """The core's JVP under ``no_grad`` (primal u and tangent du/dt, tangent v = e - x); returns du/dt."""
    with torch.no_grad():
        z_t = P.interpolate(batch.x, batch.e, batch.t)
        v = P.tangent_conditional(batch.x, batch.e)
        return P.average_velocity_jvp(P.u_fn_from_x_fn(x_fn), z_t, batch.r, batch.t, v_tangent=v, has_aux=True,
                                      jvp=fast_jvp.jvp).dudt


# ----------------------------------------------------------------------------- per-sample losses

def flow_matching_loss(x_fn: XFn, batch: Batch) -> torch.Tensor:
    """JiT-style flow matching on the same network (r = t): ``pmf_ref.flow_matching_loss``, (B,)."""
    return P.flow_matching_loss(x_fn, batch.x, batch.e, batch.t)


def alg1_loss(x_fn: XFn, batch: Batch) -> torch.Tensor:
    """pMF Alg. 1 as the core computes it (``pmf_ref.pmf_loss``), (B,)."""
    return P.pmf_loss(x_fn, batch.x, batch.e, batch.r, batch.t, jvp=fast_jvp.jvp).loss


def _alg1_from_dudt(u_fn: Callable, z_t, v_t, batch: Batch, dudt: torch.Tensor) -> torch.Tensor:
    """The Alg. 1 loss given a du/dt computed elsewhere: a differentiable forward for u, then the
    core's compound velocity, squared error and adaptive weight (what ``meanflow_loss`` does)."""
    u, _ = u_fn(z_t, batch.r, batch.t)
    compound = P.compound_velocity(u, dudt, batch.r, batch.t)
    return P.adaptively_weighted(P.squared_error(compound, v_t))


def alg1_loss_nograd_jvp(x_fn: XFn, batch: Batch) -> torch.Tensor:
    """Alg. 1 with the core's JVP run under ``no_grad`` plus a separate forward with gradient, (B,)."""
    u_fn = P.u_fn_from_x_fn(x_fn)
    z_t = P.interpolate(batch.x, batch.e, batch.t)
    v_t = P.target_velocity(z_t, batch.x, batch.t)
    v_tangent = P.tangent_from_model(u_fn, z_t, batch.t, has_aux=True)
    with torch.no_grad():
        dudt = P.average_velocity_jvp(u_fn, z_t, batch.r, batch.t, v_tangent=v_tangent, has_aux=True,
                                      jvp=fast_jvp.jvp).dudt
    return _alg1_from_dudt(u_fn, z_t, v_t, batch, dudt)


def alg1_loss_with_jvp_engine(engine: str) -> Callable[[XFn, Batch], torch.Tensor]:
    """Alg. 1 as ``pmf_ref.pmf_loss`` computes it, with the JVP engine ``full.fast_jvp.ENGINES[engine]``, (B,)."""
    def loss(x_fn: XFn, batch: Batch) -> torch.Tensor:
        u_fn = P.u_fn_from_x_fn(x_fn)
        z_t = P.interpolate(batch.x, batch.e, batch.t)
        v_t = P.target_velocity(z_t, batch.x, batch.t)
        v_tangent = P.tangent_from_model(u_fn, z_t, batch.t, has_aux=True)
        jvp = P.average_velocity_jvp(u_fn, z_t, batch.r, batch.t, v_tangent=v_tangent, has_aux=True,
                                     jvp=fast_jvp.ENGINES[engine])
        compound = P.compound_velocity(jvp.u, jvp.dudt, batch.r, batch.t)
        return P.adaptively_weighted(P.squared_error(compound, v_t))
    return loss


ALG1_STRATEGIES: dict[str, Callable[[XFn, Batch], torch.Tensor]] = {
    "jvp_primal_grad": alg1_loss,
    "jvp_func_route": alg1_loss_with_jvp_engine("func"),
    "jvp_nograd_plus_forward": alg1_loss_nograd_jvp,
    "double_backward": alg1_loss_with_jvp_engine("double_backward"),
}


# ----------------------------------------------------------------------------- steps

def training_step(loss_fn: Callable[[], torch.Tensor], parameters: list[torch.nn.Parameter]) -> Callable[[], None]:
    """``() -> None``: clear gradients, batch-mean of the per-sample loss, backward.

    No optimizer update: it costs the same for every variant and is not what the issue compares.
    """
    def step() -> None:
        for parameter in parameters:
            parameter.grad = None
        loss_fn().mean().backward()
    return step


def sampling_calls(x_fn: XFn, e: torch.Tensor, *, euler_steps: int) -> dict[str, Callable[[], torch.Tensor]]:
    """The sampling variants on the same network and noise:

    * ``bare_forward``: ``x_fn(e, r=0, t=1)`` under ``no_grad`` (the floor of 1-NFE sampling);
    * ``one_step``: ``pmf_ref.sample_one_step`` (x = e - u(e, 0, 1));
    * ``euler``: ``pmf_ref.sample_multi_step`` with ``euler_steps`` steps.
    """
    zeros = torch.zeros(e.shape[0], device=e.device, dtype=e.dtype)
    ones = torch.ones(e.shape[0], device=e.device, dtype=e.dtype)
    u_fn = P.u_fn_from_x_fn(x_fn)

    def bare_forward() -> torch.Tensor:
        with torch.no_grad():
            return x_fn(e, zeros, ones)

    return {"bare_forward": bare_forward,
            "one_step": lambda: P.sample_one_step(u_fn, e, has_aux=True),
            f"euler{euler_steps}": lambda: P.sample_multi_step(u_fn, e, steps=euler_steps, has_aux=True)}
