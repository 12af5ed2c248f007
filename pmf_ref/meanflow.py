"""The MeanFlow identity: the JVP that gives du/dt, the compound velocity and the target.

A network function here is a callable ``u_fn(z, r, t)`` returning the average velocity ``u`` of
shape like ``z`` -- or ``(u, aux)`` with ``has_aux=True`` (pMF returns x_hat as aux). Bind class
labels, guidance scale or parameters into it with a closure or ``torch.func.functional_call``.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
import torch.autograd.forward_ad as fwAD
import torch.func

from ._checks import check_float, check_r_le_t, check_same_shape, expand_like
from .fast_jvp import reference_ops_active
from .path import average_velocity_from_x

UFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any]


class AverageVelocityJVP(NamedTuple):
    u: torch.Tensor      # u(z, r, t), differentiable w.r.t. whatever u_fn closes over
    dudt: torch.Tensor   # du/dt = d_z u . v_tangent + d_t u
    aux: Any             # the aux output of u_fn (None without has_aux)


JVP_MODES = ("func", "forward_ad", "double_backward")
"""Routes of :func:`average_velocity_jvp`: ``torch.func.jvp`` (the readable reference), dual tensors
of ``torch.autograd.forward_ad`` (the fast one: same numbers, cheaper with the ops of ``pmf_ref.fast_jvp``),
or reverse mode twice (for ops without forward-mode AD; never the default)."""
JVP_MODE_DESCRIPTIONS = {"func": "torch.func.jvp through plain torch ops (the readable reference)",
                         "forward_ad": "torch.autograd.forward_ad dual tensors through pmf_ref.fast_jvp's ops, "
                                       "~2 forwards",
                         "double_backward": "torch.autograd.functional.jvp (reverse mode twice) plus a separate "
                                            "forward for u"}
"""One line per route of :data:`JVP_MODES`, for programs that report which one they run."""


def default_jvp_mode() -> str:
    """The route ``average_velocity_jvp(mode=None)`` takes here: "forward_ad", except "func" inside
    ``pmf_ref.reference_ops()`` and inside a ``torch.func`` transform (``vmap``, ``grad``, ...), where
    dual tensors cannot be made (``make_dual`` has no batching rule)."""
    # torch.func offers no public "am I inside a transform" query; this is what its own code reads.
    if reference_ops_active() or torch._C._functorch.peek_interpreter_stack() is not None:
        return "func"
    return "forward_ad"


def _primal(value: Any) -> Any:
    """Strip the tangents of the current dual level from a (nested tuple / list / dict of) tensor(s)."""
    if isinstance(value, torch.Tensor):
        return fwAD.unpack_dual(value).primal
    if isinstance(value, (tuple, list)):
        return type(value)(_primal(item) for item in value)
    if isinstance(value, dict):
        return {key: _primal(item) for key, item in value.items()}
    return value


def _jvp_forward_ad(u_fn: UFn, primals: tuple, tangents: tuple, has_aux: bool):
    """``torch.func.jvp``'s result, ``(u, du/dt, aux)``, computed with forward_ad dual tensors."""
    with fwAD.dual_level():
        output = u_fn(*(fwAD.make_dual(p, d) for p, d in zip(primals, tangents)))
        u, aux = output if has_aux else (output, None)
        u, dudt = fwAD.unpack_dual(u)
        aux = _primal(aux)
    # No tangent means u does not depend on (z, r, t): du/dt = 0, as torch.func.jvp returns.
    return u, (torch.zeros_like(u) if dudt is None else dudt.detach()), aux


def average_velocity_jvp(u_fn: UFn, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, *,
                         v_tangent: torch.Tensor, has_aux: bool = False,
                         mode: str | None = None) -> AverageVelocityJVP:
    """Total time derivative of u along the flow, ``du/dt = v . d_z u + d_t u``  (MeanFlow Eq. 8).

    One forward-mode pass with tangents given by name: ``dz = v_tangent`` (the instantaneous
    velocity), ``dr = 0``, ``dt = 1``. The primal output keeps its autograd graph, so a loss on ``u``
    back-propagates into the parameters ``u_fn`` closes over; callers stop the gradient of the
    tangent (:func:`compound_velocity`).

    Three routes, equal to rounding (tested on u, du/dt and every gradient), and a default:

    * ``mode="func"``: ``torch.func.jvp`` -- the readable reference; du/dt comes with its graph.
    * ``mode="forward_ad"``: the same JVP through ``torch.autograd.forward_ad`` dual tensors; with the
      ops of ``pmf_ref.fast_jvp`` it costs about two forwards (``torch.func.jvp`` takes a slower path
      through custom ``autograd.Function``s). du/dt is returned detached. Not inside ``vmap``.
    * ``mode="double_backward"``: du/dt by ``torch.autograd.functional.jvp`` (the double-vjp trick,
      for ops that have no forward-mode rule), detached, and u from a second, differentiable forward;
      the slowest route, kept as the reference for frameworks without forward-mode AD.
    * ``mode=None``: :func:`default_jvp_mode` -- "forward_ad", or "func" inside ``reference_ops()``
      and inside ``torch.func`` transforms.

    Args:
        u_fn: ``(z, r, t) -> u`` or ``-> (u, aux)``; z (B, ...), r and t (B,).
        z: point z_t, (B, ...).  r, t: times with 0 <= r <= t <= 1, (B,).
        v_tangent: tangent for z, same shape as ``z`` (detached here).
        has_aux: whether ``u_fn`` returns ``(u, aux)``.
        mode: one of :data:`JVP_MODES`, or None.
    Returns:
        ``AverageVelocityJVP(u, dudt, aux)``; u and dudt have the shape of ``z``.
    """
    check_float("z", z)
    check_float("v_tangent", v_tangent)
    check_same_shape("z", z, "v_tangent", v_tangent)
    check_r_le_t(r, t, like=z)
    mode = default_jvp_mode() if mode is None else mode
    if mode not in JVP_MODES:
        raise ValueError(f"mode must be one of {JVP_MODES} or None, got {mode!r}")
    tangent_z = v_tangent.detach()
    tangent_r = torch.zeros_like(r)  # r is held fixed: du/dt is a derivative in t alone
    tangent_t = torch.ones_like(t)
    if mode == "forward_ad":
        return AverageVelocityJVP(*_jvp_forward_ad(u_fn, (z, r, t), (tangent_z, tangent_r, tangent_t), has_aux))
    if mode == "double_backward":
        def u_only(*inputs):
            return u_fn(*inputs)[0] if has_aux else u_fn(*inputs)
        with torch.enable_grad():
            _, dudt = torch.autograd.functional.jvp(u_only, (z, r, t), (tangent_z, tangent_r, tangent_t))
        out = u_fn(z, r, t)
        u, aux = out if has_aux else (out, None)
        return AverageVelocityJVP(u, dudt.detach(), aux)
    if has_aux:
        u, dudt, aux = torch.func.jvp(u_fn, (z, r, t), (tangent_z, tangent_r, tangent_t), has_aux=True)
    else:
        (u, dudt), aux = torch.func.jvp(u_fn, (z, r, t), (tangent_z, tangent_r, tangent_t)), None
    return AverageVelocityJVP(u, dudt, aux)


def compound_velocity(u: torch.Tensor, dudt: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Compound velocity ``V = u + (t - r) sg(du/dt)``  (iMF; pMF Eq. 12, Alg. 1).

    By the MeanFlow identity V equals the instantaneous velocity v when u is the true average
    velocity, so V can regress the observable ``v`` while the gradient flows through u only.

    Args:
        u, dudt: (B, ...).  r, t: (B,) with r <= t.
    Returns:
        V, (B, ...).
    """
    check_same_shape("u", u, "dudt", dudt)
    check_r_le_t(r, t, like=u)
    return u + expand_like(t - r, u) * dudt.detach()


def meanflow_target(v: torch.Tensor, dudt: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Original MeanFlow target ``u_tgt = sg(v - (t - r) du/dt)``  (MeanFlow Eq. 10).

    ``||u - u_tgt||^2`` has the same value and the same gradient as ``||V - v||^2``; the two are
    the same loss written from either side of the identity.

    Args:
        v: velocity target, (B, ...).  dudt: (B, ...).  r, t: (B,).
    Returns:
        u_tgt, (B, ...), detached.
    """
    check_same_shape("v", v, "dudt", dudt)
    check_r_le_t(r, t, like=v)
    return (v - expand_like(t - r, v) * dudt).detach()


# ----------------------------------------------------------------------------- tangent choices

def tangent_from_model(u_fn: UFn, z: torch.Tensor, t: torch.Tensor, *, has_aux: bool = False) -> torch.Tensor:
    """Paper Alg. 1 tangent: the model's own instantaneous velocity ``sg(u_theta(z_t, t, t))``.

    Args:
        u_fn: as in :func:`average_velocity_jvp`.  z: (B, ...).  t: (B,).
    Returns:
        v_tangent, (B, ...), detached.
    """
    with torch.no_grad():
        u = u_fn(z, t, t)
    return (u[0] if has_aux else u).detach()


def tangent_from_v_head(v_theta: torch.Tensor) -> torch.Tensor:
    """Released-code (iMF) tangent: the auxiliary v-head's velocity, ``sg(v_theta(z_t, t))``.

    Args:
        v_theta: the v-head's prediction of the instantaneous velocity, (B, ...).
    Returns:
        v_tangent, (B, ...), detached.
    """
    return v_theta.detach()


def tangent_conditional(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Original MeanFlow tangent: the conditional velocity ``e - x`` (pass a guided velocity
    instead of this when training with CFG).

    Args:
        x, e: (B, ...).
    Returns:
        v_tangent = e - x, (B, ...).
    """
    check_same_shape("x", x, "e", e)
    return e - x


def u_fn_from_x_fn(x_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> UFn:
    """Wrap an x-prediction network ``x_fn(z, r, t) -> x_hat`` as ``u_fn(z, r, t) -> (u, x_hat)``
    with ``u = (z - x_hat) / max(t, t_eps)`` (pMF Eq. 11). Use it with ``has_aux=True``."""
    def u_fn(z, r, t):
        x_hat = x_fn(z, r, t)
        return average_velocity_from_x(z, x_hat, t), x_hat
    return u_fn
