"""The networks the benchmarks run on, each with a fixed batch: the toy MLP and pMF ViTs.

A :class:`Workload` bundles what every variant needs so that they all run on the *same* network,
parameters and tensors: the x-prediction callable ``x_fn(z, r, t)`` (labels bound, no guidance),
a fixed training batch, the released-recipe per-sample loss (ViTs only; the toy has no v-head),
and a sampling callable with its noise.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

import pmf_ref as P
from toy.model import ToyMLP

from .steps import Batch
from ..model import build_model, make_cond
from ..presets import RECIPES, SAMPLING, Recipe
from ..step import StepRandomness, TrainingStep

SEED_INIT, SEED_BATCH = 0, 1  # the network's init and the batch never share draws


@dataclasses.dataclass
class Workload:
    name: str
    description: str
    parameters: list[torch.nn.Parameter]
    param_count: int                       # parameters used by the u path (what the steps time)
    batch: Batch
    x_fn: Callable                         # (z, r, t) -> x_hat, training conditioning bound
    released_loss: Callable[[], torch.Tensor] | None  # () -> per-sample total loss (B,)
    released_source: str | None            # which code computes it
    sample_x_fn: Callable                  # (z, r, t) -> x_hat, sampling conditioning bound
    sample_noise: torch.Tensor


def _time_pair(n: int, generator: torch.Generator, device, mean: float = P.P_MEAN, std: float = P.P_STD):
    return P.sample_time_pair(n, mean=mean, std=std, generator=generator, device=device)


def toy_workload(*, dim: int, batch_size: int, sample_batch: int, device: torch.device) -> Workload:
    """The toy ReLU MLP (7 Linear layers, width 256) on D-dimensional points, x-prediction."""
    torch.manual_seed(SEED_INIT)
    model = ToyMLP(dim).to(device)
    generator = torch.Generator(device=device).manual_seed(SEED_BATCH)
    x = torch.randn(batch_size, dim, generator=generator, device=device)
    e = torch.randn(batch_size, dim, generator=generator, device=device)
    r, t = _time_pair(batch_size, generator, device)
    noise = torch.randn(sample_batch, dim, generator=generator, device=device)
    params = list(model.parameters())
    return Workload(name=f"toy MLP D={dim}", description=f"toy.model.ToyMLP(dim={dim}), batch {batch_size}",
                    parameters=params, param_count=sum(p.numel() for p in params),
                    batch=Batch(x, e, r, t), x_fn=model, released_loss=None, released_source=None,
                    sample_x_fn=model, sample_noise=noise)


def released_loss_fn(model, batch: Batch, y: torch.Tensor, recipe: Recipe, seed: int):
    """The trainer's own step, ``full.step.TrainingStep`` (MSE-only: no perceptual nets), on the fixed
    batch; guidance draws from the recipe's guidance sampler."""
    objective = TrainingStep.from_preset(model, recipe)
    generator = torch.Generator(device=batch.x.device).manual_seed(seed)
    omega, t_min, t_max, dropped = objective.sample_guidance(batch.r, batch.t, generator)
    no_crops = torch.zeros(batch.x.shape[0], 4, dtype=torch.long, device=batch.x.device)  # perceptual off
    randomness = StepRandomness(batch.e, batch.r, batch.t, omega, t_min, t_max, dropped, no_crops)

    def loss() -> torch.Tensor:
        return objective(batch.x, y, randomness)["total"]
    return loss, "full.step.TrainingStep (perceptual=None)"


def vit_workload(preset_name: str, *, batch_size: int, sample_batch: int, device: torch.device,
                 **overrides) -> Workload:
    """A pMF ViT from a preset (``overrides`` such as resolution=64), random images in [-1, 1]."""
    torch.manual_seed(SEED_INIT)
    model = build_model(preset_name, **overrides).to(device)
    recipe, best = RECIPES[preset_name], SAMPLING[preset_name]
    shape = (model.channels, model.resolution, model.resolution)
    generator = torch.Generator(device=device).manual_seed(SEED_BATCH)
    x = torch.rand(batch_size, *shape, generator=generator, device=device) * 2 - 1
    e = model.noise_scale * torch.randn(batch_size, *shape, generator=generator, device=device)
    r, t = _time_pair(batch_size, generator, device, recipe.P_mean, recipe.P_std)
    y = torch.randint(0, model.num_classes, (batch_size,), generator=generator, device=device)
    batch = Batch(x, e, r, t)
    train_cond = make_cond(y, 1.0, 0.0, 1.0)  # Alg. 1 and flow matching: no guidance

    def x_fn(z, r_, t_):
        return model.forward_u(z, r_, t_, train_cond)

    released_loss, released_source = released_loss_fn(model, batch, y, recipe, SEED_BATCH)
    y_sample = torch.randint(0, model.num_classes, (sample_batch,), generator=generator, device=device)
    sample_cond = make_cond(y_sample, best.omega, best.t_min, best.t_max)

    def sample_x_fn(z, r_, t_):
        return model.forward_u(z, r_, t_, sample_cond)

    noise = model.noise_scale * torch.randn(sample_batch, *shape, generator=generator, device=device)
    size = "x".join(map(str, shape))
    return Workload(name=f"{preset_name} @{model.resolution}px",
                    description=f"full.model {preset_name} {overrides or ''}, images {size}, batch {batch_size}",
                    parameters=list(model.parameters()), param_count=model.param_count(with_v_head=False),
                    batch=batch, x_fn=x_fn, released_loss=released_loss, released_source=released_source,
                    sample_x_fn=sample_x_fn, sample_noise=noise)
