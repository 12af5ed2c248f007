"""The pMF ViT (pMF paper §4 and Table 8; the authors' released ``pmfDiT``), presets and the conditioning dict.

    image z (B, C, H, W) --bottleneck patch embed--> N = (H/p)^2 patch tokens
    prefix: class 8 | omega 4 | t_min 2 | t_max 2 | h 4   (20 in-context tokens, no adaLN)
    [prefix, patches] + learned position embedding
      -> trunk: depth - head_depth gated blocks
      -> u-head: head_depth blocks, RMSNorm, zero-init Linear -> x_hat   (inference)
      -> v-head: head_depth blocks, RMSNorm, zero-init Linear -> x_hat_v (training only, at h = 0)

The network outputs a *denoised image* x_hat. It is conditioned on the class y, the guidance
scale (as 1 - 1/omega), the guidance interval [t_min, t_max] and h = t - r, but not on t itself:
t enters only through the x -> u conversion ``u = (z - x_hat) / max(t, t_eps)``, which lives in
``pmf_ref`` (never here). Build a model with ``build_model("pMF-B/16")`` or a tiny CPU preset
``build_model("pMF-T/4")``; count parameters and GMACs with ``python -m full.params``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

import torch
from torch import nn

import pmf_ref as P

from .presets import ARCHITECTURES, PRESETS, RECIPES, check_preset
from .layers import BottleneckPatchEmbed, Block, LabelEmbedder, Linear, RMSNorm, ScalarEmbedder, rope_angles_2d

# In-context conditioning tokens per group (released code); 20 in all.
CLASS_TOKENS = 8
OMEGA_TOKENS = 4
INTERVAL_TOKENS = 2   # for t_min and again for t_max
H_TOKENS = 4
NUM_PREFIX_TOKENS = CLASS_TOKENS + OMEGA_TOKENS + 2 * INTERVAL_TOKENS + H_TOKENS
POS_EMBED_STD = 0.02  # learned absolute position embedding init (released code)

# What configures the network: the preset's Architecture and its recipe's noise scale; extra switches.
ARCH_KEYS = ("resolution", "patch", "depth", "width", "heads", "bottleneck", "head_depth", "channels",
             "num_classes", "noise_scale")
SWITCH_KEYS = ("v_head", "use_sdpa_math", "prediction", "activation_checkpointing")
PREDICTIONS = ("x", "u")   # what the network's output is: a denoised image (pMF) or u itself (the ablation)


# ----------------------------------------------------------------------------- conditioning

def make_cond(y: torch.Tensor, omega: torch.Tensor | float, t_min: torch.Tensor | float,
              t_max: torch.Tensor | float) -> dict[str, torch.Tensor]:
    """The conditioning dict every PMFViT forward takes.

    Args:
        y: (B,) long class labels; the null (unconditional) label is ``num_classes``.
        omega: guidance scale >= 1, (B,) or a float broadcast to (B,).
        t_min, t_max: guidance interval, (B,) or floats. (omega = 1 means no guidance; the
            interval is then irrelevant but still embedded.)
    Returns:
        ``{"y", "omega", "t_min", "t_max"}``, each (B,) on y's device; the floats as float32.
    """
    if not isinstance(y, torch.Tensor) or y.ndim != 1 or y.dtype != torch.long:
        raise ValueError(f"y must be a (B,) torch.long tensor of labels, got "
                         f"{getattr(y, 'dtype', type(y).__name__)} of shape {tuple(getattr(y, 'shape', ()))}")
    cond = {"y": y}
    for name, value in (("omega", omega), ("t_min", t_min), ("t_max", t_max)):
        value = torch.as_tensor(value, device=y.device)
        if not value.is_floating_point():
            value = value.float()
        if value.ndim == 0:
            value = value.expand(y.shape[0])
        if value.shape != y.shape:
            raise ValueError(f"{name} must be a float or a (B,) tensor with B = {y.shape[0]}, got {tuple(value.shape)}")
        cond[name] = value
    return cond


# ----------------------------------------------------------------------------- the network

class Head(nn.Module):
    """head_depth blocks, then RMSNorm and a zero-initialised Linear to p*p*C values per patch."""

    def __init__(self, depth: int, width: int, heads: int, patch_dim: int, use_sdpa_math: bool):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, use_sdpa_math) for _ in range(depth))
        self.norm = RMSNorm(width)
        self.out = Linear(width, patch_dim)   # nn.Linear's parameters; a JVP tangent of one GEMM
        nn.init.zeros_(self.out.weight)  # the network starts by predicting x_hat = 0
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: (B, 20 + N, W) -> (B, N, p*p*C), the patch tokens only."""
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.out(self.norm(x[:, NUM_PREFIX_TOKENS:]))  # drop the in-context tokens


class PMFViT(nn.Module):
    """x-prediction ViT with in-context conditioning, a u-head and a training-only v-head.

    Args:
        resolution: image side H = W.  patch: p.  channels: C.  num_classes: labels 0..K-1, K = null.
        depth: trunk + u-head blocks.  head_depth: blocks per head (the trunk has depth - head_depth).
        width, heads: token width and attention heads (head_dim = width / heads, divisible by 4).
        bottleneck: channels of the bottleneck patch embedding.
        noise_scale: s of e ~ N(0, s^2 I); stored for the trainer and sampler, unused by the network.
        v_head: build the auxiliary v-head (training); False gives the inference network.
        use_sdpa_math: attention through ``F.scaled_dot_product_attention`` on the MATH backend
            instead of explicit matmul + softmax (both support forward-mode AD).
        prediction: "x" (pMF: the output is a denoised image) or "u" (ablation: the output is read as the
            average velocity). Only :func:`velocity_from_output` (the adapter :func:`core_fns`) reads it;
            checkpoints record it.
        activation_checkpointing: every block keeps only its input for the backward and recomputes the
            rest there (``full.layers.recompute_in_backward``; JVP included): less memory, one more forward.
    """

    def __init__(self, *, resolution: int, patch: int, depth: int, width: int, heads: int, bottleneck: int,
                 head_depth: int, channels: int = 3, num_classes: int = 1000, noise_scale: float = 1.0,
                 v_head: bool = True, use_sdpa_math: bool = False, prediction: str = "x",
                 activation_checkpointing: bool = False):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
        self.prediction = prediction
        _check_arch(resolution=resolution, patch=patch, depth=depth, width=width, heads=heads,
                    bottleneck=bottleneck, head_depth=head_depth, channels=channels, num_classes=num_classes)
        self.resolution, self.patch, self.channels = resolution, patch, channels
        self.num_classes, self.noise_scale, self.has_v_head = num_classes, float(noise_scale), v_head
        self.grid = resolution // patch
        num_tokens = NUM_PREFIX_TOKENS + self.grid ** 2

        self.patch_embed = BottleneckPatchEmbed(channels, patch, bottleneck, width)
        self.y_embed = LabelEmbedder(num_classes, width)
        self.omega_embed = ScalarEmbedder(width)
        self.t_min_embed = ScalarEmbedder(width)
        self.t_max_embed = ScalarEmbedder(width)
        self.h_embed = ScalarEmbedder(width)
        token_std = 1 / math.sqrt(width)  # learned in-context tokens, as in the released code
        self.class_tokens = nn.Parameter(torch.randn(1, CLASS_TOKENS, width) * token_std)
        self.omega_tokens = nn.Parameter(torch.randn(1, OMEGA_TOKENS, width) * token_std)
        self.t_min_tokens = nn.Parameter(torch.randn(1, INTERVAL_TOKENS, width) * token_std)
        self.t_max_tokens = nn.Parameter(torch.randn(1, INTERVAL_TOKENS, width) * token_std)
        self.h_tokens = nn.Parameter(torch.randn(1, H_TOKENS, width) * token_std)
        self.pos_embed = nn.Parameter(torch.randn(1, num_tokens, width) * POS_EMBED_STD)

        self.head_dim = width // heads
        # Not persistent: rebuilt from the shapes, so checkpoints stay small and dtype-agnostic.
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        self.reset_rope_()

        self.trunk = nn.ModuleList(Block(width, heads, use_sdpa_math) for _ in range(depth - head_depth))
        patch_dim = patch * patch * channels
        self.u_head = Head(head_depth, width, heads, patch_dim, use_sdpa_math)
        self.v_head = Head(head_depth, width, heads, patch_dim, use_sdpa_math) if v_head else None
        self.activation_checkpointing = activation_checkpointing
        for block in self.modules():
            if isinstance(block, Block):
                block.recompute = activation_checkpointing

    def reset_rope_(self) -> None:
        """(Re)compute the RoPE buffers (e.g. after ``to_empty`` from the meta device)."""
        angles = rope_angles_2d(self.grid, self.head_dim, NUM_PREFIX_TOKENS)   # (L, head_dim/2), float64
        device = self.pos_embed.device if self.pos_embed.device.type != "meta" else "meta"
        dtype = self.pos_embed.dtype
        self.rope_cos = angles.cos().to(device=device, dtype=dtype)
        self.rope_sin = angles.sin().to(device=device, dtype=dtype)

    # ------------------------------------------------------------------ pieces
    def _tokens(self, z: torch.Tensor, h: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """Prefix + patch tokens with position embedding: (B, 20 + N, W)."""
        if z.ndim != 4 or tuple(z.shape[1:]) != (self.channels, self.resolution, self.resolution):
            raise ValueError(f"z must have shape (B, {self.channels}, {self.resolution}, {self.resolution}), "
                             f"got {tuple(z.shape)}")
        if cond["y"].dtype != torch.long:
            raise ValueError(f"cond['y'] must be torch.long labels, got {cond['y'].dtype}")

        def group(tokens, embedding):     # (1, n, W) + (B, W) -> (B, n, W)
            return tokens + embedding[:, None, :]
        prefix = torch.cat([
            group(self.class_tokens, self.y_embed(cond["y"])),
            group(self.omega_tokens, self.omega_embed(1 - 1 / cond["omega"])),  # omega in [1, inf) -> [0, 1)
            group(self.t_min_tokens, self.t_min_embed(cond["t_min"])),
            group(self.t_max_tokens, self.t_max_embed(cond["t_max"])),
            group(self.h_tokens, self.h_embed(h)),
        ], dim=1)                                                      # (B, 20, W)
        patches = self.patch_embed(z)                                  # (B, N, W)
        return torch.cat([prefix, patches.to(prefix.dtype)], dim=1) + self.pos_embed

    def _trunk(self, z: torch.Tensor, h: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self._tokens(z, h, cond)
        for block in self.trunk:
            x = block(x, self.rope_cos, self.rope_sin)
        return x                                                       # (B, 20 + N, W)

    def _unpatchify(self, patch_values: torch.Tensor) -> torch.Tensor:
        """(B, N, p*p*C), raster patch order, per patch (p, p, C) -> image (B, C, H, W)."""
        g, p, c = self.grid, self.patch, self.channels
        x = patch_values.reshape(-1, g, g, p, p, c)                    # (B, gy, gx, py, px, C)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(-1, c, g * p, g * p)

    def _decode(self, head: Head, x: torch.Tensor) -> torch.Tensor:
        return self._unpatchify(head(x, self.rope_cos, self.rope_sin))

    # ------------------------------------------------------------------ public API
    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward_u(self, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor,
                  cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """The u-head's denoised image ``x_hat(z, r, t)``; conditions on h = t - r (not on t).

        Args:
            z: z_t, (B, C, H, W).  r, t: (B,) with 0 <= r <= t <= 1.  cond: from :func:`make_cond`.
        Returns:
            x_hat, (B, C, H, W).
        """
        return self._decode(self.u_head, self._trunk(z, t - r, cond))

    def forward_v(self, z: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """The v-head's denoised image at h = 0 (its velocity is ``(z - x_hat_v) / max(t, t_eps)``).

        Args:
            z: (B, C, H, W).  t: (B,) (unused by the network; kept for the common signature).
            cond: from :func:`make_cond`.
        Returns:
            x_hat_v, (B, C, H, W).
        """
        if self.v_head is None:
            raise RuntimeError("this PMFViT was built with v_head=False (inference network); forward_v needs the v-head")
        return self._decode(self.v_head, self._trunk(z, torch.zeros_like(t), cond))

    def forward_uv(self, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor,
                   cond: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Both heads on one trunk pass at h = t - r, as the released network always computes them:
        ``(x_hat_u, x_hat_v)``, each (B, C, H, W)."""
        tokens = self.forward_trunk(z, r, t, cond)
        return self.decode_u(tokens), self.decode_v(tokens)

    def forward_trunk(self, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor,
                      cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """The shared trunk at h = t - r: tokens (B, 20 + N, W), the input of either head's decode."""
        return self._trunk(z, t - r, cond)

    def decode_u(self, tokens: torch.Tensor) -> torch.Tensor:
        """The u-head on the trunk's tokens: its output image (B, C, H, W)."""
        return self._decode(self.u_head, tokens)

    def decode_v(self, tokens: torch.Tensor) -> torch.Tensor:
        """The v-head on the trunk's tokens: its output image (B, C, H, W)."""
        if self.v_head is None:
            raise RuntimeError("this PMFViT was built with v_head=False (inference network); the v-head is needed")
        return self._decode(self.v_head, tokens)

    def forward(self, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor,
                cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """Same as :meth:`forward_u`."""
        return self.forward_u(z, r, t, cond)

    def param_count(self, with_v_head: bool = True) -> int:
        """Number of parameters; ``with_v_head=False`` counts the inference network only."""
        total = sum(p.numel() for p in self.parameters())
        if not with_v_head and self.v_head is not None:
            total -= sum(p.numel() for p in self.v_head.parameters())
        return total


# ----------------------------------------------------------------------------- the adapter to the core

class CoreFns(NamedTuple):
    """A PMFViT with its conditioning bound, as the callables of ``pmf_ref`` (built by :func:`core_fns`).

    Every one returns a *velocity*, so nothing downstream asks what the network predicts.
    """
    u: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    """``(z, r, t) -> u``: the u-head's average velocity at h = t - r (sampling, Alg. 1)."""
    u_and_trunk: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    """``(z, r, t) -> (u, tokens)``: the function the training JVP differentiates; the trunk's tokens are its
    auxiliary output, which ``pmf_ref.average_velocity_jvp`` returns as primals (no tangent)."""
    v_from_trunk: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    """``(z, t, tokens) -> v``: the v-head on those tokens -- run after the JVP, it does no tangent work."""
    v: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    """``(z, t) -> v``: the v-head's instantaneous velocity at h = 0 (the guidance pass)."""


def velocity_from_output(model: PMFViT, z: torch.Tensor, output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the network's output means: x-prediction (pMF) outputs the denoised image, so
    ``u = (z - x_hat) / max(t, t_eps)`` (``pmf_ref.average_velocity_from_x``); u-prediction (the ablation)
    outputs u itself. Times are not value-checked here (no host sync): the callers check them on entry.

    Args:
        model: the PMFViT that produced ``output``.  z: its input z_t, (B, C, H, W).  output: (B, C, H, W).
        t: (B,).
    Returns:
        the velocity, (B, C, H, W).
    """
    if model.prediction == "x":
        return P.average_velocity_from_x(z, output, t, check_values=False)
    return output


def x_hat_from_output(model: PMFViT, z: torch.Tensor, output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The denoised image a network output stands for, ``x_hat = z - max(t, t_eps) u`` with u from
    :func:`velocity_from_output` (for x-prediction: the output itself, to rounding).  Shapes as there."""
    return P.x_from_average_velocity(z, velocity_from_output(model, z, output, t), t, check_values=False)


def core_fns(model: PMFViT, cond: dict[str, torch.Tensor]) -> CoreFns:
    """The one adapter between a PMFViT and the core: the network, conditioned on ``cond``, as velocity
    callables in the core's signature (:class:`CoreFns`). It alone (through :func:`velocity_from_output`)
    decides what the output means; the training step, the sampler, the monitor and digits go through it.

    Args:
        model: a PMFViT.  cond: from :func:`make_cond` (labels, omega, interval), (B,) each.
    """
    def u(z, r, t):
        return velocity_from_output(model, z, model.forward_u(z, r, t, cond), t)

    def u_and_trunk(z, r, t):
        tokens = model.forward_trunk(z, r, t, cond)
        return velocity_from_output(model, z, model.decode_u(tokens), t), tokens

    def v_from_trunk(z, t, tokens):
        return velocity_from_output(model, z, model.decode_v(tokens), t)

    def v(z, t):
        return velocity_from_output(model, z, model.forward_v(z, t, cond), t)

    return CoreFns(u, u_and_trunk, v_from_trunk, v)


def _check_arch(**arch: int) -> None:
    for name, value in arch.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if arch["resolution"] % arch["patch"]:
        raise ValueError(f"resolution {arch['resolution']} must be divisible by patch {arch['patch']}")
    if not 1 <= arch["head_depth"] <= arch["depth"]:
        raise ValueError(f"head_depth must lie in [1, depth={arch['depth']}], got {arch['head_depth']}")
    if arch["width"] % arch["heads"] or (arch["width"] // arch["heads"]) % 4:
        raise ValueError(f"width / heads must be an integer divisible by 4 (2-D RoPE), "
                         f"got width {arch['width']}, heads {arch['heads']}")


def build_model(preset: str, **overrides) -> PMFViT:
    """Build a PMFViT from a preset name, e.g. ``build_model("pMF-T/4", num_classes=10, channels=1)``.

    Args:
        preset: one of :data:`PRESETS`.
        overrides: any architecture key (resolution, patch, depth, width, heads, bottleneck,
            head_depth, channels, num_classes, noise_scale) or switch (v_head, use_sdpa_math, prediction,
            activation_checkpointing).
    Returns:
        PMFViT, on the current default device (use ``with torch.device("meta"):`` to count).
    """
    check_preset(preset)
    unknown = set(overrides) - set(ARCH_KEYS) - set(SWITCH_KEYS)
    if unknown:
        raise ValueError(f"unknown model override(s) {sorted(unknown)}; allowed: {list(ARCH_KEYS + SWITCH_KEYS)}")
    arch = {**dataclasses.asdict(ARCHITECTURES[preset]), "noise_scale": RECIPES[preset].noise_scale}
    return PMFViT(**{**arch, **overrides})


__all__ = ["PRESETS", "ARCH_KEYS", "NUM_PREFIX_TOKENS", "PMFViT", "Head", "build_model", "make_cond",
           "CoreFns", "core_fns", "velocity_from_output", "x_hat_from_output", "PREDICTIONS"]
