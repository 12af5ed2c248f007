"""Activation checkpointing of the ViT blocks (full/layers.py ``recompute_in_backward``,
``PMFViT(activation_checkpointing=True)``): the same loss, du/dt and every gradient, fewer saved tensors."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD

import pmf_ref as P
from full.layers import Block, rope_angles_2d
from full.model import build_model

pytestmark = pytest.mark.usefixtures("one_thread")



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
