"""The linear noising path and the conversions between velocity and denoised image.

Convention (see the package docstring): ``z_t = (1 - t) x + t e``, t = 0 data, t = 1 noise.
Every function takes ``check_values`` (default True): False skips the check that t lies in [0, 1]
(a host sync), for a training step whose times were checked where they were drawn.
"""
from __future__ import annotations

import torch

from ._checks import check_float, check_same_shape, check_time, expand_like

T_EPS = 0.05
"""Lower clip of t in every division by t (pMF Eq. 11; the released code and JiT use 0.05).
Without it ``1 / t`` amplifies the network's error without bound as t -> 0."""


def interpolate(x: torch.Tensor, e: torch.Tensor, t: torch.Tensor, *, check_values: bool = True) -> torch.Tensor:
    """Point on the noising path, ``z_t = (1 - t) x + t e``  (pMF Sec. 3, MeanFlow Eq. 1).

    Args:
        x: clean data, (B, ...).
        e: noise, same shape as ``x``.
        t: time in [0, 1], (B,) or ().
    Returns:
        z_t, same shape as ``x``.
    """
    check_float("x", x)
    check_float("e", e)
    check_same_shape("x", x, "e", e)
    check_time("t", t, like=x, check_values=check_values)
    t_ = expand_like(t, x)
    return (1 - t_) * x + t_ * e


def conditional_velocity(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Conditional instantaneous velocity ``v = dz_t/dt = e - x``  (MeanFlow Eq. 2).

    Args:
        x: clean data, (B, ...).  e: noise, same shape.
    Returns:
        v, same shape as ``x``.
    """
    check_float("x", x)
    check_float("e", e)
    check_same_shape("x", x, "e", e)
    return e - x


def _clipped(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return expand_like(t.clamp(min=T_EPS), like)


def average_velocity_from_x(z_t: torch.Tensor, x_hat: torch.Tensor, t: torch.Tensor, *,
                            check_values: bool = True) -> torch.Tensor:
    """pMF parametrisation ``u = (z_t - x_hat) / max(t, t_eps)``  (pMF Eq. 11, inverting Eq. 8).

    Args:
        z_t: noisy input, (B, ...).
        x_hat: denoised image predicted for (z_t, r, t), same shape.
        t: time in [0, 1], (B,) or ().
    Returns:
        u, same shape as ``z_t``.
    """
    check_float("z_t", z_t)
    check_float("x_hat", x_hat)
    check_same_shape("z_t", z_t, "x_hat", x_hat)
    check_time("t", t, like=z_t, check_values=check_values)
    return (z_t - x_hat) / _clipped(t, z_t)


def x_from_average_velocity(z_t: torch.Tensor, u: torch.Tensor, t: torch.Tensor, *,
                            check_values: bool = True) -> torch.Tensor:
    """Denoised-image field ``x = z_t - max(t, t_eps) u``  (pMF Eq. 8, with the clip of Eq. 11).

    Equals Eq. 8's ``z_t - t u`` for t >= t_eps and is the exact inverse of
    :func:`average_velocity_from_x` for every t. At r = 0 it is the ODE endpoint (a clean image);
    at r = t it is JiT's denoised target.

    Args:
        z_t: noisy input, (B, ...).  u: average velocity, same shape.  t: (B,) or ().
    Returns:
        x, same shape as ``z_t``.
    """
    check_float("z_t", z_t)
    check_float("u", u)
    check_same_shape("z_t", z_t, "u", u)
    check_time("t", t, like=z_t, check_values=check_values)
    return z_t - _clipped(t, z_t) * u


def denoised_image(z_t: torch.Tensor, u: torch.Tensor, t: torch.Tensor, *, check_values: bool = True) -> torch.Tensor:
    """Denoised-image field as written in pMF Eq. 8, ``x = z_t - t u``, with the **unclipped** t.

    The released code feeds this to the perceptual loss. It equals :func:`x_from_average_velocity`
    for t >= t_eps; below the clip it is ``z_t - (t / t_eps)(z_t - x_hat)``, nearer to z_t.

    Args:
        z_t: noisy input, (B, ...).  u: average velocity, same shape.  t: (B,) or ().
    Returns:
        x, same shape as ``z_t``.
    """
    check_float("z_t", z_t)
    check_float("u", u)
    check_same_shape("z_t", z_t, "u", u)
    check_time("t", t, like=z_t, check_values=check_values)
    return z_t - expand_like(t, z_t) * u


def target_velocity(z_t: torch.Tensor, x: torch.Tensor, t: torch.Tensor, *, check_values: bool = True) -> torch.Tensor:
    """Clipped regression target of the released code, ``v_t = (z_t - x) / max(t, t_eps)``.

    Equals ``e - x`` for t >= t_eps; below the clip it is scaled by t / t_eps, consistent with the
    clipped parametrisation of :func:`average_velocity_from_x` (so x_hat = x gives u = v_t).

    Args:
        z_t: noisy input, (B, ...).  x: clean data, same shape.  t: (B,) or ().
    Returns:
        v_t, same shape as ``z_t``.
    """
    return average_velocity_from_x(z_t, x, t, check_values=check_values)
