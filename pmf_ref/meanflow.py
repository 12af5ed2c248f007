"""The MeanFlow identity: the JVP that gives du/dt, the compound velocity and the target.

A network function here is a callable ``u_fn(z, r, t)`` returning the average velocity ``u`` of
shape like ``z`` -- or ``(u, aux)`` with ``has_aux=True`` (pMF returns x_hat as aux). Bind class
labels, guidance scale or parameters into it with a closure or ``torch.func.functional_call``.
The JVP runs through ``torch.func.jvp`` unless the caller passes another engine with its signature
(``jvp=``); ``check_values=False`` skips the value checks of r and t (see ``pmf_ref/_checks.py``).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
import torch.func

from ._checks import check_float, check_r_le_t, check_same_shape, expand_like
from .path import average_velocity_from_x

UFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any]
JVPFn = Callable[..., tuple]
"""A JVP engine with ``torch.func.jvp``'s signature and results:
``jvp(fn, primals, tangents, has_aux=...) -> (outputs, tangents_out[, aux])``."""


class AverageVelocityJVP(NamedTuple):
    u: torch.Tensor      # u(z, r, t), differentiable w.r.t. whatever u_fn closes over
    dudt: torch.Tensor   # du/dt = d_z u . v_tangent + d_t u
    aux: Any             # the aux output of u_fn, primal only (None without has_aux)


def average_velocity_jvp(u_fn: UFn, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor, *,
                         v_tangent: torch.Tensor, has_aux: bool = False, jvp: JVPFn = torch.func.jvp,
                         check_values: bool = True) -> AverageVelocityJVP:
    """Total time derivative of u along the flow, ``du/dt = (d_z u) v + d_t u``  (MeanFlow Eq. 8).

    One forward-mode pass with tangents given by name: ``dz = v_tangent`` (the instantaneous
    velocity), ``dr = 0``, ``dt = 1``. The primal output keeps its autograd graph, so a loss on ``u``
    back-propagates into the parameters ``u_fn`` closes over; callers stop the gradient of the
    tangent (:func:`compound_velocity`).

    **Tangent-free auxiliary output.** With ``has_aux=True`` ``u_fn`` returns ``(u, aux)``; ``aux`` comes
    back as a primal (its value and its autograd graph, no tangent). Whatever needs no du/dt -- pMF's
    v-head, say -- can return an intermediate (the trunk's tokens) as ``aux`` and be finished from it
    *after* the JVP: it then carries no tangent work at all, with the same value and gradient.

    Args:
        u_fn: ``(z, r, t) -> u`` or ``-> (u, aux)``; z (B, ...), r and t (B,).
        z: point z_t, (B, ...).  r, t: times with 0 <= r <= t <= 1, (B,).
        v_tangent: tangent for z, same shape as ``z`` (detached here).
        has_aux: whether ``u_fn`` returns ``(u, aux)``.
        jvp: the engine, ``torch.func.jvp`` (the reference) or any function with its signature and
            results (the trainers pass a cheaper one, ``full/fast_jvp.py``'s ``jvp``).
        check_values: check 0 <= r <= t <= 1 (one host sync; a training step passes False).
    Returns:
        ``AverageVelocityJVP(u, dudt, aux)``; u and dudt have the shape of ``z``.
    """
    check_float("z", z)
    check_float("v_tangent", v_tangent)
    check_same_shape("z", z, "v_tangent", v_tangent)
    check_r_le_t(r, t, like=z, check_values=check_values)
    dz = v_tangent.detach()
    dr = torch.zeros_like(r)  # r is held fixed: du/dt is a derivative in t alone
    dt = torch.ones_like(t)
    result = jvp(u_fn, (z, r, t), (dz, dr, dt), has_aux=has_aux)
    u, dudt, aux = result if has_aux else (*result, None)
    return AverageVelocityJVP(u, dudt, aux)


def compound_velocity(u: torch.Tensor, dudt: torch.Tensor, r: torch.Tensor, t: torch.Tensor, *,
                      check_values: bool = True) -> torch.Tensor:
    """Compound velocity ``V = u + (t - r) sg(du/dt)``  (iMF; pMF Eq. 12, Alg. 1).

    By the MeanFlow identity V equals the instantaneous velocity v when u is the true average
    velocity, so V can regress the observable ``v`` while the gradient flows through u only.

    Args:
        u, dudt: (B, ...).  r, t: (B,) with r <= t.
    Returns:
        V, (B, ...).
    """
    check_same_shape("u", u, "dudt", dudt)
    check_r_le_t(r, t, like=u, check_values=check_values)
    return u + expand_like(t - r, u) * dudt.detach()


def meanflow_target(v: torch.Tensor, dudt: torch.Tensor, r: torch.Tensor, t: torch.Tensor, *,
                    check_values: bool = True) -> torch.Tensor:
    """Original MeanFlow target ``u_tgt = sg(v - (t - r) du/dt)``  (MeanFlow Eq. 10).

    ``||u - u_tgt||^2`` has the same value and the same gradient as ``||V - v||^2``; the two are
    the same loss written from either side of the identity.

    Args:
        v: velocity target, (B, ...).  dudt: (B, ...).  r, t: (B,).
    Returns:
        u_tgt, (B, ...), detached.
    """
    check_same_shape("v", v, "dudt", dudt)
    check_r_le_t(r, t, like=v, check_values=check_values)
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
