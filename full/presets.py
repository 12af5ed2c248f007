"""The pMF presets, as three typed tables keyed by the same names ("pMF-B/16", ...).

* :data:`ARCHITECTURES` -- the network's shapes (paper Table 8; ``full.model.build_model`` reads it).
* :data:`RECIPES` -- the per-preset numbers of the training recipe (paper App. A and the released
  configs; ``full.train`` reads it).
* :data:`SAMPLING` -- the best one-step sampling settings (omega, interval, EMA; ``full.sample``,
  ``full.export`` and the trainer's monitor read it).

``depth`` counts trunk + u-head (the inference network); the v-head adds ``head_depth`` more blocks.
The two tiny presets pMF-T/4 and pMF-T/2 are ours (CPU tests, the digits benchmark, the tutorials):
trunk 2 + u-head 2 + v-head 2 blocks of width 64, with B/16's recipe and sampling settings.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    """Shapes of a pMF ViT (paper Table 8)."""
    resolution: int          # image side, px
    patch: int               # patch side, px
    depth: int               # trunk + u-head blocks
    width: int
    heads: int
    bottleneck: int          # width of the patch embedding's bottleneck
    head_depth: int          # blocks of each head (u and v)
    channels: int = 3
    num_classes: int = 1000


@dataclass(frozen=True)
class Recipe:
    """Per-preset numbers of the training recipe (paper App. A, released configs)."""
    t_thr: float             # perceptual loss only on rows with t < t_thr
    P_mean: float            # logit-normal (mean, std) of the time sampler
    P_std: float
    uniform_fraction: float  # share of rows whose (r, t) are drawn uniformly
    omega_beta: float        # omega has density proportional to omega^-beta on [1, 8]
    noise_scale: float       # s of the noise e ~ N(0, s^2 I); grows with the resolution


@dataclass(frozen=True)
class Sampling:
    """The best one-step sampling settings of a preset."""
    omega: float             # guidance scale
    t_min: float             # guidance interval [t_min, t_max]
    t_max: float
    ema_kimg: float          # EMA half-life of the sampled weights, kimg


_B = dict(depth=16, width=768, heads=12, bottleneck=128, head_depth=8)
_L = dict(depth=32, width=1024, heads=16, bottleneck=128, head_depth=8)
_H = dict(depth=48, width=1280, heads=16, bottleneck=256, head_depth=8)
_TINY = dict(depth=4, width=64, heads=4, bottleneck=16, head_depth=2)

ARCHITECTURES: dict[str, Architecture] = {
    "pMF-B/16": Architecture(resolution=256, patch=16, **_B),
    "pMF-L/16": Architecture(resolution=256, patch=16, **_L),
    "pMF-H/16": Architecture(resolution=256, patch=16, **_H),
    "pMF-B/32": Architecture(resolution=512, patch=32, **_B),
    "pMF-L/32": Architecture(resolution=512, patch=32, **_L),
    "pMF-H/32": Architecture(resolution=512, patch=32, **_H),
    "pMF-T/4": Architecture(resolution=32, patch=4, **_TINY),
    "pMF-T/2": Architecture(resolution=16, patch=2, **_TINY),
}

_BL = dict(t_thr=0.8, P_mean=0.8, P_std=0.8, uniform_fraction=0.0)
_H_RECIPE = dict(t_thr=0.6, P_mean=0.0, P_std=0.8, uniform_fraction=0.1)
# Not given for H by the paper (its configs differ for H); beta = 1 like B and L/32 is our choice.
_H_OMEGA_BETA = 1.0

RECIPES: dict[str, Recipe] = {
    "pMF-B/16": Recipe(**_BL, omega_beta=1.0, noise_scale=1.0),
    "pMF-L/16": Recipe(**_BL, omega_beta=2.0, noise_scale=1.0),
    "pMF-H/16": Recipe(**_H_RECIPE, omega_beta=_H_OMEGA_BETA, noise_scale=2.0),
    "pMF-B/32": Recipe(**_BL, omega_beta=1.0, noise_scale=2.0),
    # L/32 uses P_mean 0 and t_thr 0.6 like H, but no uniform rows; beta = 1 in the released config
    # (the paper's "2 for L" holds for L/16).
    "pMF-L/32": Recipe(t_thr=0.6, P_mean=0.0, P_std=0.8, uniform_fraction=0.0, omega_beta=1.0, noise_scale=4.0),
    "pMF-H/32": Recipe(**_H_RECIPE, omega_beta=_H_OMEGA_BETA, noise_scale=4.0),
    "pMF-T/4": Recipe(**_BL, omega_beta=1.0, noise_scale=1.0),
    "pMF-T/2": Recipe(**_BL, omega_beta=1.0, noise_scale=1.0),
}

SAMPLING: dict[str, Sampling] = {
    "pMF-B/16": Sampling(omega=8.5, t_min=0.1, t_max=0.7, ema_kimg=2000),
    "pMF-L/16": Sampling(omega=7.0, t_min=0.2, t_max=0.7, ema_kimg=1000),
    "pMF-H/16": Sampling(omega=7.0, t_min=0.2, t_max=0.6, ema_kimg=1000),
    "pMF-B/32": Sampling(omega=6.5, t_min=0.1, t_max=0.7, ema_kimg=2000),
    "pMF-L/32": Sampling(omega=7.5, t_min=0.2, t_max=0.6, ema_kimg=2000),
    "pMF-H/32": Sampling(omega=5.5, t_min=0.1, t_max=0.6, ema_kimg=500),
    "pMF-T/4": Sampling(omega=8.5, t_min=0.1, t_max=0.7, ema_kimg=2000),
    "pMF-T/2": Sampling(omega=8.5, t_min=0.1, t_max=0.7, ema_kimg=2000),
}

PRESETS: tuple[str, ...] = tuple(ARCHITECTURES)
"""The preset names, in the order above (every table has exactly these keys)."""
assert set(RECIPES) == set(SAMPLING) == set(PRESETS)


def check_preset(name: str) -> str:
    """``name`` if it is a preset, else ValueError listing them."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return name
