"""The digits experiments, each the analogue of one of the paper's ablations, and their tables.

(a) ``prediction``: x- vs u-prediction as the patch dimension grows at a fixed token count (4 x 4 patches):
    patch 4 / 8 / 16 at 16 / 32 / 64 px, i.e. patch dims 16 / 64 / 256 against a bottleneck of 16.
    Paper Table 2: 64 px B/4 (patch dim 48 < bottleneck 128) x 3.80 vs u 3.82; 256 px B/16 (768 > 128)
    x 9.56 vs u 164.89.
(b) ``optimizer``: Muon vs Adam (paper, B/16 MSE-only, 160 ep: Adam 18.88, Muon 9.56).
(c) ``sampler``: the (r, t) sampler: full plane vs only r = t vs only r = 0 vs both lines
    (paper, B/16 160 ep: 3.53 / 194.53 / 389.28 / 106.59).
(d) ``guidance``: one-step samples at omega = 1 vs the trained-in guidance scales, and a model trained
    without CFG (the paper tunes omega, e.g. B/16 best 8.5 on [0.1, 0.7]; it gives no omega = 1 FID).
(e) ``snr`` (diagnostic, not in the paper): (a)'s 64 px arms at noise scale 4, the 16 px signal-to-noise ratio.

Every arm not named otherwise is the pMF recipe at 16 px, patch 4: x-prediction, Muon, full plane, CFG.
"""
from __future__ import annotations

from .runs import ArmSpec

GUIDANCE_OMEGAS = (1.0, 1.5, 2.0, 3.0, 4.5, 6.0, 8.5)
"""The omega sweep of experiment (d); 8.5 is B/16's best on ImageNet (the tiny preset's default)."""
ABLATION_OMEGAS = (1.0, 2.0)
"""Every other arm is scored without guidance and at a mild scale (the table reports both)."""
PATCHES = (4, 8, 16)
TOKENS_PER_SIDE = 4
"""Fixed token grid: resolution = 4 * patch, so 16 patch tokens (plus 20 conditioning tokens)."""

SNR_NOISE_SCALE = 4.0
"""Diagnostic "snr": bilinear x8 upsampling multiplies the norm of every data direction by 8 (x2 at 16 px), so
at 64 px the same t carries 4x the signal-to-noise ratio of 16 px. Noise scale 4 (e ~ N(0, 16 I), the paper's
remedy at 512 px, where L/32 and H/32 use 4) restores the 16 px ratio."""

BASE = ArmSpec(resolution=16, patch=4, omegas=ABLATION_OMEGAS)


def _arm(**changes) -> ArmSpec:
    fields = {**BASE.__dict__, **changes}
    return ArmSpec(**fields)


def experiment_arms(name: str) -> list[tuple[str, ArmSpec]]:
    """The (label, spec) arms of one experiment, in table order."""
    if name == "prediction":
        return [(f"{prediction}-pred, {TOKENS_PER_SIDE * p} px, patch {p} (dim {p * p})",
                 _arm(resolution=TOKENS_PER_SIDE * p, patch=p, prediction=prediction))
                for p in PATCHES for prediction in ("x", "u")]
    if name == "optimizer":
        return [("Muon (pMF)", _arm(optimizer="muon")), ("Adam", _arm(optimizer="adam"))]
    if name == "sampler":
        return [("full plane 0 <= r <= t (pMF)", _arm(time_sampler="full")),
                ("only r = t", _arm(time_sampler="diagonal")),
                ("only r = 0", _arm(time_sampler="endpoint")),
                ("both lines (r = t or r = 0)", _arm(time_sampler="two_lines"))]
    if name == "guidance":
        return [("trained-in CFG (pMF)", _arm(guidance=True, omegas=GUIDANCE_OMEGAS)),
                ("trained without CFG", _arm(guidance=False, omegas=(1.0,)))]
    if name == "snr":
        return [(f"{prediction}-pred, 64 px, patch 16, noise scale {SNR_NOISE_SCALE:g}",
                 _arm(resolution=64, patch=16, prediction=prediction, noise_scale=SNR_NOISE_SCALE))
                for prediction in ("x", "u")]
    raise ValueError(f"unknown experiment {name!r}; choose one of {list(EXPERIMENTS)}")


EXPERIMENTS = ("prediction", "optimizer", "sampler", "guidance", "snr")

# The paper's FID-50K for the matching rows (pMF arXiv 2601.22158), keyed by arm label.
PAPER_NUMBERS: dict[str, dict[str, str]] = {
    "prediction": {
        "x-pred, 16 px, patch 4 (dim 16)": "64 px B/4, dim 48: x 3.80",
        "u-pred, 16 px, patch 4 (dim 16)": "64 px B/4, dim 48: u 3.82",
        "x-pred, 64 px, patch 16 (dim 256)": "256 px B/16, dim 768: x 9.56",
        "u-pred, 64 px, patch 16 (dim 256)": "256 px B/16, dim 768: u 164.89",
    },
    "optimizer": {"Muon (pMF)": "9.56 (160 ep), 8.71 (320 ep)", "Adam": "18.88 (160 ep), 11.86 (320 ep)"},
    "sampler": {"full plane 0 <= r <= t (pMF)": "3.53", "only r = t": "194.53", "only r = 0": "389.28",
                "both lines (r = t or r = 0)": "106.59"},
    "snr": {},
    "guidance": {"trained-in CFG (pMF)": "best omega 8.5 on [0.1, 0.7] (B/16): 3.12 (with perceptual loss)",
                 "trained without CFG": "not reported"},
}
