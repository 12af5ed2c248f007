"""Input validation shared by every ``pmf_ref`` function.

Shape and dtype checks always run (they are static, so ``vmap`` and ``torch.compile`` see them
as constants). Value checks (t in [0, 1], r <= t) look at the data: each costs a device-to-host sync,
so they run only where values enter -- a public function called directly checks them; a training step
passes ``check_values=False`` and validates its inputs where they are drawn or loaded. They are also
skipped where the values cannot be read: while ``torch.compile`` traces, and inside ``torch.func.vmap``
(data-dependent control flow is not allowed there; the outermost call still checks the real values).
"""
from __future__ import annotations

import torch


def _all(condition: torch.Tensor) -> bool:
    """``bool(condition.all())``, or True where the values cannot be read (``vmap``, ``torch.compile``)."""
    if torch.compiler.is_compiling():   # under Dynamo a bool(tensor) is a graph break
        return True
    try:
        return bool(condition.all())    # one host sync
    except RuntimeError:                # torch.func.vmap: "data-dependent control flow" is refused
        return True


def check_float(name: str, tensor: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``tensor`` is a floating-point tensor."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must have a floating dtype (float16/bfloat16/float32/float64), got {tensor.dtype}")


def check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``a`` and ``b`` have the same shape."""
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def check_time(name: str, t: torch.Tensor, like: torch.Tensor | None = None, *, check_values: bool = True) -> None:
    """Check a per-example time: float, shape () or (B,) matching ``like``'s batch, values in [0, 1]
    (the values only with ``check_values``)."""
    check_float(name, t)
    if t.ndim > 1:
        raise ValueError(f"{name} must be a scalar or a (B,) vector of times, got shape {tuple(t.shape)}")
    if like is not None and t.ndim == 1:
        if like.ndim == 0 or like.shape[0] != t.shape[0]:
            raise ValueError(
                f"{name} has batch size {t.shape[0]} but the data has shape {tuple(like.shape)}; "
                f"they must share the batch dimension")
    if check_values and t.numel() > 0:
        if not _all((t >= 0) & (t <= 1)):  # NaN fails both comparisons
            if bool(torch.isnan(t).any()):
                raise ValueError(f"{name} must lie in [0, 1] (0 = data, 1 = noise), got NaN")
            raise ValueError(
                f"{name} must lie in [0, 1] (0 = data, 1 = noise), got values in "
                f"[{t.min().item():.4g}, {t.max().item():.4g}]")


def check_per_example(name: str, value: torch.Tensor, like: torch.Tensor) -> None:
    """Check a per-example scalar (omega, a mask, ...): shape (B,) with the batch size of ``like``."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.ndim != 1 or like.ndim == 0 or value.shape[0] != like.shape[0]:
        raise ValueError(f"{name} must have shape (B,) = ({like.shape[0] if like.ndim else '?'},) to match "
                         f"data of shape {tuple(like.shape)}, got {tuple(value.shape)}")


def check_float_dtype(name: str, dtype: torch.dtype) -> None:
    """Raise ``ValueError`` unless ``dtype`` is a floating-point dtype (for samplers given a dtype)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating dtype (float16/bfloat16/float32/float64), got {dtype}")


def check_r_le_t(r: torch.Tensor, t: torch.Tensor, like: torch.Tensor | None = None, *,
                 check_values: bool = True) -> None:
    """Check 0 <= r <= t <= 1 elementwise (the average velocity integrates from r up to t; the values
    only with ``check_values``); with ``like``, also that r and t share its batch dimension."""
    check_time("r", r, like=like, check_values=check_values)
    check_time("t", t, like=like, check_values=check_values)
    if r.shape != t.shape:
        raise ValueError(f"r and t must have the same shape, got {tuple(r.shape)} and {tuple(t.shape)}")
    if check_values and not _all(r <= t):
        worst = (r - t).max().item()
        raise ValueError(f"r must satisfy 0 <= r <= t, but r exceeds t by up to {worst:.4g}")


def expand_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-example time ``t`` of shape (B,) (or ()) to broadcast against ``x`` (B, ...).

    The one broadcasting helper of the package: (B,) -> (B, 1, ..., 1) with ``x.ndim`` dims.
    """
    if t.ndim == 0:
        return t
    if t.ndim != 1 or x.ndim == 0 or t.shape[0] != x.shape[0]:
        raise ValueError(f"time of shape {tuple(t.shape)} cannot be broadcast per example against data of shape {tuple(x.shape)}")
    return t.reshape(t.shape[0], *([1] * (x.ndim - 1)))  # (B, 1, ..., 1)
