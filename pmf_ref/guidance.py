"""Classifier-free guidance trained into the network (iMF style, pMF Sec. 4 and App. A).

The network is conditioned on a guidance scale omega and an interval [t_min, t_max]; the target
is the guided velocity, so one network call at sampling time already applies CFG.
``check_values=False`` skips the value checks (host syncs) for a training step (``pmf_ref/_checks.py``).
"""
from __future__ import annotations

import math

import torch

from ._checks import (_all, check_float, check_float_dtype, check_per_example, check_r_le_t,
                      check_same_shape, check_time, expand_like)

OMEGA_S_MAX = 7.0
"""Training range of omega is [1, 1 + s_max] = [1, 8] in pMF."""
LABEL_DROP_PROB = 0.1
"""Fraction of rows trained unconditionally (null label), as in pMF / iMF."""


def _check_n(n: int) -> None:
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")


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


def sample_omega(n: int, *, s_max: float = OMEGA_S_MAX, beta: float = 1.0,
                 generator: torch.Generator | None = None, device=None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Guidance scales with density ``p(omega) ∝ omega^(-beta)`` on ``[1, 1 + s_max]`` (iMF; pMF App. A).

    Inverse CDF of a uniform u: with ``m = 1 + s_max``,
    ``omega = m^u`` for beta = 1, else ``omega = (1 + u (m^(1-beta) - 1))^(1 / (1 - beta))``.
    pMF: beta = 1 for B models, 2 for L.

    Args:
        n: number of rows.  s_max: >= 0.  beta: >= 0.
    Returns:
        omega, (n,).
    """
    _check_n(n)
    if not 0 <= s_max < math.inf:            # NaN fails too
        raise ValueError(f"s_max must be >= 0 and finite (omega lies in [1, 1 + s_max]), got {s_max}")
    if not 0 <= beta < math.inf:
        raise ValueError(f"beta must be >= 0 and finite, got {beta}")
    check_float_dtype("dtype", dtype)
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
    m = 1.0 + s_max
    if abs(beta - 1.0) < 1e-12:
        omega = m ** u
    else:
        a = 1.0 - beta
        omega = (1.0 + u * (m ** a - 1.0)) ** (1.0 / a)
    return omega.clamp(1.0, m).to(dtype)


def sample_guidance_interval(r: torch.Tensor, t: torch.Tensor, *, generator: torch.Generator | None = None,
                             check_values: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Guidance intervals ``t_min ~ U(0, 0.5)``, ``t_max ~ U(0.5, 1)``; rows with r = t get [0, 1].

    (pMF App. A: on the r = t line the target is the instantaneous guided velocity everywhere.)

    Args:
        r, t: (B,) sampled times.
    Returns:
        (t_min, t_max), each (B,), with 0 <= t_min <= 0.5 <= t_max <= 1.
    """
    check_r_le_t(r, t, check_values=check_values)
    n = t.shape[0] if t.ndim else 1
    t_min = 0.5 * torch.rand(n, generator=generator, device=t.device, dtype=torch.float32).to(t.dtype)
    t_max = 0.5 + 0.5 * torch.rand(n, generator=generator, device=t.device, dtype=torch.float32).to(t.dtype)
    on_diagonal = (r == t).reshape(n)
    t_min = torch.where(on_diagonal, torch.zeros_like(t_min), t_min)
    t_max = torch.where(on_diagonal, torch.ones_like(t_max), t_max)
    return t_min.reshape(t.shape), t_max.reshape(t.shape)


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


def label_drop_mask(n: int, *, p: float = LABEL_DROP_PROB, generator: torch.Generator | None = None,
                    device=None) -> torch.Tensor:
    """Per-row Bernoulli(p) mask of rows trained with the null label (toy and tutorials; the ImageNet
    recipe uses :func:`label_drop_mask_diagonal`, as the released code does).

    Args:
        n: rows.  p: drop probability in [0, 1].
    Returns:
        bool mask, (n,).
    """
    _check_n(n)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must lie in [0, 1], got {p}")
    return torch.rand(n, generator=generator, device=device) < p


def label_drop_mask_diagonal(r: torch.Tensor, t: torch.Tensor, *, p: float = LABEL_DROP_PROB,
                             equal_fraction: float = 0.5, generator: torch.Generator | None = None,
                             check_values: bool = True) -> torch.Tensor:
    """Label drop of the released code: only rows with r = t lose their label, a share p of all rows.

    The released code drops the first k ~ Binomial(B, p) rows of each device batch, and those are
    rows its time sampler set to r = t; so no r < t row ever loses its label (no unconditional u off
    the diagonal is trained) and about p / equal_fraction (20%) of the r = t rows are dropped.

    # Deviation: each r = t row is dropped independently with probability p / equal_fraction (same
    # rate, count Binomial(B/2, 2p) instead of Binomial(B, p)), so the mask does not depend on how
    # the global batch is split across devices.

    Args:
        r, t: (B,) times.  p: drop rate over all rows.  equal_fraction: the sampler's share of r = t rows.
    Returns:
        bool mask, (B,), True only on rows with r = t.
    """
    check_r_le_t(r, t, check_values=check_values)
    if not 0.0 <= p <= 1.0 or not 0.0 < equal_fraction <= 1.0:
        raise ValueError(f"p must lie in [0, 1] and equal_fraction in (0, 1], got {p}, {equal_fraction}")
    drop = torch.rand(t.shape[0], generator=generator, device=t.device) < min(1.0, p / equal_fraction)
    return drop & (r == t)


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
