"""The pMF ViT in one file (pMF paper §4 and Table 8; the authors' released ``pmfDiT``): its layers, the
network, and the adapter that turns it into the core's callables.

    image z (B, C, H, W) --bottleneck patch embed--> N = (H/p)^2 patch tokens
    prefix: class 8 | omega 4 | t_min 2 | t_max 2 | h 4   (20 in-context tokens, no adaLN)
    [prefix, patches] + learned position embedding
      -> trunk: depth - head_depth gated blocks
      -> u-head: head_depth blocks, RMSNorm, zero-init Linear -> x_hat   (inference)
      -> v-head: head_depth blocks, RMSNorm, zero-init Linear -> x_hat_v (training only, at h = 0)

Sections, in reading order:

* **layers** -- RMSNorm, 2-D RoPE, attention, SwiGLU, the gated block, embedders. Every op is written with
  plain tensor arithmetic (matmul, softmax, elementwise), so that forward-mode AD (the core's JVP) goes
  through it on CPU and GPU. Where an operand carries no tangent -- a weight, a norm gain, a residual gate,
  the RoPE tables, a Python number -- the op goes through ``full/fast_jvp.py`` (``linear``, ``scale``,
  ``rotate_pairs``, ``rms_normalize``, ``softmax_attention``, ``silu_mul``): the plain op in a plain forward;
  inside the JVP an op whose tangent costs one application of its derivative, records no autograd history
  and is not kept alive by the saved activations (PyTorch's own formulas pay for zero tangents there: a
  third GEMM per linear, a slow path per elementwise op, and a second copy of the activations). Attention
  in a GPU's ``no_grad`` passes (sampling, the step's guidance pass) runs the fused
  ``F.scaled_dot_product_attention``; with gradient, inside the JVP and on CPU it is explicit matmul +
  softmax, which forward-mode AD supports. Token layout everywhere: ``(B, L, W)`` with L tokens of width W;
  per-head tensors ``(B, heads, L, head_dim)``.
* **the PMFViT** -- the conditioning dict, the heads, the network and ``build_model``. The network outputs a
  *denoised image* x_hat. It is conditioned on the class y, the guidance scale (as 1 - 1/omega), the
  guidance interval [t_min, t_max] and h = t - r, but not on t itself: t enters only through the x -> u
  conversion ``u = (z - x_hat) / max(t, t_eps)``, which lives in ``pmf_ref`` (never in the network). Build a
  model with ``build_model("pMF-B/16")`` or a tiny CPU preset ``build_model("pMF-T/4")``; count parameters
  and GMACs with ``python -m full.params``.
* **the adapter to the core** -- ``core_fns(model, cond)``: the network as the core's velocity callables; the
  one place that says what an output means (x or u prediction).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import pmf_ref as P

from . import fast_jvp
from .presets import ARCHITECTURES, PRESETS, RECIPES, check_preset


# ----------------------------------------------------------------------------- layers

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


# ----------------------------------------------------------------------------- layers: normalisation

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


# ----------------------------------------------------------------------------- layers: 2-D RoPE

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


# ----------------------------------------------------------------------------- layers: attention

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


# ----------------------------------------------------------------------------- layers: MLP and block

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
    plain block's (tests/test_full_model.py). Under ``torch.func`` transforms or ``reference_ops()`` (whose
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


# ----------------------------------------------------------------------------- layers: embedders

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


# ----------------------------------------------------------------------------- the PMFViT

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


# ----------------------------------------------------------------------------- the PMFViT: conditioning

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


# ----------------------------------------------------------------------------- the PMFViT: the network

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
            rest there (:func:`recompute_in_backward`; JVP included): less memory, one more forward.
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


def predicts_image(prediction: str) -> bool:
    """What a network's output means, the one place it is decided: True for x-prediction (pMF: the output is the
    denoised image x_hat), False for u-prediction (the ablation: the output is u itself). ``prediction`` is
    a PMFViT's ``prediction``, one of :data:`PREDICTIONS`; the trainer's settings and the fine-tuning loader ask
    here too."""
    return prediction == "x"


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
    if predicts_image(model.prediction):
        return P.average_velocity_from_x(z, output, t, check_values=False)
    return output


def x_hat_from_output(model: PMFViT, z: torch.Tensor, output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The denoised image a network output stands for, ``x_hat = z - max(t, t_eps) u`` with u from
    :func:`velocity_from_output` (for x-prediction: the output itself, to rounding).  Shapes as there."""
    return P.x_from_average_velocity(z, velocity_from_output(model, z, output, t), t, check_values=False)


def core_fns(model: PMFViT, cond: dict[str, torch.Tensor]) -> CoreFns:
    """The one adapter between a PMFViT and the core: the network, conditioned on ``cond``, as velocity
    callables in the core's signature (:class:`CoreFns`). It alone (through :func:`predicts_image`)
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


__all__ = ["FUSED_ATTENTION_DEVICES", "fused_attention_allowed", "Linear", "RMSNorm", "rope_angles_2d", "apply_rope",
           "attention", "Attention", "SwiGLU", "Block", "recompute_in_backward", "BottleneckPatchEmbed", "sinusoidal_features",
           "ScalarEmbedder", "LabelEmbedder", "swiglu_hidden", "init_linear_", "init_xavier_",
           "PRESETS", "ARCH_KEYS", "NUM_PREFIX_TOKENS", "PMFViT", "Head", "build_model", "make_cond",
           "CoreFns", "core_fns", "predicts_image", "velocity_from_output", "x_hat_from_output", "PREDICTIONS"]
