"""Muon / Nesterov-Adam grouping and scaling, and the EDM-style EMAs, against hand-written oracles."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from full.ema import EMASet, ema_decay
from full.model import build_model
from full.optim import (ADAM_BETAS, ADAM_EPS, MUON_MOMENTUM, MUON_NS_COEFFICIENTS, build_optimizer,
                        make_nesterov_adam, split_parameters)


def _newton_schulz_oracle(matrix: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Quintic Newton-Schulz orthogonalisation (Muon), written from its definition, in bf16 as torch does."""
    a, b, c = MUON_NS_COEFFICIENTS
    x = matrix.bfloat16()
    transposed = x.shape[0] > x.shape[1]
    if transposed:
        x = x.T
    x = x / x.norm().clamp(min=1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if transposed else x).float()


@pytest.mark.parametrize("fan_out, fan_in", [(96, 32), (32, 96), (48, 48)])
def test_muon_original_adjust_lr_is_released_scaling(fan_out, fan_in):
    """torch Muon(adjust_lr_fn="original") scales by sqrt(max(1, fan_out / fan_in)); match_rms_adamw does not."""
    generator = torch.Generator().manual_seed(fan_out * fan_in)
    weight0, grad = torch.randn(fan_out, fan_in, generator=generator), torch.randn(fan_out, fan_in, generator=generator)
    lr = 0.01
    # One step from zero momentum with Nesterov: buffer = (1 - mu) g, update direction g.lerp(buffer, mu).
    direction = grad.lerp((1 - MUON_MOMENTUM) * grad, MUON_MOMENTUM)
    expected_step = lr * math.sqrt(max(1.0, fan_out / fan_in)) * _newton_schulz_oracle(direction)
    steps = {}
    for adjust in ("original", "match_rms_adamw"):
        weight = nn.Parameter(weight0.clone())
        weight.grad = grad.clone()
        torch.optim.Muon([weight], lr=lr, weight_decay=0.0, adjust_lr_fn=adjust).step()
        steps[adjust] = weight0 - weight.detach()
    # Both run Newton-Schulz in bf16 but round differently (addmm vs our matmuls), so compare the
    # direction (cosine) and the scale (norm ratio); the scales tested differ by sqrt(3) = 1.73.
    cosine = torch.nn.functional.cosine_similarity(steps["original"].flatten(), expected_step.flatten(), dim=0)
    assert cosine > 0.99
    assert abs((steps["original"].norm() / expected_step.norm()).item() - 1.0) < 0.03
    ratio = steps["match_rms_adamw"].norm() / expected_step.norm()
    assert abs(ratio.item() - 0.2 * math.sqrt(max(fan_out, fan_in)) / math.sqrt(max(1.0, fan_out / fan_in))) < 0.05
    assert abs(ratio.item() - 1.0) > 0.1                      # ... so it is not the released scaling


def test_nadam_equals_nesterov_adam_oracle():
    """torch NAdam with our momentum_decay == optax-style Nesterov Adam, step by step; the default psi differs."""
    generator = torch.Generator().manual_seed(0)
    theta0 = torch.randn(7, dtype=torch.float64, generator=generator)
    grads = [torch.randn(7, dtype=torch.float64, generator=generator) for _ in range(6)]
    lr, (b1, b2), eps = 0.01, ADAM_BETAS, ADAM_EPS
    theta, m, v = theta0.clone(), torch.zeros(7, dtype=torch.float64), torch.zeros(7, dtype=torch.float64)
    for step, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = b1 * m / (1 - b1 ** (step + 1)) + (1 - b1) * g / (1 - b1 ** step)
        theta = theta - lr * m_hat / ((v / (1 - b2 ** step)).sqrt() + eps)
    finals = {}
    for name, make in (("ours", lambda p: make_nesterov_adam([p], lr=lr)),
                       ("default", lambda p: torch.optim.NAdam([p], lr=lr, betas=ADAM_BETAS, eps=eps))):
        parameter = nn.Parameter(theta0.clone())
        optimizer = make(parameter)
        for g in grads:
            parameter.grad = g.clone()
            optimizer.step()
        finals[name] = parameter.detach()
    # torch keeps mu_product = b1^t in a float32 tensor: agreement to float32 rounding of that factor.
    torch.testing.assert_close(finals["ours"], theta, rtol=1e-6, atol=1e-9)
    assert (finals["default"] - theta).abs().max() > 1e-4


def test_parameter_groups_follow_method_rule():
    model = build_model("pMF-T/4", num_classes=10)
    muon, adam = split_parameters(model)
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    assert {id(p) for p in muon} == linear_weights and all(p.ndim == 2 for p in muon)
    assert not {id(p) for p in muon} & {id(p) for p in adam}
    assert len(muon) + len(adam) == len(list(model.parameters()))
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    convs = {id(m.weight) for m in model.modules() if isinstance(m, nn.Conv2d)}
    assert embeddings | convs <= {id(p) for p in adam} and embeddings and convs
    # Every non-2-D parameter (biases, norms, gates, tokens, position embedding) is in the Adam group.
    assert all(id(p) in {id(q) for q in adam} for p in model.parameters() if p.ndim != 2)
    adam_only = build_optimizer(model, kind="adam", lr=1e-3)
    assert list(adam_only.optimizers) == ["adam"]


def test_optimizer_state_round_trip():
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6))
    optimizer = build_optimizer(model, kind="muon", lr=1e-2)
    for _ in range(2):
        model(torch.randn(3, 4)).square().sum().backward()
        optimizer.step()
    clone = build_optimizer(model, kind="muon", lr=1e-2)
    clone.load_state_dict(optimizer.state_dict())
    assert set(clone.state_dict()) == {"muon", "adam"}
    assert torch.equal(clone.state_dict()["muon"]["state"][0]["momentum_buffer"],
                       optimizer.state_dict()["muon"]["state"][0]["momentum_buffer"])


@given(batch=st.integers(1, 4096), hl_kimg=st.floats(0.1, 5000), images_seen=st.integers(0, 10 ** 9))
def test_ema_decay_closed_form(batch, hl_kimg, images_seen):
    hl_imgs = min(hl_kimg * 1000, 0.05 * images_seen)
    expected = 0.0 if hl_imgs == 0 else 0.5 ** (batch / hl_imgs)
    assert ema_decay(batch, hl_kimg, images_seen) == pytest.approx(expected, rel=1e-12, abs=0)


def test_ema_decay_half_life_meaning():
    """After hl_kimg*1000 images in steps of `batch` (ramp over), the old weights' share is 1/2."""
    decay = ema_decay(100, 2.0, images_seen=10 ** 9)
    assert decay ** (2000 / 100) == pytest.approx(0.5, rel=1e-12)
    assert ema_decay(100, 2.0, images_seen=0) == 0.0      # first step copies the weights


def test_ema_set_matches_scalar_recursion():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    emas = EMASet(model, (0.001, 0.004))                  # half-lives of 1 and 4 images
    expected = {"0.001": 0.0, "0.004": 0.0}
    images_seen = 1000                                    # past the ramp-up: the half-lives differ
    for value in (1.0, 3.0, -2.0, 5.0, 0.5):
        with torch.no_grad():
            model.weight.fill_(value)
        emas.update(model, batch=2, images_seen=images_seen)
        for key, hl in (("0.001", 0.001), ("0.004", 0.004)):
            decay = ema_decay(2, hl, images_seen)
            expected[key] = decay * expected[key] + (1 - decay) * value
        images_seen += 2
    for key in expected:
        assert emas.models[key].weight.item() == pytest.approx(expected[key], rel=1e-6)
    assert emas.models["0.001"].weight.item() != pytest.approx(emas.models["0.004"].weight.item())
    restored = EMASet(model, (0.001, 0.004))
    restored.load_state_dict(emas.state_dict())
    assert restored.models["0.004"].weight.item() == emas.models["0.004"].weight.item()
