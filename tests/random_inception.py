"""A randomly initialised Inception-v3 in torch-fidelity's layout, for the FID / IS plumbing tests.

FID and IS computed with it mean nothing; it lets every test run without the real weights and without
the network.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torchvision

from full.io import atomic_write


def save_random_inception_weights(path: str | os.PathLike, *, seed: int = 0) -> Path:
    """Write a randomly initialised Inception-v3 state dict with the layout torch-fidelity loads.

    For tests and plumbing checks only: FID/IS computed with it mean nothing. Convolutions get
    He-normal weights so activations stay O(1) through the ~100 layers (PyTorch's default init
    shrinks them to ~1e-8); batch norms keep their identity statistics.
    The layer names come from torchvision's Inception-v3 (torch-fidelity uses the same names; its
    strict ``load_state_dict`` would reject any mismatch).
    """
    generator = torch.Generator().manual_seed(seed)
    template = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False,
                                               num_classes=1008)
    state = {}
    for name, tensor in template.state_dict().items():
        if name.endswith("conv.weight") or name == "fc.weight":
            fan_in = tensor[0].numel()
            tensor = torch.randn(tensor.shape, generator=generator) * (2.0 / fan_in) ** 0.5
        state[name] = tensor.clone()
    path = Path(path)
    atomic_write(path, lambda handle: torch.save(state, handle))
    return path
