"""Building blocks of the pMF ViT: RMSNorm, 2-D RoPE, attention, SwiGLU, the gated block, embedders.

Every op here is written with plain tensor arithmetic (matmul, softmax, elementwise), so that
forward-mode AD (the core's JVP) goes through it on CPU and GPU. Where an operand carries no tangent
-- a weight, a norm gain, a residual gate, the RoPE tables, a Python number -- the op goes through
``full/fast_jvp.py`` (``linear``, ``scale``, ``rotate_pairs``, ``rms_normalize``, ``softmax_attention``,
``silu_mul``): the plain op in a plain forward; inside the JVP an op whose tangent costs one application
of its derivative, records no autograd history and is not kept alive by the saved activations
(PyTorch's own formulas pay for zero tangents there: a third GEMM per linear, a slow path per
elementwise op, and a second copy of the activations). Attention in a GPU's ``no_grad`` passes
(sampling, the recipe's guidance passes) runs the fused ``F.scaled_dot_product_attention``; with
gradient, inside the JVP and on CPU it is explicit matmul + softmax, which forward-mode AD supports.
Token layout everywhere: ``(B, L, W)`` with L tokens of width W; per-head tensors ``(B, heads, L, head_dim)``.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import fast_jvp

RMS_EPS = 1e-6             # pMF (and JiT) RMSNorm epsilon
ROPE_THETA = 1e4           # RoPE base frequency
SINUSOID_DIM = 256         # width of the sinusoidal features of a conditioning scalar
SINUSOID_MAX_PERIOD = 1e4  # longest period of those features
SWIGLU_RATIO = 8 / 3       # SwiGLU hidden = int(8/3 * W): same parameters as a 4x GELU MLP
SWIGLU_ROUND_WIDTH = 1024  # above this width the released network rounds the hidden size up to a multiple of 8
BLOCK_INIT_STD = 0.32      # released init: block Linear weights ~ N(0, (0.32 / sqrt(fan_in))^2)
EMBED_INIT_SCALE = 1.0     # Var[W] = 1 / fan_in for the scalar-embedder MLPs and the label table


def init_linear_(layer: nn.Linear | nn.Conv2d, scale: float) -> None:
    """Weights ~ N(0, scale / fan_in), bias = 0 (variance scaling, 'fan_in', normal)."""
    fan_in = layer.weight[0].numel()  # in_features, or in_channels * k * k for a conv
    nn.init.normal_(layer.weight, std=math.sqrt(scale / fan_in))
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def init_xavier_(layer: nn.Conv2d) -> None:
    """Weights Xavier-uniform (fans counted with the kernel area), bias = 0: the released patch embedding."""
    nn.init.xavier_uniform_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) whose JVP tangent costs one GEMM."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fast_jvp.linear(x, self.weight, self.bias)


# ----------------------------------------------------------------------------- normalisation

class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x^2, -1) + eps) * g`` with a learned per-channel gain g (init 1).

    Written out rather than ``nn.RMSNorm`` so that the JVP goes through ``full/fast_jvp.py``'s ops;
    the statistic is taken in float32 (or float64) even under bf16 autocast.
    """

    def __init__(self, dim: int, eps: float = RMS_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_stat = x if x.dtype == torch.float64 else x.float()
        return fast_jvp.scale(fast_jvp.rms_normalize(x_stat, self.eps), self.weight).to(x.dtype)


# ----------------------------------------------------------------------------- 2-D RoPE

def rope_angles_2d(grid: int, head_dim: int, num_prefix: int, theta: float = ROPE_THETA) -> torch.Tensor:
    """Rotation angles of 2-D RoPE for ``num_prefix`` unrotated tokens followed by a grid x grid
    raster of patch tokens.

    The head dimension is read as head_dim/2 channel pairs (2i, 2i+1); the first head_dim/4 pairs
    rotate with the patch's row index, the last head_dim/4 with its column index, each axis using
    frequencies ``theta^(-2k / (head_dim/2))``, k = 0 .. head_dim/4 - 1 (half the head dim per axis).
    Prefix (conditioning) tokens get angle 0, i.e. no rotation.

    Returns:
        angles, (num_prefix + grid^2, head_dim / 2).
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
    axis_dim = head_dim // 2
    freqs = theta ** (-torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim)  # (head_dim/4,)
    pos = torch.arange(grid, dtype=torch.float64)
    row = (pos[:, None, None] * freqs).expand(grid, grid, -1)  # (grid, grid, head_dim/4)
    col = (pos[None, :, None] * freqs).expand(grid, grid, -1)
    patch_angles = torch.cat([row, col], dim=-1).reshape(grid * grid, axis_dim)
    prefix_angles = torch.zeros(num_prefix, axis_dim, dtype=torch.float64)
    return torch.cat([prefix_angles, patch_angles], dim=0)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs: ``(a, b) -> (a cos - b sin, a sin + b cos)``.

    Args:
        x: (B, heads, L, head_dim).  cos, sin: (L, head_dim / 2).
    Returns:
        (B, heads, L, head_dim).
    """
    return fast_jvp.rotate_pairs(x, cos, sin)


# ----------------------------------------------------------------------------- attention

FUSED_ATTENTION_DEVICES = ("cuda",)
"""Device types whose no-grad passes use the fused SDPA kernel. Not the CPU: at the benchmark's 36
tokens the fused CPU kernel is slower than matmul + softmax (1.84 vs 1.43 ms, batch 8, one thread; it
wins at 276 tokens, 4.1 vs 10.8 ms) and ``FlopCounterMode`` does not count it."""


def fused_attention_allowed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :func:`attention` may run the fused SDPA kernel: on a :data:`FUSED_ATTENTION_DEVICES`
    device, under ``no_grad``, no operand with a tangent, outside ``full.fast_jvp.reference_ops()``."""
    return (q.device.type in FUSED_ATTENTION_DEVICES and not torch.is_grad_enabled()
            and not fast_jvp.reference_ops_active()
            and not (fast_jvp.has_tangent(q) or fast_jvp.has_tangent(k) or fast_jvp.has_tangent(v)))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, use_sdpa_math: bool = False) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d)) v`` with the softmax in float32.

    Where :func:`fused_attention_allowed` (GPU, ``no_grad``, no tangent: sampling and the recipe's
    guidance passes): the fused ``F.scaled_dot_product_attention`` (equal to rounding; its kernels keep
    the softmax in float32 under bf16 too). Otherwise explicit matmul + softmax
    (``full.fast_jvp.softmax_attention``): forward-mode AD is not implemented by the fused kernels
    (flash / memory-efficient / cuDNN, and the default CPU path), and with gradient the explicit form
    gives a plain forward the JVP primal's kernels.
    ``use_sdpa_math=True`` instead always calls ``F.scaled_dot_product_attention`` pinned to the MATH
    backend, which also supports forward AD (same numbers up to rounding; it does not upcast
    bf16 scores to float32).

    Args:
        q, k, v: (B, heads, L, d).
    Returns:
        (B, heads, L, d).
    """
    if use_sdpa_math:
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v)
    if fused_attention_allowed(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)
    return fast_jvp.softmax_attention(q, k, v)


class Attention(nn.Module):
    """Multi-head self-attention: bias-free q, k, v, out; per-head RMSNorm on q and k (qk-norm);
    2-D RoPE on the patch tokens (angles given by the caller)."""

    def __init__(self, width: int, heads: int, use_sdpa_math: bool = False):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.heads = heads
        self.use_sdpa_math = use_sdpa_math
        self.q = Linear(width, width, bias=False)
        self.k = Linear(width, width, bias=False)
        self.v = Linear(width, width, bias=False)
        self.out = Linear(width, width, bias=False)
        self.q_norm = RMSNorm(width // heads)
        self.k_norm = RMSNorm(width // heads)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: (B, L, W); cos, sin: (L, head_dim/2). Returns (B, L, W)."""
        def split_heads(tokens):                                  # (B, L, W) -> (B, heads, L, d)
            return tokens.unflatten(-1, (self.heads, -1)).transpose(1, 2)
        q = apply_rope(self.q_norm(split_heads(self.q(x))), cos, sin)
        k = apply_rope(self.k_norm(split_heads(self.k(x))), cos, sin)
        v = split_heads(self.v(x))
        mixed = attention(q, k, v, self.use_sdpa_math)            # (B, heads, L, d)
        return self.out(mixed.transpose(1, 2).flatten(2))         # (B, L, W)


# ----------------------------------------------------------------------------- MLP and block

def swiglu_hidden(width: int) -> int:
    """SwiGLU hidden width: ``int(8/3 * W)`` (B: 2048, L: 2730), rounded up to a multiple of 8 when
    W > 1024 (H: 3413 -> 3416), as in the authors' released network (their parameter counts need it)."""
    hidden = int(width * SWIGLU_RATIO)
    return -(-hidden // 8) * 8 if width > SWIGLU_ROUND_WIDTH else hidden


class SwiGLU(nn.Module):
    """``out(silu(gate(x)) * value(x))``, all bias-free, hidden :func:`swiglu_hidden`."""

    def __init__(self, width: int):
        super().__init__()
        hidden = swiglu_hidden(width)
        self.gate = Linear(width, hidden, bias=False)
        self.value = Linear(width, hidden, bias=False)
        self.out = Linear(hidden, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(fast_jvp.silu_mul(self.gate(x), self.value(x)))


class _RecomputeInBackward(torch.autograd.Function):
    """Attach a backward to a block output ``y`` computed without autograd history: the backward recomputes
    the block's *primal* from its saved input (no tangent) and differentiates that. Outputs ``y`` itself."""

    @staticmethod
    def forward(ctx, run, x, y, *parameters):
        ctx.run, ctx.parameters = run, parameters
        ctx.save_for_backward(x)
        ctx.autocast = (x.device.type, torch.is_autocast_enabled(x.device.type),
                        torch.get_autocast_dtype(x.device.type))
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        device_type, enabled, dtype = ctx.autocast
        inputs = (x.detach().requires_grad_(ctx.needs_input_grad[1]),)
        parameters = tuple(p for p, needed in zip(ctx.parameters, ctx.needs_input_grad[3:]) if needed)
        with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            y = ctx.run(inputs[0])
        wanted = inputs[:1] if ctx.needs_input_grad[1] else ()
        grads = iter(torch.autograd.grad(y, wanted + parameters, grad, allow_unused=True))
        grad_x = next(grads) if ctx.needs_input_grad[1] else None
        return (None, grad_x, None, *(next(grads) if needed else None for needed in ctx.needs_input_grad[3:]))


def recompute_in_backward(block: Callable[..., torch.Tensor], x: torch.Tensor, *args,
                          parameters: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``block(x, *args)`` -- a function of ``x``, ``args`` (no gradient) and ``parameters`` -- keeping only ``x`` for the backward (activation checkpointing), JVP included.

    ``torch.utils.checkpoint`` fails under forward-mode AD (the recomputation saves a different number of
    tensors). It is not needed: the backward needs only the primal path (du/dt enters every pMF loss under
    a stop-gradient, and the tangents of ``full.fast_jvp``'s ops carry no graph). So the block runs once
    without autograd history -- primal and, inside the JVP, tangent -- and :class:`_RecomputeInBackward`
    gives the primal a backward that reruns the block's primal from the saved input. The activations
    between blocks are the only ones kept; the backward pays one more block forward. Gradients equal the
    plain block's (tests/test_full_layers_checkpointing.py). Under ``torch.func`` transforms or ``reference_ops()`` (whose
    tangents carry a graph) and without gradient it is the plain call.
    """
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in parameters))
    if (not needs_grad or fast_jvp.reference_ops_active()
            or torch._C._functorch.peek_interpreter_stack() is not None):   # as fast_jvp: functorch's duals
        return block(x, *args)
    with torch.no_grad():
        y = block(x, *args)
    primal_x = fwAD.unpack_dual(x).primal
    primal_y, tangent_y = fwAD.unpack_dual(y)
    primal_y = _RecomputeInBackward.apply(lambda inputs: block(inputs, *args), primal_x, primal_y, *parameters)
    return primal_y if tangent_y is None else fwAD.make_dual(primal_y, tangent_y)


class Block(nn.Module):
    """Pre-norm transformer block with per-channel residual gates initialised to zero:

        x <- x + g_attn * Attn(RMSNorm(x));   x <- x + g_mlp * SwiGLU(RMSNorm(x))

    With g = 0 every block starts as the identity map. ``recompute`` (set by
    ``PMFViT(activation_checkpointing=True)``): calls through ``Block.__call__`` keep only the block's input
    for the backward and recompute the rest there (:func:`recompute_in_backward`).
    """

    def __init__(self, width: int, heads: int, use_sdpa_math: bool = False):
        super().__init__()
        self.recompute = False
        self.norm1 = RMSNorm(width)
        self.attn = Attention(width, heads, use_sdpa_math)
        self.norm2 = RMSNorm(width)
        self.mlp = SwiGLU(width)
        self.gate_attn = nn.Parameter(torch.zeros(width))
        self.gate_mlp = nn.Parameter(torch.zeros(width))
        for layer in self.modules():
            if isinstance(layer, nn.Linear):
                init_linear_(layer, BLOCK_INIT_STD ** 2)

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.recompute:
            return recompute_in_backward(super().__call__, x, cos, sin, parameters=tuple(self.parameters()))
        return super().__call__(x, cos, sin)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + fast_jvp.scale(self.attn(self.norm1(x), cos, sin), self.gate_attn)
        return x + fast_jvp.scale(self.mlp(self.norm2(x)), self.gate_mlp)


# ----------------------------------------------------------------------------- embedders

class BottleneckPatchEmbed(nn.Module):
    """Patchify through a low-rank bottleneck: p x p conv (stride p) to ``bottleneck`` channels,
    then a 1x1 conv to the width (JiT), both with bias and Xavier-uniform as in the released code.
    (B, C, H, W) -> (B, (H/p)(W/p), width), raster order."""

    def __init__(self, channels: int, patch: int, bottleneck: int, width: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, bottleneck, kernel_size=patch, stride=patch, bias=True)
        self.expand = nn.Conv2d(bottleneck, width, kernel_size=1, bias=True)
        init_xavier_(self.reduce)
        init_xavier_(self.expand)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.expand(self.reduce(image)).flatten(2).transpose(1, 2)  # (B, N, width)


def sinusoidal_features(s: torch.Tensor, dim: int = SINUSOID_DIM,
                        max_period: float = SINUSOID_MAX_PERIOD) -> torch.Tensor:
    """``[cos(s f_k), sin(s f_k)]`` with ``f_k = max_period^(-k / (dim/2))``, k = 0 .. dim/2 - 1.

    Applied to the raw scalar (h in [0, 1], 1 - 1/omega in [0, 1), t_min, t_max) as in the released
    code; no rescaling by 1000.

    Args:
        s: (B,).
    Returns:
        (B, dim), dtype of ``s``.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=s.device, dtype=s.dtype) / half)
    angles = fast_jvp.scale(s[:, None], freqs)                    # (B, dim/2)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class ScalarEmbedder(nn.Module):
    """A conditioning scalar -> width: sinusoidal features, then Linear-SiLU-Linear."""

    def __init__(self, width: int):
        super().__init__()
        self.fc1 = Linear(SINUSOID_DIM, width)
        self.fc2 = Linear(width, width)
        init_linear_(self.fc1, EMBED_INIT_SCALE)
        init_linear_(self.fc2, EMBED_INIT_SCALE)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        """s: (B,) -> (B, width)."""
        features = sinusoidal_features(s.to(self.fc1.weight.dtype))
        return self.fc2(F.silu(self.fc1(features)))


class LabelEmbedder(nn.Module):
    """Class label -> width, a table with ``num_classes + 1`` rows; row ``num_classes`` is the null
    (unconditional) label used for label dropout and classifier-free guidance."""

    def __init__(self, num_classes: int, width: int):
        super().__init__()
        self.table = nn.Embedding(num_classes + 1, width)
        nn.init.normal_(self.table.weight, std=math.sqrt(EMBED_INIT_SCALE / width))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """y: (B,) long -> (B, width)."""
        return self.table(y)


__all__ = ["FUSED_ATTENTION_DEVICES", "fused_attention_allowed", "Linear", "RMSNorm", "rope_angles_2d", "apply_rope",
           "attention", "Attention", "SwiGLU", "Block", "recompute_in_backward", "BottleneckPatchEmbed", "sinusoidal_features",
           "ScalarEmbedder", "LabelEmbedder", "swiglu_hidden", "init_linear_", "init_xavier_"]
