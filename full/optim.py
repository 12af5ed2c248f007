"""Optimiser of the pMF trainer: Muon for 2-D weight matrices, Nesterov Adam for everything else (pMF §6).

Grouping rule: a parameter goes to Muon iff it is the ``weight`` of an ``nn.Linear`` (a 2-D matrix
acting on features: attention q/k/v/out, SwiGLU, embedder MLPs, the heads' output projections).
Everything else -- biases, norm scales, residual gates, learned conditioning tokens, position
embeddings, label embeddings (``nn.Embedding``: a lookup table, not a linear map), conv kernels of the
patch embedding -- goes to the Adam group. ``torch.optim.Muon`` accepts only 2-D parameters, and the
rule never sends it anything else.

Learning-rate scaling. The released code scales Muon's orthogonalised update by
``sqrt(max(1, fan_out / fan_in))``. For an ``nn.Linear`` weight of shape (fan_out, fan_in) torch's
``adjust_lr_fn="original"`` computes ``sqrt(max(1, A / B))`` with ``(A, B) = weight.shape`` -- the same
number (checked in tests/test_full_optim.py); ``"match_rms_adamw"`` (``0.2 sqrt(max(A, B))``) does not.

Adam group. The released code uses Nesterov Adam (optax ``nadam``):
``m_t = b1 m + (1 - b1) g``, update ``= lr [b1 m_t / (1 - b1^(t+1)) + (1 - b1) g / (1 - b1^t)] /
(sqrt(v_t / (1 - b2^t)) + eps)``. torch's ``NAdam`` is Dozat's variant with a momentum schedule
``mu_t = b1 (1 - 0.5 * 0.96^(t psi))``; with ``psi`` so large that ``0.96^(t psi)`` underflows to 0
for every t >= 1 the schedule is the constant ``b1`` and torch's update equals the optax one term by
term. We therefore use ``torch.optim.NAdam(momentum_decay=NESTEROV_MOMENTUM_DECAY)`` (checked against
a hand-written Nesterov-Adam oracle in the tests); ``optimizer="adam"`` (the paper's Adam ablation)
puts every parameter in that group.
"""
from __future__ import annotations

import torch
from torch import nn

ADAM_BETAS = (0.9, 0.95)   # pMF §6 (released code)
ADAM_EPS = 1e-8
MUON_MOMENTUM = 0.95       # Nesterov momentum of Muon (pMF §6)
MUON_NS_STEPS = 5          # quintic Newton-Schulz iterations, coefficients (3.4445, -4.7750, 2.0315)
MUON_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
MUON_ADJUST_LR_FN = "original"
"""torch's name for the scaling sqrt(max(1, fan_out / fan_in)) of the released code."""
NESTEROV_MOMENTUM_DECAY = 1e6
"""psi of torch NAdam: 0.96 ** (t * 1e6) == 0.0 for t >= 1 in float32 and float64, so mu_t = b1 exactly
and NAdam is plain Nesterov Adam (optax.nadam). The default 4e-3 would ramp mu_t from 0.45 to 0.9
over ~10^4 steps -- a different optimiser."""


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(Muon parameters, Adam parameters) of the trainable parameters of ``model``.

    Muon: ``nn.Linear.weight`` (2-D). Adam: everything else. Shared parameters are listed once.
    """
    muon_ids = {id(module.weight) for module in model.modules()
                if isinstance(module, nn.Linear) and module.weight.requires_grad}
    muon, adam, seen = [], [], set()
    for parameter in model.parameters():
        if not parameter.requires_grad or id(parameter) in seen:
            continue
        seen.add(id(parameter))
        (muon if id(parameter) in muon_ids else adam).append(parameter)
    return muon, adam


class MuonWithNAdam:
    """One optimiser object holding ``torch.optim.Muon`` (2-D matrices) and ``torch.optim.NAdam``
    (the rest), so the train loop calls a single ``step`` / ``zero_grad`` / ``state_dict``.

    Args:
        muon_params, adam_params: disjoint parameter lists.  lr: shared constant learning rate.
    """

    def __init__(self, muon_params: list[nn.Parameter], adam_params: list[nn.Parameter], *, lr: float):
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        if muon_params:
            self.optimizers["muon"] = torch.optim.Muon(
                muon_params, lr=lr, weight_decay=0.0, momentum=MUON_MOMENTUM, nesterov=True,
                ns_coefficients=MUON_NS_COEFFICIENTS, ns_steps=MUON_NS_STEPS, adjust_lr_fn=MUON_ADJUST_LR_FN)
        if adam_params:
            self.optimizers["adam"] = make_nesterov_adam(adam_params, lr=lr)

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers.values() for group in optimizer.param_groups]

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MuonWithNAdam does not support closures")
        for optimizer in self.optimizers.values():
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: optimizer.state_dict() for name, optimizer in self.optimizers.items()}

    def load_state_dict(self, state_dict: dict) -> None:
        if set(state_dict) != set(self.optimizers):
            raise ValueError(f"optimizer state has groups {sorted(state_dict)}, expected {sorted(self.optimizers)}")
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state_dict[name])


def make_nesterov_adam(params: list[nn.Parameter], *, lr: float) -> torch.optim.NAdam:
    """Nesterov Adam (optax ``nadam``) with the released betas (0.9, 0.95), eps 1e-8, no weight decay."""
    return torch.optim.NAdam(params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=0.0,
                             momentum_decay=NESTEROV_MOMENTUM_DECAY)


def build_optimizer(model: nn.Module, *, kind: str, lr: float) -> MuonWithNAdam:
    """``kind="muon"``: Muon for Linear weights + Nesterov Adam for the rest (pMF).
    ``kind="adam"``: Nesterov Adam for every parameter (the paper's Adam ablation)."""
    muon, adam = split_parameters(model)
    if kind == "muon":
        return MuonWithNAdam(muon, adam, lr=lr)
    if kind == "adam":
        return MuonWithNAdam([], muon + adam, lr=lr)
    raise ValueError(f"optimizer must be 'muon' or 'adam', got {kind!r}")
