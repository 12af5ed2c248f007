"""Samplers of the generative model: one network call, or N steps of the displacement identity."""
from __future__ import annotations

from typing import Callable

import torch

from .path import check_float


def _u_only(u_fn: Callable, z, r, t, has_aux: bool) -> torch.Tensor:
    u = u_fn(z, r, t)
    return u[0] if has_aux else u


def _check_batched(e: torch.Tensor) -> None:
    if e.ndim == 0:
        raise ValueError("e must have a batch dimension, shape (B, ...), got a 0-d tensor")


@torch.no_grad()
def sample_one_step(u_fn: Callable, e: torch.Tensor, *, has_aux: bool = False) -> torch.Tensor:
    """One-step generation ``x = z_1 - u(z_1, 0, 1)`` with ``z_1 = e``  (pMF Eq. 9; Alg. 2).

    For an x-prediction network (``u_fn_from_x_fn``) this is exactly ``x_theta(e, 0, 1)``.

    Args:
        u_fn: ``(z, r, t) -> u``.  e: noise (already multiplied by the noise scale), (B, ...).
    Returns:
        x, (B, ...).
    """
    check_float("e", e)
    _check_batched(e)
    n = e.shape[0]
    zeros = torch.zeros(n, device=e.device, dtype=e.dtype)
    ones = torch.ones(n, device=e.device, dtype=e.dtype)
    return e - _u_only(u_fn, e, zeros, ones, has_aux)


@torch.no_grad()
def sample_multi_step(u_fn: Callable, e: torch.Tensor, *, steps: int, has_aux: bool = False) -> torch.Tensor:
    """N-step generation by the displacement identity ``z_r = z_t - (t - r) u(z_t, r, t)``.

    Times run 1 = t_0 > t_1 > ... > t_N = 0 uniformly. With r = t - 1/N each step is exact for
    the true average velocity; with a flow-matching model (u = v) it is Euler's method.

    Args:
        u_fn: ``(z, r, t) -> u``.  e: noise, (B, ...).  steps: N >= 1.
    Returns:
        x = z_0, (B, ...).
    """
    check_float("e", e)
    _check_batched(e)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    n = e.shape[0]
    times = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    z = e
    for t_value, r_value in zip(times[:-1].tolist(), times[1:].tolist()):
        t = torch.full((n,), t_value, device=e.device, dtype=e.dtype)
        r = torch.full((n,), r_value, device=e.device, dtype=e.dtype)
        z = z - (t_value - r_value) * _u_only(u_fn, z, r, t, has_aux)
    return z
