"""Muon / Nesterov-Adam grouping and scaling (full/optim.py) against hand-written oracles."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

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


