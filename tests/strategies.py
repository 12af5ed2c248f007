"""Hypothesis strategies for the ``pmf_ref`` tests, named by what they stand for.

Strategies draw only Python scalars (times, shapes, seeds); tensors are built inside each test
from a seeded ``torch.Generator`` (:func:`gaussian`), so a failing example is reproducible from
the printed scalars alone.

Edge cases every time-dependent property is pinned on with ``@example`` (see ``EDGE_*``):
r = t (the instantaneous-velocity boundary), (r, t) = (0, 1) (one-step generation), and
t = t_eps (the clip of every division by t).
"""
from __future__ import annotations

import torch
from hypothesis import strategies as st

import pmf_ref as P

T_EPS = P.T_EPS

EDGE_EQUAL = (0.3, 0.3)
"""(r, t) with r = t: u(z, t, t) = v(z, t), the compound velocity is u itself."""
EDGE_ONE_STEP = (0.0, 1.0)
"""(r, t) = (0, 1): the one-step generation interval."""
EDGE_CLIP = (0.0, T_EPS)
"""t = t_eps: the last t at which Eq. 8's ``z - t u`` and the clipped ``z - max(t, t_eps) u`` agree."""


def times(min_value: float = 0.0, max_value: float = 1.0) -> st.SearchStrategy[float]:
    """A time t in [min_value, max_value] (default the whole [0, 1]; hypothesis tries the ends)."""
    return st.floats(min_value=min_value, max_value=max_value, allow_nan=False, allow_infinity=False)


def times_below_clip() -> st.SearchStrategy[float]:
    """A time 0 <= t < t_eps, where the 1/t conversions are clipped."""
    return st.floats(min_value=0.0, max_value=T_EPS, exclude_max=True)


def time_pairs(min_t: float = 0.0, max_t: float = 1.0) -> st.SearchStrategy[tuple[float, float]]:
    """A pair (r, t) with min_t <= r <= t <= max_t; r = t and r = min_t are drawn often.

    Built as r = min_t + fraction * (t - min_t) with fraction in [0, 1]: IEEE rounding is monotone,
    so r <= t holds exactly in float64 and after rounding both to float32.
    """
    fraction = st.one_of(st.just(1.0), st.just(0.0), st.floats(0.0, 1.0))

    def pair(t: float, f: float) -> tuple[float, float]:
        return (t if f == 1.0 else min(t, min_t + f * (t - min_t))), t

    return st.builds(pair, times(min_t, max_t), fraction)


def batch_sizes(max_size: int = 6) -> st.SearchStrategy[int]:
    """A batch size B >= 1."""
    return st.integers(min_value=1, max_value=max_size)


def sample_shapes(max_dims: int = 3, max_side: int = 4) -> st.SearchStrategy[tuple[int, ...]]:
    """A per-example shape: (D,) vectors or (C, H, W)-like images, each side >= 1."""
    return st.lists(st.integers(1, max_side), min_size=1, max_size=max_dims).map(tuple)


def data_shapes(max_batch: int = 6) -> st.SearchStrategy[tuple[int, ...]]:
    """A batched data shape (B, ...)."""
    return st.builds(lambda b, s: (b, *s), batch_sizes(max_batch), sample_shapes())


def seeds() -> st.SearchStrategy[int]:
    """A seed for ``torch.Generator().manual_seed``."""
    return st.integers(min_value=0, max_value=2**31 - 1)


def guidance_scales(s_max: float = P.OMEGA_S_MAX) -> st.SearchStrategy[float]:
    """A guidance scale omega in [1, 1 + s_max]."""
    return st.floats(min_value=1.0, max_value=1.0 + s_max)


# ----------------------------------------------------------------------------- tensor helpers

def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def gaussian(shape: tuple[int, ...], seed: int, *, scale: float = 1.0,
             dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``scale * N(0, I)`` of the given shape, drawn from a generator seeded with ``seed``."""
    return scale * torch.randn(shape, generator=generator(seed), dtype=dtype)


def full_times(value: float, batch: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A (B,) time vector with every entry equal to ``value``."""
    return torch.full((batch,), value, dtype=dtype)
