"""Tests of the ViT layers' routes (full/layers.py): fused SDPA in no-grad passes vs explicit attention,
and the cheap-JVP modules as drop-in replacements of their torch counterparts."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

import pmf_ref as P
from full import fast_jvp, layers
from full.model import build_model, make_cond

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def _qkv(dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 9, 8, generator=generator, dtype=dtype) for _ in range(3)]


@pytest.fixture
def fused_on_cpu(monkeypatch):
    """Let the CPU take the fused branch (by default only CUDA does), counting its calls."""
    calls = []
    sdpa = layers.F.scaled_dot_product_attention
    monkeypatch.setattr(layers, "FUSED_ATTENTION_DEVICES", ("cpu", "cuda"))
    monkeypatch.setattr(layers.F, "scaled_dot_product_attention",
                        lambda *args, **kwargs: calls.append(1) or sdpa(*args, **kwargs))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_attention_equals_explicit_math(fused_on_cpu, dtype):
    q, k, v = _qkv(dtype)
    with torch.no_grad():
        fused = layers.attention(q, k, v)
        with fast_jvp.reference_ops():
            explicit = layers.attention(q, k, v)
    assert len(fused_on_cpu) == 1   # the fused kernel ran once, the reference did not call it
    torch.testing.assert_close(fused, explicit, rtol=0, atol=TOL[dtype] * explicit.abs().max().item())


def test_fused_attention_only_without_grad_and_tangent(fused_on_cpu):
    q, k, v = _qkv(torch.float64)
    layers.attention(q, k, v)                              # grad enabled: explicit
    with torch.no_grad(), fwAD.dual_level():
        layers.attention(fwAD.make_dual(q, torch.ones_like(q)), k, v)   # tangent: explicit (forward AD)
    assert fused_on_cpu == []
    with torch.no_grad():
        layers.attention(q, k, v)
    assert fused_on_cpu == [1]


def test_default_cpu_attention_is_explicit():
    """On CPU the fused kernel is off by default: a no-grad pass is the reference's bits."""
    q, k, v = _qkv(torch.float32)
    with torch.no_grad():
        plain = layers.attention(q, k, v)
        with fast_jvp.reference_ops():
            assert torch.equal(plain, layers.attention(q, k, v))


def test_vit_no_grad_forward_with_fused_attention_matches_math(fused_on_cpu):
    torch.manual_seed(0)
    model = build_model("pMF-T/2")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=generator))
    z = torch.randn(3, 3, 16, 16, generator=generator)
    t, cond = torch.tensor([1.0, 0.5, 0.2]), make_cond(torch.tensor([1, 2, 1000]), 3.0, 0.1, 0.7)
    with torch.no_grad():
        fused = model.forward_u(z, torch.zeros(3), t, cond)
        with fast_jvp.reference_ops():
            explicit = model.forward_u(z, torch.zeros(3), t, cond)
    assert len(fused_on_cpu) == len(model.trunk) + len(model.u_head.blocks)
    torch.testing.assert_close(fused, explicit, rtol=0, atol=1e-5 * explicit.abs().max().item())


def test_linear_is_a_drop_in_nn_linear():
    torch.manual_seed(0)
    plain = nn.Linear(6, 4)
    ours = layers.Linear(6, 4)
    ours.load_state_dict(plain.state_dict())
    assert isinstance(ours, nn.Linear) and ours.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(2, 3, 6)
    assert torch.equal(ours(x), plain(x))
