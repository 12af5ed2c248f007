"""Ops whose forward-mode tangent costs what it should: a JVP at about the price of two forwards.

Why this module exists. PyTorch's forward-mode AD (``torch.func.jvp`` and ``torch.autograd.forward_ad``)
has three costs that the math does not:

* every operand without a tangent -- a weight, a norm gain, a residual gate, a RoPE table, the ``eps``
  of a norm -- gets a zero tangent that is differentiated anyway: ``x @ W.T`` runs a third GEMM
  (``x @ 0``), and an elementwise op takes a slow zero-tangent path (0.3-0.9 ms whatever the size,
  measured on one CPU thread);
* under autograd the tangent formulas are recorded like any other op (a second graph, never used:
  du/dt is stop-gradient in every pMF loss);
* every tensor autograd saves for the backward keeps its tangent alive until the JVP is done, so
  the forward holds two copies of its activations.

Each op below is the plain torch op when no operand carries a tangent (a plain forward pays one
cheap check). With a tangent it takes one of two routes, both with the plain op's value and gradient and
a tangent that is the op's derivative applied once, computed without autograd history:

* ``torch.autograd.forward_ad`` dual tensors (the route of :func:`jvp`): the op splits its operands into
  primal and tangent (``fwAD.unpack_dual``), runs the plain op on the primals -- autograd records it as
  usual and saves tangent-free tensors, and the backward is PyTorch's own, kernel for kernel -- computes
  the tangent under ``no_grad`` from the primal's values (``silu(a)``, the softmax weights, the RMS
  statistic are reused, not recomputed) and joins them with ``fwAD.make_dual``. No ``autograd.Function``
  in between: one costs 35-75 us of Python per call, about 7% of a B/16 forward over a JVP's ~340 ops
  (measured on one CPU thread). Under bf16 autocast the primal GEMMs are autocast's own, so the backward
  reuses the bf16 weight copies autocast cached in the forward instead of casting every weight again.
* inside a ``torch.func`` transform (``torch.func.jvp``, ``vmap``), whose tensors are functorch's own: a
  ``torch.autograd.Function`` with a ``jvp`` staticmethod (and a vmap rule) that saves detached tensors.

Between them, the ops of the pMF ViT and the toy MLP leave nothing to the generic formulas but views,
concatenations and residual additions.

:func:`jvp` is the engine the trainers, the toy and the digits benchmark hand to the core
(``pmf_ref.average_velocity_jvp(..., jvp=fast_jvp.jvp)``): ``torch.func.jvp``'s signature and results,
computed with ``torch.autograd.forward_ad`` dual tensors, where these ops cost about two forwards
(``torch.func.jvp`` takes a slower path through custom ``autograd.Function``s). :data:`ENGINES` lists it
with the reference (``torch.func.jvp``) and the double-backward engine, for the benchmarks.

:func:`reference_ops` turns all of this off (plain torch everywhere, explicit attention, and :func:`jvp`
through ``torch.func.jvp``): the readable path, kept for tests and benchmarks. This module, not the
core, is where the private torch APIs live (``fwAD._current_level``, the functorch interpreter stack).
"""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F

_reference_ops = False


class reference_ops:  # noqa: N801 -- a context manager, named like torch.no_grad
    """``with reference_ops():`` every op here is the plain torch op even when a tangent is present,
    attention is explicit matmul + softmax, and :func:`jvp` is ``torch.func.jvp``: the reference path. Nests; restores the previous setting on exit."""

    def __enter__(self) -> None:
        global _reference_ops
        self._previous, _reference_ops = _reference_ops, True

    def __exit__(self, *exc_info) -> None:
        global _reference_ops
        _reference_ops = self._previous


def reference_ops_active() -> bool:
    """True inside :func:`reference_ops`."""
    return _reference_ops


def has_tangent(x: torch.Tensor) -> bool:
    """True when ``x`` carries a forward-mode tangent of the current level (forward_ad or torch.func.jvp).

    A plain forward (no dual level open) returns after one integer comparison.
    """
    # fwAD.unpack_dual makes the same check first, but costs ~1 us more per call in a plain forward.
    if fwAD._current_level < 0:
        return False
    return fwAD.unpack_dual(x).tangent is not None


def custom_jvp(*tensors: torch.Tensor) -> bool:
    """Whether the custom-JVP ops run: some operand carries a tangent, outside :func:`reference_ops`."""
    return not _reference_ops and any(has_tangent(x) for x in tensors)


def _plain() -> bool:
    """The plain forward's exit, before any per-operand check: no dual level is open, or reference ops."""
    # Every op below calls this first: a 7-layer toy forward at batch 8 took 3% longer with
    # custom_jvp's per-operand checks alone (0.6 ms a call, ~2 us of checks per linear).
    return fwAD._current_level < 0 or _reference_ops


def _save(ctx, *tensors: torch.Tensor) -> None:
    """Save tangent-free views for both backward and jvp (a saved dual tensor would keep its tangent)."""
    detached = tuple(None if x is None else x.detach() for x in tensors)
    ctx.save_for_backward(*detached)
    ctx.save_for_forward(*detached)
    # An absent tangent or gradient then arrives as None, not as a materialised zero tensor.
    ctx.set_materialize_grads(False)


def _plus(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a + b


def _parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(primal, tangent)`` of x at the current forward_ad level; without a tangent, x itself (not a view: a
    parameter stays the leaf whose bf16 copy autocast caches for the whole step)."""
    primal, tangent = fwAD.unpack_dual(x)
    return (x, None) if tangent is None else (primal, tangent)


def _dual(primal: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    """``primal`` carrying ``tangent`` (cast to primal's dtype) at the current forward_ad level; primal keeps its
    autograd graph, the tangent has none."""
    return fwAD.make_dual(primal, tangent if tangent.dtype == primal.dtype else tangent.to(primal.dtype))


# ----------------------------------------------------------------------------- linear

def _linear_backward(ctx, grad, needs_grad):
    """(grad_x, grad_weight, grad_bias) of ``x W^T + b``, as autograd's mm / addmm backward."""
    if grad is None:
        return None, None, None
    x, weight = ctx.saved_tensors
    # Under autocast the forward's GEMM ran in grad's dtype (say bf16, from float32 x and W): so does this
    # one, as autograd's own backward of the recorded casts; autograd casts the results back to x's and W's.
    x, weight = x.to(grad.dtype), weight.to(grad.dtype)
    grad_2d = grad.reshape(-1, grad.shape[-1])                                      # (N, out)
    grad_x = grad_2d.mm(weight).reshape(x.shape) if needs_grad[0] else None
    grad_w = grad_2d.t().mm(x.reshape(-1, x.shape[-1])) if needs_grad[1] else None  # (out, in), contiguous
    grad_b = grad_2d.sum(0) if ctx.has_bias and needs_grad[2] else None
    return grad_x, grad_w, grad_b


class _Linear(torch.autograd.Function):
    """``y = x W^T + b``; tangent ``dx W^T`` (one GEMM), plus the terms of a weight or bias tangent."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias):
        return F.linear(x, weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias = inputs
        _save(ctx, x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad):
        return _linear_backward(ctx, grad, ctx.needs_input_grad)

    @staticmethod
    def jvp(ctx, x_t, weight_t, bias_t):
        x, weight = ctx.saved_tensors
        with torch.no_grad():
            tangent = None if x_t is None else F.linear(x_t, weight)
            tangent = _plus(tangent, None if weight_t is None else F.linear(x, weight_t))
            if bias_t is not None and tangent is None:
                return bias_t.expand(x.shape[:-1] + bias_t.shape).clone()
            return _plus(tangent, bias_t)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``.  x: (..., in); weight: (out, in); bias: (out,) or None -> (..., out)."""
    if _plain():
        return F.linear(x, weight, bias)
    if _in_functorch_transform():
        if custom_jvp(x, weight) or (bias is not None and custom_jvp(bias)):
            return _Linear.apply(x, weight, bias)
        return F.linear(x, weight, bias)
    (x, x_t), (weight, weight_t) = _parts(x), _parts(weight)
    bias, bias_t = _parts(bias) if bias is not None else (None, None)
    y = F.linear(x, weight, bias)
    if x_t is None and weight_t is None and bias_t is None:
        return y
    with torch.no_grad():
        tangent = None if x_t is None else F.linear(x_t, weight)
        tangent = _plus(tangent, None if weight_t is None else F.linear(x, weight_t))
        if bias_t is not None:
            bias_t = bias_t.to(y.dtype).expand_as(y)
            tangent = bias_t.clone() if tangent is None else tangent + bias_t
    return _dual(y, tangent)


# ----------------------------------------------------------------------------- scale by a tensor

class _Scale(torch.autograd.Function):
    """``y = x * w`` (w broadcast against x); tangent ``dx * w``, plus ``x * dw`` if w has one."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight):
        return x * weight

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save(ctx, *inputs)

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None
        x, weight = ctx.saved_tensors
        grad_x = (grad * weight).sum_to_size(x.shape) if ctx.needs_input_grad[0] else None
        grad_w = (grad * x).sum_to_size(weight.shape) if ctx.needs_input_grad[1] else None
        return grad_x, grad_w

    @staticmethod
    def jvp(ctx, x_t, weight_t):
        x, weight = ctx.saved_tensors
        with torch.no_grad():
            return _plus(None if x_t is None else x_t * weight, None if weight_t is None else x * weight_t)


def scale(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x * weight`` for a weight broadcast against x (a norm gain, a residual gate, a frequency table)."""
    if _plain():
        return x * weight
    if _in_functorch_transform():
        return _Scale.apply(x, weight) if custom_jvp(x, weight) else x * weight
    (x, x_t), (weight, weight_t) = _parts(x), _parts(weight)
    y = x * weight
    if x_t is None and weight_t is None:
        return y
    with torch.no_grad():
        tangent = _plus(None if x_t is None else x_t * weight, None if weight_t is None else x * weight_t)
    return _dual(y, tangent)   # outside no_grad: the dual keeps y's graph


# ----------------------------------------------------------------------------- rotation of channel pairs

def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    pairs = x.unflatten(-1, (-1, 2))        # (..., L, d/2, 2)
    a, b = pairs[..., 0], pairs[..., 1]     # (..., L, d/2)
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(x.dtype)


def _rotate_tangent(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """:func:`_rotate` as one complex product ``(a + ib)(cos + i sin)`` where x's layout allows a complex view
    (float32 / float64 like the tables, channel pairs adjacent): one kernel instead of six. For tangents only:
    the primal keeps :func:`_rotate`, whose graph is the plain op's."""
    if (x.dtype not in (torch.float32, torch.float64) or cos.dtype != x.dtype or sin.dtype != x.dtype
            or x.stride(-1) != 1 or any(stride % 2 for stride in x.stride()[:-1])):
        return _rotate(x, cos, sin)
    rotated = torch.view_as_complex(x.unflatten(-1, (-1, 2))) * torch.complex(cos, sin)
    return torch.view_as_real(rotated).flatten(-2)


class _RotatePairs(torch.autograd.Function):
    """Rotation by fixed angles is linear in x: the tangent is the rotated tangent, the gradient the
    gradient rotated back (the transpose of a rotation)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, cos, sin):
        return _rotate(x, cos, sin)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save(ctx, inputs[1], inputs[2])

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None, None
        cos, sin = ctx.saved_tensors
        return _rotate(grad, cos, -sin), None, None

    @staticmethod
    def jvp(ctx, x_t, cos_t, sin_t):
        cos, sin = ctx.saved_tensors
        with torch.no_grad():
            return _rotate(x_t, cos, sin)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs ``(a, b) = (x[..., 2i], x[..., 2i+1]) -> (a cos - b sin, a sin + b cos)`` by
    fixed, untrained angles (RoPE).  x: (..., L, d); cos, sin: (L, d / 2) -> (..., L, d), dtype of x."""
    if _plain():
        return _rotate(x, cos, sin)
    if _in_functorch_transform():
        return _RotatePairs.apply(x, cos, sin) if custom_jvp(x) else _rotate(x, cos, sin)
    x, x_t = _parts(x)
    y = _rotate(x, cos, sin)
    if x_t is None:
        return y
    with torch.no_grad():
        tangent = _rotate_tangent(x_t, cos, sin)
    return _dual(y, tangent)


# ----------------------------------------------------------------------------- RMS normalisation

def _rms_inverse(x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)                  # (..., 1)


class _RMSNormalize(torch.autograd.Function):
    """``y = x rs``, ``rs = (mean(x^2) + eps)^(-1/2)``; the backward is autograd's own chain
    (mul, rsqrt, add, mean, pow) written out in the same order, so it matches to the bit."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, eps):
        rs = _rms_inverse(x, eps)
        return x * rs, rs                  # rs is returned to be saved, not recomputed

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        _save(ctx, inputs[0], output[1])

    @staticmethod
    def backward(ctx, grad, grad_rs_output):
        if grad is None:
            return None, None
        x, rs = ctx.saved_tensors
        grad_rs = (grad * x).sum_to_size(rs.shape)                  # mul
        grad_mean = -0.5 * grad_rs * rs.pow(3)                      # rsqrt (the add of eps passes it on)
        grad_square = grad_mean.expand(x.shape) / x.shape[-1]       # mean
        return grad * rs + grad_square * (2.0 * x), None            # mul + pow

    @staticmethod
    def jvp(ctx, x_t, eps_t):
        x, rs = ctx.saved_tensors
        with torch.no_grad():
            # d rs = -rs^3 mean(x dx)
            return x_t * rs - x * (rs.pow(3) * (x * x_t).mean(-1, keepdim=True)), None


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2, -1) + eps)`` over the last dim (RMSNorm without its gain).  x: (..., W)."""
    if _plain():
        return x * _rms_inverse(x, eps)
    if _in_functorch_transform():
        return _RMSNormalize.apply(x, eps)[0] if custom_jvp(x) else x * _rms_inverse(x, eps)
    x, x_t = _parts(x)
    rs = _rms_inverse(x, eps)
    y = x * rs
    if x_t is None:
        return y
    with torch.no_grad():
        # d(x rs) = (dx - x rs^2 mean(x dx)) rs
        tangent = torch.addcmul(x_t, x, (x * x_t).mean(-1, keepdim=True) * rs.square(), value=-1).mul_(rs)
    return _dual(y, tangent)


# ----------------------------------------------------------------------------- attention

def _attention_weights(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)                 # (..., L, L)
    return scores.float().softmax(dim=-1) if scores.dtype != torch.float64 else scores.softmax(dim=-1)


def _attention_tangent(q, k, v, weights, q_t, k_t, v_t) -> torch.Tensor | None:
    """``dO = dP v + P dv``, ``dP = P (dS - rowsum(P dS))``, ``dS = (dq k^T + q dk^T) d^(-1/2)``; P = ``weights``."""
    # every intermediate is fresh and without history: updated in place (fewer allocations)
    scores_t = None if q_t is None else q_t @ k.transpose(-2, -1)
    if k_t is not None:
        scores_t = q @ k_t.transpose(-2, -1) if scores_t is None else scores_t.add_(q @ k_t.transpose(-2, -1))
    output_t = None if v_t is None else weights.to(v.dtype) @ v_t
    if scores_t is None:
        return output_t
    scores_t = scores_t.mul_(q.shape[-1] ** -0.5).to(weights.dtype)
    weights_t = scores_t.sub_((weights * scores_t).sum(-1, keepdim=True)).mul_(weights)
    tangent = weights_t.to(v.dtype) @ v
    return tangent if output_t is None else tangent.add_(output_t)


class _SoftmaxAttention(torch.autograd.Function):
    """``O = P v``, ``P = softmax(q k^T s)``, s = d^(-1/2). Tangent: ``dS = (dq k^T + q dk^T) s``,
    ``dP = P (dS - rowsum(P dS))``, ``dO = dP v + P dv``; backward as autograd's (bmm, softmax)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(q, k, v):
        weights = _attention_weights(q, k)
        return weights.to(v.dtype) @ v, weights   # the weights are returned to be saved, not recomputed

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])
        _save(ctx, *inputs, output[1])

    @staticmethod
    def backward(ctx, grad, grad_weights_output):
        if grad is None:
            return None, None, None
        q, k, v, weights = ctx.saved_tensors
        weights_v = weights.to(v.dtype)
        grad_v = weights_v.transpose(-2, -1) @ grad if ctx.needs_input_grad[2] else None
        # matmul copies a non-contiguous v before its bmm; the same layout gives autograd's bits
        grad_weights = (grad @ v.contiguous().transpose(-2, -1)).to(weights.dtype)
        grad_scores = torch.ops.aten._softmax_backward_data(grad_weights, weights, -1, weights.dtype)
        grad_scores = (grad_scores.to(q.dtype) * (q.shape[-1] ** -0.5))
        grad_q = grad_scores @ k if ctx.needs_input_grad[0] else None
        grad_k = (q.transpose(-2, -1) @ grad_scores).transpose(-2, -1) if ctx.needs_input_grad[1] else None
        return grad_q, grad_k, grad_v

    @staticmethod
    def jvp(ctx, q_t, k_t, v_t):
        with torch.no_grad():
            return _attention_tangent(*ctx.saved_tensors, q_t, k_t, v_t), None


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d)) v`` as explicit matmul + softmax, the softmax in float32 (float64
    stays float64).  q, k, v: (..., L, d) -> (..., L, d)."""
    if _plain():
        return _attention_weights(q, k).to(v.dtype) @ v
    if _in_functorch_transform():
        return _SoftmaxAttention.apply(q, k, v)[0] if custom_jvp(q, k, v) else _attention_weights(q, k).to(v.dtype) @ v
    (q, q_t), (k, k_t), (v, v_t) = _parts(q), _parts(k), _parts(v)
    weights = _attention_weights(q, k)
    y = weights.to(v.dtype) @ v
    if q_t is None and k_t is None and v_t is None:
        return y
    with torch.no_grad():
        tangent = _attention_tangent(q, k, v, weights, q_t, k_t, v_t)
    return _dual(y, tangent)


# ----------------------------------------------------------------------------- gated activation

class _SiluMul(torch.autograd.Function):
    """``y = silu(a) b``; tangent ``silu'(a) da b + silu(a) db``; backward as autograd's (silu_backward)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(a, b):
        return F.silu(a) * b

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save(ctx, *inputs)

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None, None
        a, b = ctx.saved_tensors
        grad_a = torch.ops.aten.silu_backward(grad * b, a) if ctx.needs_input_grad[0] else None
        grad_b = grad * F.silu(a) if ctx.needs_input_grad[1] else None
        return grad_a, grad_b

    @staticmethod
    def jvp(ctx, a_t, b_t):
        a, b = ctx.saved_tensors
        with torch.no_grad():
            return _plus(None if a_t is None else torch.ops.aten.silu_backward(a_t, a) * b,
                         None if b_t is None else F.silu(a) * b_t)


def silu_mul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``silu(a) * b`` (the SwiGLU gate).  a, b: same shape."""
    if _plain():
        return F.silu(a) * b
    if _in_functorch_transform():
        return _SiluMul.apply(a, b) if custom_jvp(a, b) else F.silu(a) * b
    (a, a_t), (b, b_t) = _parts(a), _parts(b)
    silu_a = F.silu(a)
    y = silu_a * b
    if a_t is None and b_t is None:
        return y
    with torch.no_grad():
        tangent = None if a_t is None else torch.ops.aten.silu_backward(a_t, a).mul_(b)
        if b_t is not None:
            tangent = silu_a * b_t if tangent is None else tangent.addcmul_(silu_a, b_t)
    return _dual(y, tangent)


# ----------------------------------------------------------------------------- JVP engines

def _primal(value):
    """Strip the tangents of the current dual level from a (nested tuple / list / dict of) tensor(s)."""
    if isinstance(value, torch.Tensor):
        return fwAD.unpack_dual(value).primal
    if isinstance(value, (tuple, list)):
        return type(value)(_primal(item) for item in value)
    if isinstance(value, dict):
        return {key: _primal(item) for key, item in value.items()}
    return value


def _in_functorch_transform() -> bool:
    # torch.func offers no public "am I inside a transform" query; this is what its own code reads.
    return torch._C._functorch.peek_interpreter_stack() is not None


def jvp(fn, primals: tuple, tangents: tuple, *, has_aux: bool = False):
    """``torch.func.jvp(fn, primals, tangents, has_aux=...)``'s results, the cheap way: forward_ad dual
    tensors through this module's ops (about two forwards). The output tangent comes back detached (every
    pMF loss stops its gradient); ``aux`` as primals. Inside :func:`reference_ops` and inside a ``torch.func``
    transform (``vmap``, ``grad``: dual tensors cannot be made there) it is ``torch.func.jvp`` itself.

    Returns:
        ``(output, output_tangent)``, or ``(output, output_tangent, aux)`` with ``has_aux``.
    """
    if _reference_ops or _in_functorch_transform():
        return torch.func.jvp(fn, primals, tangents, has_aux=has_aux)
    with fwAD.dual_level():
        result = fn(*(fwAD.make_dual(p, d) for p, d in zip(primals, tangents)))
        output, aux = result if has_aux else (result, None)
        output, tangent = fwAD.unpack_dual(output)
        aux = _primal(aux)
    # No tangent means the output does not depend on the primals: 0, as torch.func.jvp returns.
    tangent = torch.zeros_like(output) if tangent is None else tangent.detach()
    return (output, tangent, aux) if has_aux else (output, tangent)


def double_backward_jvp(fn, primals: tuple, tangents: tuple, *, has_aux: bool = False):
    """``torch.func.jvp``'s results by reverse mode twice (``torch.autograd.functional.jvp``, for ops
    without forward-mode rules) plus a second, differentiable forward for the output: the slowest engine,
    kept as the reference for frameworks without forward-mode AD. The tangent comes back detached."""
    def output_only(*inputs):
        return fn(*inputs)[0] if has_aux else fn(*inputs)
    with torch.enable_grad():
        _, tangent = torch.autograd.functional.jvp(output_only, primals, tangents)
    result = fn(*primals)
    output, aux = result if has_aux else (result, None)
    return (output, tangent.detach(), aux) if has_aux else (output, tangent.detach())


ENGINES = {"func": torch.func.jvp, "forward_ad": jvp, "double_backward": double_backward_jvp}
"""The JVP engines a benchmark can hand to ``pmf_ref.average_velocity_jvp(jvp=...)``, by name."""
ENGINE_DESCRIPTIONS = {"func": "torch.func.jvp (the core's default; the readable reference)",
                       "forward_ad": "full.fast_jvp.jvp: torch.autograd.forward_ad dual tensors through "
                                     "full.fast_jvp's ops, ~2 forwards",
                       "double_backward": "torch.autograd.functional.jvp (reverse mode twice) plus a separate "
                                          "forward for u"}
"""One line per engine of :data:`ENGINES`, for programs that report which one they run."""


__all__ = ["jvp", "double_backward_jvp", "ENGINES", "ENGINE_DESCRIPTIONS", "reference_ops", "reference_ops_active", "has_tangent", "custom_jvp", "linear", "scale",
           "rotate_pairs", "rms_normalize", "softmax_attention", "silu_mul"]
