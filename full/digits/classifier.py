"""A small 8x8 digits CNN, trained deterministically on the training split and cached: the "Inception" of
the digits benchmark. Its penultimate features give the Fréchet distance; its argmax the class accuracy.

Training is fully determined by ``CLASSIFIER_SEED`` and ``CLASSIFIER_EPOCHS`` (single-threaded CPU
convolutions are deterministic), so the cached file can always be rebuilt bit for bit; the cache is
keyed by those settings and by a checksum of the training split, and is rebuilt when any of them changes.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import CheckpointError, read_checkpoint_file, save_checkpoint
from .data import NUM_CLASSES, load_digits_split

CLASSIFIER_SEED = 0
CLASSIFIER_EPOCHS = 20
"""Enough for ~98% held-out accuracy on the 500 held-out digits."""
CLASSIFIER_BATCH = 64
CLASSIFIER_LR = 1e-3
FEATURE_DIM = 64
"""Width of the penultimate layer = dimension of the Fréchet-distance feature space."""
CLASSIFIER_VERSION = 1
"""Bump when the architecture or the training recipe changes, so stale caches are rebuilt."""
CACHE_NAME = "digits_classifier.pt"


class DigitsClassifier(nn.Module):
    """conv(1->32) -> conv(32->64) -> 2x2 max-pool -> Linear(1024 -> 64) -> ReLU [features] -> Linear(64 -> 10)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.hidden = nn.Linear(64 * 4 * 4, FEATURE_DIM)
        self.logits = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, x8: torch.Tensor) -> torch.Tensor:
        """Penultimate features, (B, 1, 8, 8) in [-1, 1] -> (B, FEATURE_DIM)."""
        h = F.relu(self.conv1(x8))                                   # (B, 32, 8, 8)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)                   # (B, 64, 4, 4)
        return F.relu(self.hidden(h.flatten(1)))                     # (B, 64)

    def forward(self, x8: torch.Tensor) -> torch.Tensor:
        return self.logits(self.features(x8))                        # (B, 10)


def _split_checksum(x: torch.Tensor, y: torch.Tensor) -> float:
    weights = torch.arange(1, x.numel() + 1, dtype=torch.float64).reshape(x.shape)
    return float((x.double() * weights).sum() + (y.double() * torch.arange(1, len(y) + 1)).sum())


def train_classifier(x8: torch.Tensor, y: torch.Tensor, *, epochs: int = CLASSIFIER_EPOCHS,
                     seed: int = CLASSIFIER_SEED) -> DigitsClassifier:
    """Adam, cross-entropy, fixed seed and epoch count; shuffling from a seeded generator.

    Args:
        x8: (N, 1, 8, 8) in [-1, 1].  y: (N,) labels.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)                                          # the layers' default init
    model = DigitsClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=CLASSIFIER_LR)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), CLASSIFIER_BATCH):
            index = order[start:start + CLASSIFIER_BATCH]
            loss = F.cross_entropy(model(x8[index]), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


def load_or_train_classifier(cache_dir: str | os.PathLike) -> DigitsClassifier:
    """The cached classifier from ``cache_dir/digits_classifier.pt``; trained and cached (atomically) if
    absent or stale."""
    data = load_digits_split()
    meta = {"version": CLASSIFIER_VERSION, "seed": CLASSIFIER_SEED, "epochs": CLASSIFIER_EPOCHS,
            "split_checksum": _split_checksum(data.x_train, data.y_train)}
    path = Path(cache_dir) / CACHE_NAME
    if path.exists():
        try:
            cached = read_checkpoint_file(path)
            if isinstance(cached, dict) and cached.get("meta") == meta:
                model = DigitsClassifier()
                model.load_state_dict(cached["state_dict"])
                return model.eval()
        except (CheckpointError, RuntimeError, KeyError) as error:   # a cache: a damaged file is rebuilt
            print(f"rebuilding the digits classifier cache: {error}", flush=True)
    model = train_classifier(data.x_train, data.y_train)
    save_checkpoint(path, {"meta": meta, "state_dict": model.state_dict()})
    return model
