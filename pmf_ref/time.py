"""Samplers of the time pair (r, t) with 0 <= r <= t <= 1  (pMF Sec. 4, App. A; MeanFlow Sec. 4.3).

All take a ``torch.Generator``; nothing else in ``pmf_ref`` draws random numbers.
"""
from __future__ import annotations

import math

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
        if not 0.0 <= value <= 1.0:          # NaN fails too
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
    if not math.isfinite(mean):
        raise ValueError(f"mean must be a finite number, got {mean}")
    if not 0 < std < math.inf:               # NaN fails too
        raise ValueError(f"std must be > 0 and finite, got {std}")
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator, device=device, dtype=dtype))


def _two_times(n, mean, std, uniform_fraction, generator, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent times per row, each (n,): logit-normal(mean, std), or U(0, 1) on a ``uniform_fraction``
    of the rows. Shared by both pair samplers so that they consume the generator identically."""
    a = sample_logit_normal(n, mean=mean, std=std, generator=generator, device=device, dtype=dtype)
    b = sample_logit_normal(n, mean=mean, std=std, generator=generator, device=device, dtype=dtype)
    uniform = torch.rand(n, generator=generator, device=device) < uniform_fraction
    a = torch.where(uniform, torch.rand(n, generator=generator, device=device, dtype=dtype), a)
    b = torch.where(uniform, torch.rand(n, generator=generator, device=device, dtype=dtype), b)
    return a, b


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
    a, b = _two_times(n, mean, std, uniform_fraction, generator, device, dtype)
    t, r = torch.maximum(a, b), torch.minimum(a, b)
    equal = torch.rand(n, generator=generator, device=device) < equal_fraction
    return torch.where(equal, t, r), t


def diagonal_rows(n: int, equal_fraction: float = EQUAL_FRACTION, device=None) -> torch.Tensor:
    """Which rows of a batch get r = t in the released sampler: an exact share, spread evenly.

    Row i is a diagonal row iff ``ceil((i + 1) f) - ceil(i f) = 1`` (f = 0.5: rows 0, 2, 4, ...), so
    every block of rows [a, b) with a f and b f integers -- every even-sized device batch or
    micro-batch cut from the global batch, at f = 0.5 -- holds exactly ``(b - a) f`` of them.

    Returns:
        bool mask, (n,).
    """
    _check(n, equal_fraction=equal_fraction)
    i = torch.arange(n + 1, device=device, dtype=torch.float64)
    counts = torch.ceil(i * equal_fraction - 1e-9)               # diagonal rows before row i
    return counts[1:] > counts[:-1]


def sample_time_pair_released(n: int, *, mean: float = P_MEAN, std: float = P_STD,
                              equal_fraction: float = EQUAL_FRACTION, uniform_fraction: float = 0.0,
                              generator: torch.Generator | None = None, device=None,
                              dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The "full plane" sampler as the authors' released code draws it (the ImageNet recipe's default).

    t, r i.i.d. logit-normal (a ``uniform_fraction`` of rows, chosen by coin flip, draws both from
    U(0, 1) instead; pMF-H: 0.1); then an exact share ``equal_fraction`` of the rows gets r := t
    **before** ``t, r = max, min``. So the r = t count is exact, and on those rows t is a single
    logit-normal draw (mean 0.67 at (0.8, 0.8)), not the max of two as in :func:`sample_time_pair`
    (mean 0.76).

    # Deviation: the released code makes the first half of each device batch the r = t rows; here
    # they are every other row (:func:`diagonal_rows`), so that every even-sized device batch cut
    # from one global draw has exactly half of them, whatever the number of devices.

    Returns:
        (r, t), each (n,), with 0 <= r <= t <= 1; r = t exactly on :func:`diagonal_rows`.
    """
    _check(n, equal_fraction=equal_fraction, uniform_fraction=uniform_fraction)
    t, r = _two_times(n, mean, std, uniform_fraction, generator, device, dtype)
    r = torch.where(diagonal_rows(n, equal_fraction, device=t.device), t, r)
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
