"""Samplers of the time pair (r, t) with 0 <= r <= t <= 1  (pMF Sec. 4, App. A; MeanFlow Sec. 4.3).

All take a ``torch.Generator``; nothing else in ``pmf_ref`` draws random numbers.
"""
from __future__ import annotations

import torch

from ._checks import check_float_dtype

P_MEAN, P_STD = 0.8, 0.8
"""Logit-normal (mean, std) of pMF B/16, B/32, L/16; L/32 and H use (0.0, 0.8); MeanFlow (-0.4, 1.0)."""
EQUAL_FRACTION = 0.5
"""Fraction of rows with r = t in pMF (MeanFlow used 0.25)."""


def _check(n: int, **fractions: float) -> None:
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    for name, value in fractions.items():
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {value}")


def sample_logit_normal(n: int, *, mean: float = P_MEAN, std: float = P_STD,
                        generator: torch.Generator | None = None, device=None,
                        dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Logit-normal times ``t = sigmoid(N(mean, std^2))``  (SD3; MeanFlow Sec. 4.3).

    Returns:
        t, (n,), in (0, 1).
    """
    _check(n)
    check_float_dtype("dtype", dtype)
    if std <= 0:
        raise ValueError(f"std must be > 0, got {std}")
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device, dtype=dtype))


def sample_time_pair(n: int, *, mean: float = P_MEAN, std: float = P_STD,
                     equal_fraction: float = EQUAL_FRACTION, uniform_fraction: float = 0.0,
                     generator: torch.Generator | None = None, device=None,
                     dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The "full plane" sampler of pMF: t, r i.i.d. logit-normal, sorted so r <= t.

    Optionally a ``uniform_fraction`` of rows draws (t, r) from U(0, 1)^2 instead (pMF-H: 0.1),
    then an ``equal_fraction`` of rows gets r = t (pMF: 0.5).

    Returns:
        (r, t), each (n,), with 0 <= r <= t <= 1.
    """
    _check(n, equal_fraction=equal_fraction, uniform_fraction=uniform_fraction)
    a = sample_logit_normal(n, mean=mean, std=std, generator=generator, device=device, dtype=dtype)
    b = sample_logit_normal(n, mean=mean, std=std, generator=generator, device=device, dtype=dtype)
    uniform = torch.rand(n, generator=generator, device=device) < uniform_fraction
    a = torch.where(uniform, torch.rand(n, generator=generator, device=device, dtype=dtype), a)
    b = torch.where(uniform, torch.rand(n, generator=generator, device=device, dtype=dtype), b)
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    equal = torch.rand(n, generator=generator, device=device) < equal_fraction
    return torch.where(equal, t, r), t


def sample_time_pair_released(n: int, *, mean: float = P_MEAN, std: float = P_STD,
                              equal_fraction: float = EQUAL_FRACTION, uniform_fraction: float = 0.0,
                              generator: torch.Generator | None = None, device=None,
                              dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The "full plane" sampler as the authors' released code draws it (the ImageNet recipe's default).

    t, r i.i.d. logit-normal (a ``uniform_fraction`` of rows, chosen by coin flip, draws both from
    U(0, 1) instead; pMF-H: 0.1); then the **first** ``int(n * equal_fraction)`` rows get r := t
    **before** ``t, r = max, min``. So the r = t count is exact, and on those rows t is a single
    logit-normal draw (mean 0.67 at (0.8, 0.8)), not the max of two as in :func:`sample_time_pair`
    (mean 0.76). Call it once per device batch to keep the exact share on every device.

    Returns:
        (r, t), each (n,), with 0 <= r <= t <= 1; rows ``[0, int(n * equal_fraction))`` have r = t.
    """
    _check(n, equal_fraction=equal_fraction, uniform_fraction=uniform_fraction)
    t = sample_logit_normal(n, mean=mean, std=std, generator=generator, device=device, dtype=dtype)
    r = sample_logit_normal(n, mean=mean, std=std, generator=generator, device=device, dtype=dtype)
    uniform = torch.rand(n, generator=generator, device=device) < uniform_fraction
    t = torch.where(uniform, torch.rand(n, generator=generator, device=device, dtype=dtype), t)
    r = torch.where(uniform, torch.rand(n, generator=generator, device=device, dtype=dtype), r)
    on_diagonal = torch.arange(n, device=t.device) < int(n * equal_fraction)
    r = torch.where(on_diagonal, t, r)
    return torch.minimum(t, r), torch.maximum(t, r)


def sample_time_pair_diagonal(n: int, *, mean: float = P_MEAN, std: float = P_STD,
                              generator: torch.Generator | None = None, device=None,
                              dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Ablation "only r = t" (flow matching; pMF Table 5: FID 194.53). Returns (r, t), (n,) each."""
    t = sample_logit_normal(n, mean=mean, std=std, generator=generator, device=device, dtype=dtype)
    return t.clone(), t


def sample_time_pair_endpoint(n: int, *, mean: float = P_MEAN, std: float = P_STD,
                              generator: torch.Generator | None = None, device=None,
                              dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Ablation "only r = 0" (pMF Table 5: FID 389.28). Returns (r, t), (n,) each."""
    t = sample_logit_normal(n, mean=mean, std=std, generator=generator, device=device, dtype=dtype)
    return torch.zeros_like(t), t


def sample_time_pair_two_lines(n: int, *, mean: float = P_MEAN, std: float = P_STD,
                               equal_fraction: float = EQUAL_FRACTION,
                               generator: torch.Generator | None = None, device=None,
                               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Ablation "both lines": a fraction of rows with r = t, the rest with r = 0 (pMF Table 5: 106.59).

    Returns (r, t), (n,) each.
    """
    _check(n, equal_fraction=equal_fraction)
    t = sample_logit_normal(n, mean=mean, std=std, generator=generator, device=device, dtype=dtype)
    equal = torch.rand(n, generator=generator, device=device) < equal_fraction
    return torch.where(equal, t, torch.zeros_like(t)), t
