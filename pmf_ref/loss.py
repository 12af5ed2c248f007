"""Per-sample losses: squared error, adaptive weighting, and the assembled pMF / flow-matching losses.

Every function returns one value per example, shape (B,); the caller takes the batch mean last.
The losses with a JVP pass ``jvp=`` (the engine, default ``torch.func.jvp``) through to
:func:`pmf_ref.average_velocity_jvp`.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
import torch.func

from ._checks import check_float, check_r_le_t, check_same_shape, check_time, expand_like
from .guidance import guidance_scale_for_target, guided_velocity
from .meanflow import (JVPFn, average_velocity_jvp, compound_velocity, tangent_from_model,
                       tangent_from_v_head, u_fn_from_x_fn)
from .path import average_velocity_from_x, denoised_image, interpolate, target_velocity

ADAPTIVE_C = 0.01
"""Constant c of the adaptive weight (pMF and MeanFlow); keeps the weight finite as L -> 0."""
ADAPTIVE_P = 1.0
"""Power p of the adaptive weight: pMF uses 1 (MeanFlow ablated 0.5, 0.75, 1); p = 0 turns it off."""


def squared_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample squared error ``L = sum_{non-batch dims} (prediction - target)^2``.

    A **sum**, not a mean (pMF Sec. 4): the adaptive weight's constant c is relative to this scale.

    Args:
        prediction, target: (B, ...).
    Returns:
        L, (B,).
    """
    check_float("prediction", prediction)
    check_float("target", target)
    check_same_shape("prediction", prediction, "target", target)
    return (prediction - target).square().flatten(1).sum(dim=1) if prediction.ndim > 1 \
        else (prediction - target).square()


def adaptively_weighted(loss: torch.Tensor, *, c: float = ADAPTIVE_C, p: float = ADAPTIVE_P) -> torch.Tensor:
    """Adaptive loss weighting ``adp(L) = L / sg((L + c)^p)``  (MeanFlow Sec. 4.3, pMF Sec. 4).

    Its value is ~1 for large L, but its gradient is that of ``L`` scaled by ``1 / (L + c)^p``:
    with p = 1 the gradient is that of log(L + c), a robust (Cauchy-like) loss.

    Args:
        loss: per-sample losses, (B,), non-negative.  c: > 0.  p: >= 0.
    Returns:
        weighted losses, (B,).
    """
    check_float("loss", loss)
    if not c > 0 or c == float("inf"):       # written so that NaN fails too
        raise ValueError(f"c must be > 0 and finite, got {c}")
    if not p >= 0 or p == float("inf"):
        raise ValueError(f"p must be >= 0 and finite, got {p}")
    return loss / (loss.detach() + c) ** p


class MeanFlowLossTerms(NamedTuple):
    loss: torch.Tensor      # adaptively weighted per-sample loss, (B,)
    raw: torch.Tensor       # per-sample sum of squares before weighting, (B,)
    u: torch.Tensor         # u_theta(z_t, r, t), (B, ...)
    dudt: torch.Tensor      # du/dt from the JVP, (B, ...)
    aux: Any                # aux of u_fn (x_hat for pMF)


def meanflow_loss(u_fn: Callable, z_t: torch.Tensor, r: torch.Tensor, t: torch.Tensor, *,
                  v_target: torch.Tensor, v_tangent: torch.Tensor, has_aux: bool = False,
                  c: float = ADAPTIVE_C, p: float = ADAPTIVE_P, jvp: JVPFn = torch.func.jvp) -> MeanFlowLossTerms:
    """iMF velocity loss ``adp(|| u + (t - r) sg(du/dt) - sg(v_target) ||^2)``  (pMF Eq. 12).

    Args:
        u_fn: ``(z, r, t) -> u`` (or ``(u, aux)`` with has_aux).
        z_t: (B, ...).  r, t: (B,).  v_target: regression target, (B, ...), detached here.
        v_tangent: JVP tangent for z (see the ``tangent_*`` functions), (B, ...).
        jvp: the JVP engine (:func:`pmf_ref.average_velocity_jvp`).
    Returns:
        ``MeanFlowLossTerms``.
    """
    check_same_shape("z_t", z_t, "v_target", v_target)
    result = average_velocity_jvp(u_fn, z_t, r, t, v_tangent=v_tangent, has_aux=has_aux, jvp=jvp)
    V = compound_velocity(result.u, result.dudt, r, t)
    raw = squared_error(V, v_target.detach())
    return MeanFlowLossTerms(adaptively_weighted(raw, c=c, p=p), raw, result.u, result.dudt, result.aux)


def pmf_loss(x_fn: Callable, x: torch.Tensor, e: torch.Tensor, r: torch.Tensor, t: torch.Tensor, *,
             c: float = ADAPTIVE_C, p: float = ADAPTIVE_P, jvp: JVPFn = torch.func.jvp) -> MeanFlowLossTerms:
    """pMF loss of the paper's Alg. 1 for an x-prediction network ``x_fn(z, r, t) -> x_hat``.

    ``z_t = (1-t) x + t e``; ``u = (z_t - x_hat) / max(t, t_eps)``; tangent ``sg(u(z_t, t, t))``;
    target the clipped ``v_t``; loss ``adp(||u + (t - r) sg(du/dt) - v_t||^2)``. aux = x_hat.

    Args:
        x_fn: x-prediction network, (B, ...), (B,), (B,) -> (B, ...).
        x, e: data and noise, (B, ...).  r, t: (B,), 0 <= r <= t <= 1.
    Returns:
        ``MeanFlowLossTerms`` with per-sample terms.
    """
    return velocity_loss(u_fn_from_x_fn(x_fn), x, e, r, t, has_aux=True, c=c, p=p, jvp=jvp)


def velocity_loss(u_fn: Callable, x: torch.Tensor, e: torch.Tensor, r: torch.Tensor, t: torch.Tensor, *,
                  has_aux: bool = False, c: float = ADAPTIVE_C, p: float = ADAPTIVE_P,
                  jvp: JVPFn = torch.func.jvp) -> MeanFlowLossTerms:
    """Alg. 1 loss for any parametrisation given as ``u_fn`` (x-prediction via
    :func:`u_fn_from_x_fn`, or a network that outputs u directly, as in iMF).

    Args / Returns: as :func:`pmf_loss`.
    """
    check_r_le_t(r, t, like=x)
    z_t = interpolate(x, e, t)
    v_t = target_velocity(z_t, x, t)
    v_tangent = tangent_from_model(u_fn, z_t, t, has_aux=has_aux)
    return meanflow_loss(u_fn, z_t, r, t, v_target=v_t, v_tangent=v_tangent, has_aux=has_aux, c=c, p=p, jvp=jvp)


class GuidedLossTerms(NamedTuple):
    loss_u: torch.Tensor    # adp(||V - v_g||^2), (B,)
    loss_v: torch.Tensor    # adp(||v_theta - v_g||^2), (B,)
    raw_u: torch.Tensor     # (B,)
    raw_v: torch.Tensor     # (B,)
    x_pred: torch.Tensor    # z_t - t u (unclipped t), the perceptual loss's input, (B, ...), with grad
    v_g: torch.Tensor       # guided target, (B, ...)


def pmf_guided_loss(denoise_uv: Callable, guidance_denoise: Callable, x: torch.Tensor, e: torch.Tensor,
                    r: torch.Tensor, t: torch.Tensor, *, omega: torch.Tensor, t_min: torch.Tensor,
                    t_max: torch.Tensor, dropped: torch.Tensor,
                    c: float = ADAPTIVE_C, p: float = ADAPTIVE_P, jvp: JVPFn = torch.func.jvp) -> GuidedLossTerms:
    """The pMF ImageNet loss exactly as the authors' released code computes it (``pixelMeanFlow.forward``).

    Network callables (the caller binds labels and conditioning; both return denoised *images*):

    * ``denoise_uv(z, r, t) -> (x_hat_u, x_hat_v)``: u-head and v-head of one forward, at h = t - r,
      with the row's label *after* dropout, its omega and its interval [t_min, t_max].
    * ``guidance_denoise(z, t, omega_target) -> (x_hat_c, x_hat_n)``: the v-head at h = 0 and interval
      [0, 1], with the *original* label at ``omega_target`` and with the null label at omega 1; called
      once, without gradient (one batched pass).

    Steps (velocities are ``(z_t - x_hat) / max(t, t_eps)``, :func:`average_velocity_from_x`):

    1. ``omega' = omega`` on r = t rows, else gated by the row's interval (:func:`guidance_scale_for_target`);
    2. ``v_c, v_n`` from ``guidance_denoise``; ``v_g = v_t + (1 - 1/omega')(v_c - v_n)``, and ``v_g = v_t`` on
       label-dropped rows (iMF Eq. 13, pMF App. A);
    3. one JVP of ``(z, r, t) -> u`` with tangents (dz, dr, dt) = (v_c, 0, 1); its auxiliary output is the
       v-head's ``v_theta`` of the same forward (the v-head is trained at h = t - r here);
    4. ``L_u = adp(||u + (t - r) sg(du/dt) - v_g||^2)`` and ``L_v = adp(||v_theta - v_g||^2)`` (pMF Eq. 12);
    5. ``x_pred = z_t - t u`` with the unclipped t (:func:`denoised_image`) for the perceptual terms.

    Args:
        x, e: data and noise, (B, ...).  r, t: (B,), 0 <= r <= t <= 1.
        omega: (B,) >= 1.  t_min, t_max: (B,) guidance interval.  dropped: bool (B,) label-drop mask.
    Returns:
        ``GuidedLossTerms``, per-sample (B,) terms, x_pred for a perceptual loss, and v_g.
    """
    check_r_le_t(r, t, like=x)
    z_t = interpolate(x, e, t)
    v_t = target_velocity(z_t, x, t)
    omega_target = guidance_scale_for_target(omega, r, t, t_min=t_min, t_max=t_max)
    with torch.no_grad():
        x_hat_c, x_hat_n = guidance_denoise(z_t, t, omega_target)
        v_c = average_velocity_from_x(z_t, x_hat_c, t)
        v_n = average_velocity_from_x(z_t, x_hat_n, t)
        v_g = guided_velocity(v_t, v_c, v_n, omega_target)
        v_g = torch.where(expand_like(dropped, v_t), v_t, v_g)   # dropped rows regress the unguided v_t

    def u_fn(z, r_, t_):
        x_hat_u, x_hat_v = denoise_uv(z, r_, t_)
        return average_velocity_from_x(z, x_hat_u, t_), average_velocity_from_x(z, x_hat_v, t_)

    terms = meanflow_loss(u_fn, z_t, r, t, v_target=v_g, v_tangent=tangent_from_v_head(v_c),
                          has_aux=True, c=c, p=p, jvp=jvp)
    raw_v = squared_error(terms.aux, v_g)
    return GuidedLossTerms(terms.loss, adaptively_weighted(raw_v, c=c, p=p), terms.raw, raw_v,
                           denoised_image(z_t, terms.u, t), v_g)


def perceptual_term(distance: torch.Tensor, t: torch.Tensor, *, t_thr: float, weight: float,
                    c: float = ADAPTIVE_C, p: float = ADAPTIVE_P, check_values: bool = True) -> torch.Tensor:
    """One perceptual term of pMF, ``lambda * adp(d)`` on rows with t < t_thr and 0 elsewhere (pMF Sec. 4).

    pMF: ``0.4 adp(LPIPS)`` + ``0.1 adp(ConvNeXt feature distance)``, t_thr = 0.8 (B/16, B/32, L/16)
    or 0.6 (L/32, H). The distance is masked *before* the weight, so masked rows have value and
    gradient 0 (``adp(0) = 0``).

    Args:
        distance: per-sample distance between the denoised image and the data, (B,), >= 0.
        t: (B,).  t_thr: noise-level cutoff.  weight: lambda.
    Returns:
        per-sample term, (B,).
    """
    check_float("distance", distance)
    if not 0.0 <= t_thr <= 1.0:              # NaN fails too (it would turn the term off silently)
        raise ValueError(f"t_thr must lie in [0, 1] (the term applies where t < t_thr), got {t_thr}")
    check_time("t", t, like=distance, check_values=check_values)
    check_same_shape("distance", distance, "t", t)
    masked = torch.where(t < t_thr, distance, torch.zeros_like(distance))
    return weight * adaptively_weighted(masked, c=c, p=p)


def flow_matching_loss(x_fn: Callable, x: torch.Tensor, e: torch.Tensor, t: torch.Tensor, *,
                       c: float = ADAPTIVE_C, p: float = 0.0) -> torch.Tensor:
    """JiT-style flow-matching baseline: x-prediction, velocity loss, r = t (no JVP).

    ``L = ||(z_t - x_fn(z_t, t, t)) / max(t, t_eps) - v_t||^2`` per sample (JiT Eq. 6 with the
    same sum reduction and t clip as pMF); p = 0 by default: no adaptive weighting, as in JiT.

    Args:
        x_fn: x-prediction network.  x, e: (B, ...).  t: (B,).
    Returns:
        per-sample loss, (B,).
    """
    check_time("t", t, like=x)
    z_t = interpolate(x, e, t)
    v_t = target_velocity(z_t, x, t)
    v_hat = average_velocity_from_x(z_t, x_fn(z_t, t, t), t)
    return adaptively_weighted(squared_error(v_hat, v_t), c=c, p=p)
