"""Metrics of the digits benchmark, and their floors on held-out real digits.

* ``fd``: Fréchet distance between Gaussian fits of the classifier's penultimate features of the images
  and of the training split (the "FID" of this benchmark; lower is better).
* ``accuracy``: fraction of class-conditional samples that the classifier assigns to the class they were
  asked for (does a "3" look like a 3?).
* ``off_subspace_rms``: RMS pixel energy outside the 64-dim span of upsampled digits (0 for real data).
  The classifier only sees an image's 8x8 least-squares coordinates, so this is the metric that notices
  high-frequency noise, e.g. the noise a u-prediction network fails to remove at a large patch dimension.

The floor is the same numbers for the 500 held-out digits (50 per class, the size of every generated set).
"""
from __future__ import annotations

import numpy as np
import torch

from ..fid import feature_statistics, frechet_distance
from .classifier import DigitsClassifier
from .data import load_digits_split, off_subspace_rms, to_digits_coordinates, upsample

EVAL_BATCH = 500


class DigitsEvaluator:
    """Scores (B, 1, res, res) images against the training split with a fixed classifier."""

    def __init__(self, classifier: DigitsClassifier):
        self.classifier = classifier.eval()
        data = load_digits_split()
        self.reference = feature_statistics(self._features_and_logits(data.x_train)[0])

    @torch.no_grad()
    def _features_and_logits(self, x8: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
        features, logits = [], []
        for batch in x8.float().split(EVAL_BATCH):
            h = self.classifier.features(batch)
            features.append(h)
            logits.append(self.classifier.logits(h))
        return torch.cat(features).double().numpy(), torch.cat(logits)

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Metrics of images (B, 1, res, res) that were asked to show classes ``labels`` (B,)."""
        images = images.detach().double().cpu()
        # Deviation: samples are clipped to the data range [-1, 1] before scoring, as images are clipped
        # to [0, 255] before FID in the paper's evaluation.
        images = images.clamp(-1.0, 1.0)
        features, logits = self._features_and_logits(to_digits_coordinates(images))
        mu, sigma = feature_statistics(features)
        return {"fd": frechet_distance(mu, sigma, *self.reference),
                "accuracy": float((logits.argmax(dim=1) == labels.cpu()).double().mean()),
                "off_subspace_rms": float(off_subspace_rms(images).mean())}

    def floor(self, resolution: int) -> dict[str, float]:
        """The metrics of the 500 held-out real digits upsampled to ``resolution``."""
        data = load_digits_split()
        return self.evaluate(upsample(data.x_heldout.double(), resolution), data.y_heldout)
