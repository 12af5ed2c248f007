"""The objective: the MeanFlow identity and its JVP, the guidance equations, the per-sample losses.

Sections, each readable alone:

* **the MeanFlow identity** -- the JVP that gives du/dt, the compound velocity and the target. A network
  function here is a callable ``u_fn(z, r, t)`` returning the average velocity ``u`` of shape like ``z`` --
  or ``(u, aux)`` with ``has_aux=True`` (pMF returns x_hat as aux). Bind class labels, guidance scale or
  parameters into it with a closure or ``torch.func.functional_call``. The JVP runs through
  ``torch.func.jvp`` unless the caller passes another engine with its signature (``jvp=``).
* **tangent choices** -- the JVP's tangent for z: the model's own velocity, the v-head's, or ``e - x``.
* **guidance equations** -- classifier-free guidance trained into the network (iMF style, pMF Sec. 4 and
  App. A): the network is conditioned on a guidance scale omega and an interval [t_min, t_max]; the
  target is the guided velocity, so one network call at sampling time already applies CFG. (omega, the
  interval and the label-drop masks are drawn in ``pmf_ref/path.py``.)
* **losses** -- squared error, adaptive weighting, and the assembled pMF / flow-matching losses. Every
  loss returns one value per example, shape (B,); the caller takes the batch mean last. The losses with a
  JVP pass ``jvp=`` through to :func:`average_velocity_jvp`.

``check_values=False`` skips the value checks (host syncs) for a training step (see ``pmf_ref/path.py``).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
import torch.func

from .path import (_all, average_velocity_from_x, check_float, check_per_example, check_r_le_t, check_same_shape,
                   check_time, denoised_image, expand_like, interpolate, target_velocity)


# ----------------------------------------------------------------------------- the MeanFlow identity

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


# ----------------------------------------------------------------------------- guidance equations

def _check_omega(omega: torch.Tensor, check_values: bool = True) -> None:
    # A value check (a host sync): skipped with check_values=False and inside vmap, like the time checks.
    if check_values and omega.numel() > 0 and not _all(omega >= 1):   # NaN fails the comparison
        raise ValueError(f"omega must be >= 1 (1 = no guidance), got min {omega.min().item():.4g}")

def _check_interval(t_min, t_max, check_values: bool = True) -> None:
    # An empty interval (t_min > t_max) would turn guidance off on every row without a word.
    if isinstance(t_min, torch.Tensor) or isinstance(t_max, torch.Tensor):
        if check_values and not _all(torch.as_tensor(t_min) <= torch.as_tensor(t_max)):
            raise ValueError("the guidance interval must satisfy t_min <= t_max (an empty interval turns "
                             "guidance off), got t_min > t_max on some rows")
    elif not t_min <= t_max:
        raise ValueError(f"the guidance interval must satisfy t_min <= t_max (an empty interval turns guidance off), "
                         f"got [{t_min}, {t_max}]")

def effective_guidance_scale(omega: torch.Tensor, t: torch.Tensor, *, t_min: torch.Tensor,
                             t_max: torch.Tensor, dropped: torch.Tensor | None = None,
                             check_values: bool = True) -> torch.Tensor:
    """Interval gating ``omega' = omega if t_min <= t <= t_max (and the row is not label-dropped) else 1``.

    Args:
        omega: (B,) >= 1.  t: (B,).  t_min, t_max: (B,), or floats for one interval for all rows.
        dropped: optional bool (B,).
    Returns:
        omega', (B,).
    """
    check_float("omega", omega)
    check_same_shape("omega", omega, "t", t)
    _check_omega(omega, check_values)
    check_time("t", t, check_values=check_values)
    for name, bound in (("t_min", t_min), ("t_max", t_max)):
        if isinstance(bound, torch.Tensor):  # a Python float is one interval for every row
            check_time(name, bound, check_values=check_values)
            if bound.ndim != 0:
                check_same_shape(name, bound, "t", t)
        elif not 0.0 <= bound <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {bound}")
    _check_interval(t_min, t_max, check_values)
    inside = (t >= t_min) & (t <= t_max)
    if dropped is not None:
        if dropped.dtype != torch.bool or dropped.shape != omega.shape:
            raise ValueError(f"dropped must be a bool tensor of shape {tuple(omega.shape)}, "
                             f"got {dropped.dtype} {tuple(dropped.shape)}")
        inside = inside & ~dropped
    return torch.where(inside, omega, torch.ones_like(omega))

def guidance_scale_for_target(omega: torch.Tensor, r: torch.Tensor, t: torch.Tensor, *,
                              t_min: torch.Tensor, t_max: torch.Tensor, check_values: bool = True) -> torch.Tensor:
    """The omega of the guided target (released code): ungated on rows with r = t, else gated by the
    row's interval (:func:`effective_guidance_scale`, omega' = omega inside [t_min, t_max], else 1).

    (The sampler gives r = t rows the interval [0, 1], where the two coincide; the released code still
    takes the ungated omega there, and so does this function.)

    Args:
        omega: (B,) >= 1.  r, t: (B,).  t_min, t_max: (B,).
    Returns:
        omega for the target and for the JVP tangent's v-head pass, (B,).
    """
    check_r_le_t(r, t, check_values=check_values)
    gated = effective_guidance_scale(omega, t, t_min=t_min, t_max=t_max, check_values=check_values)
    return torch.where(r == t, omega, gated)

def guided_velocity(v_t: torch.Tensor, v_c: torch.Tensor, v_u: torch.Tensor, omega: torch.Tensor, *,
                    check_values: bool = True) -> torch.Tensor:
    """Guided target ``v_g = v_t + (1 - 1/omega) (v_c - v_u)``  (iMF Eq. 13; pMF App. A).

    omega = 1 gives v_t exactly. v_c, v_u are the model's conditional and unconditional
    instantaneous velocities (the caller stops their gradient).

    Args:
        v_t, v_c, v_u: (B, ...).  omega: (B,) >= 1.
    Returns:
        v_g, (B, ...).
    """
    check_same_shape("v_t", v_t, "v_c", v_c)
    check_same_shape("v_t", v_t, "v_u", v_u)
    check_float("omega", omega)
    if omega.ndim != 0:  # a scalar omega applies to every row
        check_per_example("omega", omega, v_t)
    _check_omega(omega, check_values)
    return v_t + expand_like(1.0 - 1.0 / omega, v_t) * (v_c - v_u)

def drop_labels(y: torch.Tensor, dropped: torch.Tensor, *, null_label: int) -> torch.Tensor:
    """Replace the labels of dropped rows by ``null_label`` (= num_classes).

    Args:
        y: int labels, (B,).  dropped: bool (B,).
    Returns:
        labels, (B,).
    """
    if y.is_floating_point():
        raise ValueError(f"y must be an integer label tensor, got {y.dtype}")
    if dropped.shape != y.shape or dropped.dtype != torch.bool:
        raise ValueError(f"dropped must be a bool tensor of shape {tuple(y.shape)}")
    return torch.where(dropped, torch.full_like(y, null_label), y)


# ----------------------------------------------------------------------------- losses

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
