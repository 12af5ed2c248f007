"""The toy network: a ReLU MLP on ``[z, t, h]`` (pMF Fig. 2: 7 layers, width 256).

The same network serves both parametrisations; only the meaning of its output differs:

* ``"x"`` -- x-prediction (pMF): the output is x_theta, turned into ``u = (z - x_theta) / t`` by
  ``pmf_ref.u_fn_from_x_fn``;
* ``"u"`` -- u-prediction (iMF): the output is u itself.
"""
from __future__ import annotations

import torch
from torch import nn

from full import fast_jvp

PREDICTIONS = ("x", "u")
"""What the network's output means: the denoised point (pMF) or the average velocity (iMF)."""
DEPTH = 7    # Linear layers, as in pMF's toy (JiT's toy used 5)
WIDTH = 256  # hidden width, as in pMF's toy
TIME_FEATURES = 2  # (t, h = t - r), appended raw: both already lie in [0, 1]


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) whose JVP tangent costs one GEMM
    (``full.fast_jvp.linear``; PyTorch's own forward-mode ``addmm`` also multiplies by a zero
    weight tangent)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_jvp.linear(x, self.weight, self.bias)


class ToyMLP(nn.Module):
    """``f(z, r, t) = W_L relu(... relu(W_1 [z, t, t - r] + b_1) ...) + b_L``, (B, D) -> (B, D).

    Time features are the raw ``t`` and ``h = t - r`` (the papers leave the choice open; pMF's
    ViT conditions on h, and a 2-feature input keeps the toy small). ``depth`` counts Linear
    layers, so there are ``depth - 1`` hidden ReLU layers of ``width`` units.
    """

    def __init__(self, dim: int, *, depth: int = DEPTH, width: int = WIDTH):
        super().__init__()
        if depth < 2:
            raise ValueError(f"depth must be >= 2 Linear layers, got {depth}")
        sizes = [dim + TIME_FEATURES] + [width] * (depth - 1) + [dim]
        layers: list[nn.Module] = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
            layers += [Linear(fan_in, fan_out), nn.ReLU()]
        self.layers = nn.Sequential(*layers[:-1])  # no ReLU after the output layer

    def forward(self, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Args: z (B, D); r, t (B,). Returns the raw output, (B, D)."""
        features = torch.stack([t, t - r], dim=1)                       # (B, 2)
        return self.layers(torch.cat([z, features], dim=1))              # (B, D)
