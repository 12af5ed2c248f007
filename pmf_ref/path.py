"""The path and everything drawn on it: the noising path, the (r, t) times, the guidance draws.

Sections, each readable alone:

* **input checks** -- the validation every ``pmf_ref`` function shares, and ``expand_like``, the one
  broadcasting helper. Shape and dtype checks always run (they are static, so ``vmap`` and
  ``torch.compile`` see them as constants). Value checks (t in [0, 1], r <= t, omega >= 1) look at the
  data: each costs a device-to-host sync, so they run only where values enter -- a public function called
  directly checks them; a training step passes ``check_values=False`` and validates its inputs where they
  are drawn or loaded. They are also skipped where the values cannot be read: while ``torch.compile``
  traces, and inside ``torch.func.vmap`` (data-dependent control flow is not allowed there; the outermost
  call still checks the real values).
* **the path** -- ``z_t = (1 - t) x + t e`` (t = 0 data, t = 1 noise; see the package docstring), the
  conditional velocity, and the conversions between average velocity and denoised image with the clip
  ``T_EPS`` (pMF Eqs. 8, 11).
* **times** -- samplers of the time pair (r, t) with 0 <= r <= t <= 1 (pMF Sec. 4, App. A; MeanFlow
  Sec. 4.3).
* **guidance draws** -- the guidance scale omega, the guidance interval [t_min, t_max] and the label-drop
  masks of classifier-free guidance trained into the network (iMF; pMF App. A). The equations that use
  them are in ``pmf_ref/meanflow.py``.

Every sampler takes a ``torch.Generator``; nothing else in ``pmf_ref`` draws random numbers.
"""
from __future__ import annotations

import math

import torch


# ----------------------------------------------------------------------------- input checks

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


# ----------------------------------------------------------------------------- the path

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


# ----------------------------------------------------------------------------- times (r, t)

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


# ----------------------------------------------------------------------------- guidance draws

OMEGA_S_MAX = 7.0
"""Training range of omega is [1, 1 + s_max] = [1, 8] in pMF."""
LABEL_DROP_PROB = 0.1
"""Fraction of rows trained unconditionally (null label), as in pMF / iMF."""


def _check_n(n: int) -> None:
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")

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
