"""Tests of the pMF ViT (full/model.py: its layers, the network, the adapter) and its parameter / GMAC counter
(full/params.py).

Oracles: float64 central finite differences (JVP), F.scaled_dot_product_attention (attention),
closed forms (RMSNorm, RoPE's relative-position property, zero-init identity), the explicit attention
for the fused SDPA route, the plain block for activation checkpointing, an analytic
parameter / MAC formula against sum(p.numel()) and torch's FlopCounterMode, and the paper's Table 8.
"""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch import nn
from torch.func import functional_call, jvp

import full.model as full_model
import pmf_ref as P
from full import fast_jvp
from full.model import (NUM_PREFIX_TOKENS, PRESETS, Block, RMSNorm, apply_rope, attention, build_model, core_fns,
                        make_cond, rope_angles_2d)

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["pMF-T/4", "pMF-T/2"]
FD_EPS = 1e-6          # central-difference step in float64: truncation ~eps^2, rounding ~1e-16/eps
FD_RTOL = 1e-6         # relative to the largest tangent entry


def _randomised(model: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Add N(0, scale^2) noise to every parameter: zero-init gates and output layers otherwise make
    the network a constant (x_hat = 0), for which every derivative check passes trivially."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


def _inputs(model, batch: int, seed: int, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, model.channels, model.resolution, model.resolution, generator=generator, dtype=dtype)
    t = torch.rand(batch, generator=generator, dtype=dtype) * 0.9 + 0.05
    r = t * torch.rand(batch, generator=generator, dtype=dtype)
    y = torch.randint(0, model.num_classes + 1, (batch,), generator=generator)   # includes the null label
    omega = 1 + 7 * torch.rand(batch, generator=generator, dtype=dtype)
    cond = make_cond(y, omega, torch.full((batch,), 0.1, dtype=dtype), torch.full((batch,), 0.7, dtype=dtype))
    return z, r, t, cond


# ----------------------------------------------------------------------------- shapes and init

@pytest.mark.parametrize("preset, overrides", [("pMF-T/4", {}), ("pMF-T/2", {}),
                                               ("pMF-T/4", {"channels": 1, "num_classes": 10}),
                                               ("pMF-T/4", {"channels": 1, "num_classes": 10, "resolution": 28})])
def test_model_output_shapes_and_zero_init(preset, overrides):
    torch.manual_seed(0)
    model = build_model(preset, **overrides)
    z, r, t, cond = _inputs(model, batch=3, seed=1)
    x_hat, x_hat_v = model.forward_u(z, r, t, cond), model.forward_v(z, t, cond)
    expected = (3, model.channels, model.resolution, model.resolution)
    assert x_hat.shape == expected and x_hat_v.shape == expected
    # zero-initialised output Linears: both heads start by predicting exactly x_hat = 0
    assert torch.equal(x_hat, torch.zeros(expected)) and torch.equal(x_hat_v, torch.zeros(expected))
    assert torch.equal(model(z, r, t, cond), x_hat)


def test_block_initial_identity():
    torch.manual_seed(0)
    block = Block(width=32, heads=4)
    x = torch.randn(2, NUM_PREFIX_TOKENS + 16, 32)
    angles = rope_angles_2d(4, 8, NUM_PREFIX_TOKENS).float()
    assert torch.equal(block(x, angles.cos(), angles.sin()), x)   # zero gates: the block is the identity


def test_unpatchify_round_trips_patch_layout():
    """Output patch values laid out (p, p, C) per raster patch land at the right pixels: feed the
    head's Linear a bias that encodes (row-in-patch, col-in-patch, channel) and compare with the image."""
    model = build_model("pMF-T/4", channels=2)
    p, c = model.patch, model.channels
    code = torch.arange(p * p * c, dtype=torch.float32)                    # index = (py * p + px) * C + ch
    with torch.no_grad():
        model.u_head.out.bias.copy_(code)
    z, r, t, cond = _inputs(model, batch=1, seed=0)
    image = model.forward_u(z, r, t, cond)[0]                              # (C, H, W)
    py, px = torch.meshgrid(torch.arange(model.resolution) % p, torch.arange(model.resolution) % p, indexing="ij")
    for ch in range(c):
        assert torch.equal(image[ch], ((py * p + px) * c + ch).float())


# ----------------------------------------------------------------------------- conditioning

def test_null_label_and_guidance_condition_the_output():
    model = _randomised(build_model("pMF-T/2", num_classes=10))
    z, r, t, cond = _inputs(model, batch=2, seed=3)
    outputs = {}
    for name, y, omega in [("null", 10, 1.0), ("class0", 0, 1.0), ("class0_w4", 0, 4.0)]:
        outputs[name] = model.forward_u(z, r, t, make_cond(torch.full((2,), y), omega, 0.1, 0.7))
        assert torch.isfinite(outputs[name]).all()
    assert not torch.allclose(outputs["null"], outputs["class0"])
    assert not torch.allclose(outputs["class0"], outputs["class0_w4"])
    with pytest.raises(IndexError):   # label K + 1 does not exist (the table has K + 1 rows: 0..K)
        model.forward_u(z, r, t, make_cond(torch.full((2,), 11), 1.0, 0.1, 0.7))


def test_forward_u_depends_on_t_only_through_h():
    """The network sees h = t - r, never t: moving r and t together leaves x_hat unchanged,
    while changing h does change it."""
    model = _randomised(build_model("pMF-T/2").double())
    z, _, _, cond = _inputs(model, batch=2, seed=5, dtype=torch.float64)
    t = torch.tensor([0.5, 0.6], dtype=torch.float64)
    r = torch.tensor([0.4, 0.35], dtype=torch.float64)
    x_hat = model.forward_u(z, r, t, cond)
    for shift in (-0.35, 0.1, 0.4):
        torch.testing.assert_close(model.forward_u(z, r + shift, t + shift, cond), x_hat, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(model.forward_u(z, r - 0.2, t, cond), x_hat)


def test_make_cond_broadcasts_and_validates():
    cond = make_cond(torch.tensor([1, 2, 3]), 2.0, 0.1, torch.tensor([0.5, 0.6, 0.7]))
    assert cond["omega"].shape == (3,) and cond["omega"].dtype == torch.float32
    torch.testing.assert_close(cond["t_max"], torch.tensor([0.5, 0.6, 0.7]))
    with pytest.raises(ValueError, match="y must be"):
        make_cond(torch.tensor([1.0, 2.0]), 2.0, 0.1, 0.7)
    with pytest.raises(ValueError, match="omega"):
        make_cond(torch.tensor([1, 2]), torch.ones(3), 0.1, 0.7)


# ----------------------------------------------------------------------------- heads

def test_heads_use_disjoint_parameters():
    """forward_u never touches the v-head (it gets no gradient), forward_v never the u-head;
    both reach the shared trunk."""
    model = _randomised(build_model("pMF-T/2"))
    z, r, t, cond = _inputs(model, batch=2, seed=7)
    for forward, used, unused in [(lambda: model.forward_u(z, r, t, cond), model.u_head, model.v_head),
                                  (lambda: model.forward_v(z, t, cond), model.v_head, model.u_head)]:
        model.zero_grad(set_to_none=True)
        forward().square().sum().backward()
        assert all(p.grad is None for p in unused.parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in used.parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.trunk.parameters())
    assert not torch.allclose(model.forward_u(z, t, t, cond), model.forward_v(z, t, cond))


def test_inference_model_has_no_v_head():
    model = build_model("pMF-T/4", v_head=False)
    assert model.v_head is None and not model.has_v_head
    assert model.param_count(with_v_head=True) == model.param_count(with_v_head=False)
    z, _, t, cond = _inputs(model, batch=1, seed=0)
    with pytest.raises(RuntimeError, match="v_head"):
        model.forward_v(z, t, cond)


# ----------------------------------------------------------------------------- forward-mode AD

@pytest.mark.parametrize("use_sdpa_math", [False, True])
def test_forward_u_jvp_matches_finite_differences(use_sdpa_math):
    """torch.func.jvp through functional_call(model) w.r.t. (z, r, t) vs float64 central differences."""
    model = _randomised(build_model("pMF-T/2", use_sdpa_math=use_sdpa_math).double(), seed=11)
    z, r, t, cond = _inputs(model, batch=2, seed=13, dtype=torch.float64)
    state = {**dict(model.named_parameters()), **dict(model.named_buffers())}

    def x_fn(z, r, t):
        return functional_call(model, state, (z, r, t, cond))

    generator = torch.Generator().manual_seed(17)
    dz, dr, dt = (torch.randn(v.shape, generator=generator, dtype=torch.float64) for v in (z, r, t))
    x_hat, tangent = jvp(x_fn, (z, r, t), (dz, dr, dt))
    finite_difference = (x_fn(z + FD_EPS * dz, r + FD_EPS * dr, t + FD_EPS * dt)
                         - x_fn(z - FD_EPS * dz, r - FD_EPS * dr, t - FD_EPS * dt)) / (2 * FD_EPS)
    torch.testing.assert_close(x_hat, x_fn(z, r, t), rtol=0, atol=0)
    scale = tangent.abs().max()
    assert scale > 1e-3   # the randomised network really depends on its inputs
    torch.testing.assert_close(tangent, finite_difference, rtol=0, atol=FD_RTOL * scale.item())


def test_model_with_core_average_velocity_jvp():
    """The model plugs into pmf_ref unchanged: du/dt from P.average_velocity_jvp equals the finite
    difference of u = (z - x_hat) / max(t, t_eps) along (dz, dr, dt) = (v, 0, 1)."""
    model = _randomised(build_model("pMF-T/2").double(), seed=19)
    z, r, t, cond = _inputs(model, batch=2, seed=23, dtype=torch.float64)
    v = torch.randn(z.shape, generator=torch.Generator().manual_seed(29), dtype=torch.float64)
    u_fn = P.u_fn_from_x_fn(lambda z, r, t: model.forward_u(z, r, t, cond))
    u, dudt, x_hat = P.average_velocity_jvp(u_fn, z, r, t, v_tangent=v, has_aux=True)
    finite_difference = (u_fn(z + FD_EPS * v, r, t + FD_EPS)[0] - u_fn(z - FD_EPS * v, r, t - FD_EPS)[0]) / (2 * FD_EPS)
    torch.testing.assert_close(dudt, finite_difference, rtol=0, atol=FD_RTOL * dudt.abs().max().item())
    u.square().sum().backward()   # the primal keeps its graph: parameters get gradients
    assert model.u_head.out.weight.grad is not None


def test_forward_u_jvp_under_bf16_autocast():
    """The bf16 training path: forward and JVP run under CPU autocast and stay close to float32
    (residual stream, norms and softmax stay in float32)."""
    model = _randomised(build_model("pMF-T/2"), seed=31, scale=0.05)
    z, r, t, cond = _inputs(model, batch=2, seed=37)
    tangents = (torch.randn_like(z), torch.zeros_like(r), torch.ones_like(t))

    def x_fn(z, r, t):
        return model.forward_u(z, r, t, cond)
    x_hat, dx = jvp(x_fn, (z, r, t), tangents)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_hat_bf16, dx_bf16 = jvp(x_fn, (z, r, t), tangents)
    for full, low in ((x_hat, x_hat_bf16), (dx, dx_bf16)):
        assert torch.isfinite(low).all()
        assert (low.float() - full).norm() < 0.05 * full.norm()


# ----------------------------------------------------------------------------- layers

def test_attention_matches_sdpa():
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    torch.testing.assert_close(attention(q.float(), k.float(), v.float(), use_sdpa_math=True),
                               attention(q, k, v).float(), rtol=1e-5, atol=1e-5)


def test_rmsnorm_unit_rms():
    x = torch.randn(4, 7, 16, dtype=torch.float64) * 5
    normed = RMSNorm(16).double()(x)
    torch.testing.assert_close(normed.pow(2).mean(-1), torch.ones(4, 7, dtype=torch.float64), rtol=1e-5, atol=0)


@given(shift_row=st.integers(-1, 3), shift_col=st.integers(-2, 2))  # keeps a and b on the 6x6 grid
def test_rope_scores_depend_on_relative_position(shift_row, shift_col):
    """<R(a) q, R(b) k> depends on the patch offset a - b only; prefix tokens are not rotated."""
    grid, head_dim = 6, 16
    angles = rope_angles_2d(grid, head_dim, NUM_PREFIX_TOKENS)
    cos, sin = angles.cos(), angles.sin()
    generator = torch.Generator().manual_seed(1)
    q, k = (torch.randn(head_dim, generator=generator, dtype=torch.float64) for _ in range(2))
    length = NUM_PREFIX_TOKENS + grid * grid
    q_rot = apply_rope(q.expand(1, 1, length, head_dim), cos, sin)[0, 0]
    k_rot = apply_rope(k.expand(1, 1, length, head_dim), cos, sin)[0, 0]

    def index(row, col):
        return NUM_PREFIX_TOKENS + row * grid + col
    a, b = (2, 3), (1, 2)
    moved_a, moved_b = (a[0] + shift_row, a[1] + shift_col), (b[0] + shift_row, b[1] + shift_col)
    torch.testing.assert_close(q_rot[index(*a)] @ k_rot[index(*b)], q_rot[index(*moved_a)] @ k_rot[index(*moved_b)])
    torch.testing.assert_close(q_rot[:NUM_PREFIX_TOKENS], q.expand(NUM_PREFIX_TOKENS, head_dim))
    # rotations preserve norms
    torch.testing.assert_close(q_rot.norm(dim=-1), q.norm().expand(length))


# ----------------------------------------------------------------------------- layers: the fused-attention route, the cheap-JVP modules

TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


def _qkv(dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 9, 8, generator=generator, dtype=dtype) for _ in range(3)]


@pytest.fixture
def fused_on_cpu(monkeypatch):
    """Let the CPU take the fused branch (by default only CUDA does), counting its calls."""
    calls = []
    sdpa = full_model.F.scaled_dot_product_attention
    monkeypatch.setattr(full_model, "FUSED_ATTENTION_DEVICES", ("cpu", "cuda"))
    monkeypatch.setattr(full_model.F, "scaled_dot_product_attention",
                        lambda *args, **kwargs: calls.append(1) or sdpa(*args, **kwargs))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_attention_equals_explicit_math(fused_on_cpu, dtype):
    q, k, v = _qkv(dtype)
    with torch.no_grad():
        fused = full_model.attention(q, k, v)
        with fast_jvp.reference_ops():
            explicit = full_model.attention(q, k, v)
    assert len(fused_on_cpu) == 1   # the fused kernel ran once, the reference did not call it
    torch.testing.assert_close(fused, explicit, rtol=0, atol=TOL[dtype] * explicit.abs().max().item())


def test_fused_attention_only_without_grad_and_tangent(fused_on_cpu):
    q, k, v = _qkv(torch.float64)
    full_model.attention(q, k, v)                              # grad enabled: explicit
    with torch.no_grad(), fwAD.dual_level():
        full_model.attention(fwAD.make_dual(q, torch.ones_like(q)), k, v)   # tangent: explicit (forward AD)
    assert fused_on_cpu == []
    with torch.no_grad():
        full_model.attention(q, k, v)
    assert fused_on_cpu == [1]


def test_default_cpu_attention_is_explicit():
    """On CPU the fused kernel is off by default: a no-grad pass is the reference's bits."""
    q, k, v = _qkv(torch.float32)
    with torch.no_grad():
        plain = full_model.attention(q, k, v)
        with fast_jvp.reference_ops():
            assert torch.equal(plain, full_model.attention(q, k, v))


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
    ours = full_model.Linear(6, 4)
    ours.load_state_dict(plain.state_dict())
    assert isinstance(ours, nn.Linear) and ours.state_dict().keys() == plain.state_dict().keys()
    x = torch.randn(2, 3, 6)
    assert torch.equal(ours(x), plain(x))


# ----------------------------------------------------------------------------- layers: activation checkpointing (recompute_in_backward)

def _released_step_grads(model, seed=0, n=6):
    """Loss and every gradient of the released step (TrainingStep: guidance pass, JVP through both heads)."""
    from full.step import TrainingStep

    generator = torch.Generator().manual_seed(seed)
    randomness = TrainingStep.from_preset(model, "pMF-T/4", noise_scale=1.0, omega_beta=1.0).draw_randomness(
        torch.zeros(n, 3, 32, 32), generator=generator)
    randomness = type(randomness)(*(f.double() if f.is_floating_point() else f for f in randomness))
    x = torch.rand(n, 3, 32, 32, generator=generator, dtype=torch.float64) * 2 - 1
    y = torch.randint(0, 10, (n,), generator=generator)
    model.zero_grad(set_to_none=True)
    terms = TrainingStep.from_preset(model, "pMF-T/4", noise_scale=1.0, t_thr=0.8, omega_beta=1.0)(x, y, randomness)
    terms["loss"].backward()
    return terms, {name: p.grad for name, p in model.named_parameters()}


def test_activation_checkpointing_keeps_loss_and_every_gradient():
    """Recomputing each block in the backward (JVP pass included) changes no number: float64, pMF-T/4 with
    random gates and output layers, the released step's loss terms and every gradient to 1e-12."""
    from full.bench.precision import randomize_zero_init_

    torch.manual_seed(0)
    plain = randomize_zero_init_(build_model("pMF-T/4", num_classes=10).double(), torch.Generator().manual_seed(1))
    checkpointed = build_model("pMF-T/4", num_classes=10, activation_checkpointing=True).double()
    checkpointed.load_state_dict(plain.state_dict())
    assert all(block.recompute for block in checkpointed.modules() if isinstance(block, Block))
    terms, grads = _released_step_grads(plain)
    terms_ckpt, grads_ckpt = _released_step_grads(checkpointed)
    for key in ("loss", "loss_u", "loss_v", "raw_u", "raw_v"):
        torch.testing.assert_close(terms_ckpt[key], terms[key], rtol=1e-12, atol=0)
    assert all(grad.abs().max() > 0 for grad in grads.values())   # every parameter's gradient is exercised
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-12, atol=1e-14, msg=name)


def test_activation_checkpointing_keeps_dudt_and_saves_only_block_inputs():
    """The JVP's primal and tangent are the plain block's; under autograd a checkpointed block saves only
    its input (counted with saved-tensor hooks) where the plain block saves dozens of tensors."""
    torch.manual_seed(0)
    block = Block(32, 4).double()
    with torch.no_grad():
        block.gate_attn.normal_()
        block.gate_mlp.normal_()
    cos, sin = rope_angles_2d(2, 8, 1).cos(), rope_angles_2d(2, 8, 1).sin()
    x = torch.randn(3, 5, 32, dtype=torch.float64, requires_grad=True)
    tangent = torch.randn_like(x)

    def run(recompute):
        block.recompute = recompute
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            with fwAD.dual_level():
                y, dy = fwAD.unpack_dual(block(fwAD.make_dual(x, tangent), cos, sin))
        grad_x, *grad_p = torch.autograd.grad((y ** 2).sum(), (x, *block.parameters()))
        return y, dy, grad_x, grad_p, len(saved)

    y, dy, grad_x, grad_p, saved = run(False)
    y_c, dy_c, grad_x_c, grad_p_c, saved_c = run(True)
    torch.testing.assert_close(y_c, y, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(dy_c, dy, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(grad_x_c, grad_x, rtol=1e-12, atol=1e-13)
    for a, b in zip(grad_p_c, grad_p):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    assert saved_c == 1 and saved > 10     # the checkpointed block saves its input alone


# ----------------------------------------------------------------------------- counts


def test_build_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown preset"):
        build_model("pMF-X/16")
    with pytest.raises(ValueError, match="unknown model override"):
        build_model("pMF-T/4", P_mean=0.0)
    with pytest.raises(ValueError, match="divisible by patch"):
        build_model("pMF-T/4", resolution=30)
    with pytest.raises(ValueError, match="head_depth"):
        build_model("pMF-T/4", head_depth=5)
    assert set(PRESETS) >= {"pMF-B/16", "pMF-L/16", "pMF-H/16", "pMF-B/32", "pMF-L/32", "pMF-H/32", *TINY}


# ----------------------------------------------------------------------------- the adapter to the core

def _perturbed(prediction: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("pMF-T/2", num_classes=10, prediction=prediction).double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model


@pytest.mark.parametrize("prediction", ["x", "u"])
def test_core_fns_read_the_output_by_what_the_model_predicts(prediction):
    """x-prediction: u = (z - x_hat) / max(t, t_eps) (pMF Eq. 11); u-prediction: the output is u itself."""
    model = _perturbed(prediction)
    z = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    r, t = torch.tensor([0.0, 0.2, 0.5], dtype=torch.float64), torch.tensor([0.01, 0.5, 1.0], dtype=torch.float64)
    cond = make_cond(torch.tensor([1, 2, 10]), 2.0, 0.1, 0.7)
    fns = core_fns(model, cond)
    output_u, output_v = model.forward_uv(z, r, t, cond)
    clip = t.clamp(min=P.T_EPS)[:, None, None, None]
    expected_u, expected_v = ((z - output_u) / clip, (z - output_v) / clip) if prediction == "x" else (output_u, output_v)
    torch.testing.assert_close(fns.u(z, r, t), expected_u, rtol=1e-12, atol=1e-12)
    u, tokens = fns.u_and_trunk(z, r, t)
    torch.testing.assert_close(u, expected_u, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fns.v_from_trunk(z, t, tokens), expected_v, rtol=1e-12, atol=1e-12)
    # the v-head at h = 0 is the v-head on the trunk at r = t
    torch.testing.assert_close(fns.v(z, t), fns.v_from_trunk(z, t, fns.u_and_trunk(z, t, t)[1]),
                               rtol=1e-12, atol=1e-12)


def test_only_the_adapters_ask_what_a_network_predicts():
    """What a network's output means (``prediction ==`` / ``!=``) is decided in the two adapters only:
    full/model.py (``predicts_image``, which the PMFViT's adapter, the trainer's settings and the fine-tuning
    loader ask) and toy/train.py (the toy MLP)."""
    import pathlib
    import re
    root = pathlib.Path(__file__).resolve().parents[1]
    sites = sorted({str(path.relative_to(root)) for folder in ("full", "toy", "tutorials")
                    for path in (root / folder).rglob("*.py") if re.search(r"prediction [!=]=", path.read_text())})
    assert sites == ["full/model.py", "toy/train.py"], sites
