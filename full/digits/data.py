"""scikit-learn's digits as a tiny image benchmark: fixed split, [-1, 1], upsampled to any resolution.

The 1,797 grayscale 8x8 digits ship inside scikit-learn (``sklearn.datasets.load_digits``), so nothing is
downloaded. Pixel values 0..16 are mapped to ``x = value / 8 - 1`` in [-1, 1]. The held-out split is
``HELDOUT_PER_CLASS`` digits of every class, drawn once by a fixed seed; the rest (1,297) is the training split.

Upsampling to ``res`` x ``res`` is bilinear and *separable*, so it is the linear map ``X -> A X A^T`` with
``A`` a fixed (res, 8) matrix. Every training image therefore lies in a 64-dimensional linear subspace of
the res^2-dimensional pixel space -- a low-dimensional "data manifold", which is exactly the situation of
pMF's argument for x-prediction. ``A``'s pseudo-inverse maps any image back to its 8x8 least-squares
coordinates (exactly inverting the upsampling on real digits), and ``(I - P)`` with ``P = A A^+`` on both
axes measures how far a generated image leaves that subspace.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

DIGITS_SIZE = 8
"""Side of the original digits (8x8)."""
NUM_CLASSES = 10
HELDOUT_PER_CLASS = 50
"""Held-out digits per class: 500 in all, the same count as the generated sets (50 per class, as FID-50K)."""
DIGITS_TOTAL = 1797
"""Images in scikit-learn's digits."""
TRAIN_SIZE = DIGITS_TOTAL - NUM_CLASSES * HELDOUT_PER_CLASS
"""1,297 training digits: the largest batch the trainer can draw from them."""
SPLIT_SEED = 0
"""Seed of the one permutation that defines the split (numpy PCG64: identical on every platform)."""
DIGITS_MAX_VALUE = 16.0
"""Raw digits pixels are integers 0..16."""


class DigitsSplit(NamedTuple):
    x_train: torch.Tensor   # (N_train, 1, 8, 8) in [-1, 1], float32
    y_train: torch.Tensor   # (N_train,) int64
    x_heldout: torch.Tensor  # (N_heldout, 1, 8, 8)
    y_heldout: torch.Tensor  # (N_heldout,)


def load_digits_split() -> DigitsSplit:
    """The fixed train / held-out split of scikit-learn's digits, scaled to [-1, 1].

    Returns:
        ``DigitsSplit`` with 1,297 training and 500 held-out (50 per class) 8x8 images.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32) / (DIGITS_MAX_VALUE / 2.0) - 1.0   # (1797, 8, 8)
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    heldout = np.zeros(len(labels), dtype=bool)
    for k in range(NUM_CLASSES):
        heldout[[i for i in order if labels[i] == k][:HELDOUT_PER_CLASS]] = True
    x = torch.from_numpy(images).unsqueeze(1)                                    # (1797, 1, 8, 8)
    y = torch.from_numpy(labels)
    keep = torch.from_numpy(~heldout)
    return DigitsSplit(x[keep], y[keep], x[~keep], y[~keep])


def upsampling_matrix(resolution: int) -> torch.Tensor:
    """The (res, 8) matrix ``A`` of 1-D linear interpolation, so that bilinear upsampling is ``A X A^T``.

    Built by interpolating the 8 unit vectors with ``F.interpolate(mode="linear", align_corners=False)``.
    """
    if resolution < DIGITS_SIZE or resolution % DIGITS_SIZE:
        raise ValueError(f"resolution must be a multiple of {DIGITS_SIZE}, got {resolution}")
    eye = torch.eye(DIGITS_SIZE, dtype=torch.float64).unsqueeze(1)               # (8, 1, 8): batch of unit vectors
    columns = F.interpolate(eye, size=resolution, mode="linear", align_corners=False)   # (8, 1, res)
    return columns[:, 0, :].T.contiguous()                                        # (res, 8)


def upsample(x8: torch.Tensor, resolution: int) -> torch.Tensor:
    """Bilinear upsampling ``X -> A X A^T`` of (B, C, 8, 8) images to (B, C, res, res)."""
    a = upsampling_matrix(resolution).to(x8.dtype)
    return a @ x8 @ a.T


def to_digits_coordinates(x: torch.Tensor) -> torch.Tensor:
    """Least-squares 8x8 coordinates ``A^+ X (A^+)^T`` of (B, C, res, res) images -> (B, C, 8, 8).

    Exact inverse of :func:`upsample` on real digits; for a generated image it keeps only its component
    in the data subspace (the classifier sees that component; :func:`off_subspace_rms` measures the rest).
    """
    a_pinv = torch.linalg.pinv(upsampling_matrix(x.shape[-1])).to(x.dtype)       # (8, res)
    return a_pinv @ x @ a_pinv.T


def off_subspace_rms(x: torch.Tensor) -> torch.Tensor:
    """Per-image RMS of the part of ``x`` outside the span of upsampled digits: ``||(I - P) x|| / sqrt(D)``.

    ``P x = A A^+ X (A A^+)^T`` is the orthogonal projection onto the 64-dimensional data subspace, so real
    (upsampled) digits give 0 and white noise of std s gives about ``s * sqrt(1 - 64 / res^2)``.

    Args:
        x: (B, C, res, res).
    Returns:
        (B,).
    """
    a = upsampling_matrix(x.shape[-1]).to(x.dtype)
    projector = a @ torch.linalg.pinv(a)                                          # (res, res)
    residual = x - projector @ x @ projector.T
    return residual.flatten(1).square().mean(dim=1).sqrt()


class DigitsDataset(torch.utils.data.Dataset):
    """The training (or held-out) split upsampled to ``resolution``: items ``(image (1, res, res), label)``."""

    def __init__(self, resolution: int, split: str = "train"):
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        data = load_digits_split()
        x8, y = (data.x_train, data.y_train) if split == "train" else (data.x_heldout, data.y_heldout)
        # Precomputed once: 1,297 images at 128 px are 85 MB, and the trainer reads them every step.
        self.images = upsample(x8, resolution).contiguous()                      # (N, 1, res, res)
        self.labels = y

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])
