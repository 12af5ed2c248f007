"""Train one toy model (one dataset, one D, one parametrisation) and evaluate its 1-NFE samples.

Every equation comes from ``pmf_ref``: the loss is the paper's Alg. 1 (``velocity_loss``) or the
original MeanFlow tangent ``e - x`` (``meanflow_loss`` + ``tangent_conditional``); times from
``sample_time_pair``; samples from ``sample_one_step``. x- and u-prediction share the network,
loss, time sampler, optimiser, batch and steps; only the output's meaning differs.
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

import pmf_ref as P

from .data import embed, off_manifold, project, random_projection, sample_2d
from .metrics import energy_distance, sliced_wasserstein
from .model import DEPTH, WIDTH, ToyMLP

TANGENTS = ("model", "conditional")
"""JVP tangent for z: the model's own ``sg(u(z_t, t, t))`` (pMF Alg. 1) or ``e - x`` (MeanFlow)."""
TIME_MEAN, TIME_STD = 0.0, 1.0
# Logit-normal (mean, std) of t and r for the toy; the papers do not give them (method.md Sec. 8).
# Deviation: pMF ImageNet uses (0.8, 0.8), which puts most times near t = 1; a centred, wider
# sampler covers the whole [0, 1] range that a 2-D toy needs. Measured (D = 2, x-prediction,
# 1000 steps, batch 512, no EMA): swd 0.23 with (0, 1), 0.24 with MeanFlow's (-0.4, 1), 0.41 with (0.8, 0.8).
EMA_DECAY = 0.995
# Samples come from an exponential moving average of the weights, as in pMF (Sec. 6 of method.md:
# EMA half-lives of 500-2000 kimg there). Here 0.995 averages over ~200 steps: it smooths Adam's
# step noise at constant lr, which otherwise dominates the 1-NFE sample quality of a short run.
EMA_WARMUP = 10              # decay_k = min(EMA_DECAY, (1 + k) / (EMA_WARMUP + k)): early steps not frozen in
EVAL_SAMPLES = 4096          # 1-NFE samples and fresh data samples compared by the metrics
FINAL_LOSS_FRACTION = 0.1    # final_loss averages the raw loss over the last 10% of the steps
# Seed offsets, so the projection, the init, the data stream and the evaluation never share draws.
SEED_PROJECTION, SEED_DATA, SEED_EVAL_NOISE, SEED_EVAL_DATA = 0, 1_000_003, 2_000_003, 3_000_017


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """Everything one run needs; built at the entry point (``run_sweep`` or the CLI)."""
    dataset: str = "swiss_roll"
    dim: int = 2                 # D, dimension of the observation space
    prediction: str = "x"        # "x" (pMF) or "u" (iMF)
    steps: int = 2000
    batch_size: int = 512
    lr: float = 1e-3             # Adam, constant, as pMF's ImageNet lr
    seed: int = 0
    tangent: str = "model"       # pMF Alg. 1 by default
    time_mean: float = TIME_MEAN
    time_std: float = TIME_STD
    depth: int = DEPTH
    width: int = WIDTH
    ema_decay: float = EMA_DECAY  # 0 evaluates the raw weights
    eval_samples: int = EVAL_SAMPLES
    device: str = "cpu"


@dataclasses.dataclass
class ToyRun:
    """A trained toy model with its metrics (``record``, the JSON row) and what the plots need."""
    record: dict
    samples_2d: np.ndarray       # (eval_samples, 2): 1-NFE samples projected back by P^T
    losses: np.ndarray           # (steps,): batch mean of the raw (unweighted) loss per step
    config: ToyConfig
    model: ToyMLP                # the EMA weights (those that drew samples_2d)
    projection: torch.Tensor     # P, (D, 2)


def make_u_fn(model: ToyMLP, prediction: str) -> tuple[Callable, bool]:
    """``(u_fn, has_aux)`` for the core: x-prediction is wrapped by ``u_fn_from_x_fn``."""
    if prediction == "x":
        return P.u_fn_from_x_fn(model), True
    if prediction == "u":
        return model, False
    raise ValueError(f"prediction must be 'x' or 'u', got {prediction!r}")


def loss_terms(u_fn: Callable, has_aux: bool, x: torch.Tensor, e: torch.Tensor, r: torch.Tensor,
               t: torch.Tensor, tangent: str) -> P.MeanFlowLossTerms:
    """Per-sample loss terms with the chosen JVP tangent (both from ``pmf_ref``)."""
    if tangent == "model":
        return P.velocity_loss(u_fn, x, e, r, t, has_aux=has_aux)
    if tangent == "conditional":
        z_t = P.interpolate(x, e, t)
        return P.meanflow_loss(u_fn, z_t, r, t, v_target=P.target_velocity(z_t, x, t),
                               v_tangent=P.tangent_conditional(x, e), has_aux=has_aux)
    raise ValueError(f"tangent must be one of {TANGENTS}, got {tangent!r}")


@torch.no_grad()
def update_ema(ema_model: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``theta_ema <- decay * theta_ema + (1 - decay) * theta``, parameter by parameter."""
    for ema_parameter, parameter in zip(ema_model.parameters(), model.parameters()):
        ema_parameter.lerp_(parameter, 1.0 - decay)


def evaluate(model: ToyMLP, config: ToyConfig, projection: torch.Tensor) -> tuple[dict, np.ndarray]:
    """1-NFE samples from fixed noise; swd and energy against fresh data on the plane; off-manifold norm."""
    u_fn, has_aux = make_u_fn(model, config.prediction)
    generator = torch.Generator().manual_seed(config.seed + SEED_EVAL_NOISE)
    e = torch.randn(config.eval_samples, config.dim, generator=generator).to(config.device)
    model.eval()
    x_hat = P.sample_one_step(u_fn, e, has_aux=has_aux).cpu()                      # (n, D)
    model.train()
    samples_2d = project(x_hat, projection)                                         # (n, 2)
    reference = sample_2d(config.dataset, config.eval_samples, seed=config.seed + SEED_EVAL_DATA)
    metrics = {"swd": sliced_wasserstein(samples_2d, reference),
               "energy": energy_distance(samples_2d, reference),
               "off_manifold": float(off_manifold(x_hat, projection).mean())}
    return metrics, samples_2d.numpy()


def train(config: ToyConfig, *, progress: bool = True) -> ToyRun:
    """Train one model for ``config.steps`` Adam steps on fresh batches; evaluate it."""
    torch.manual_seed(config.seed)  # network init
    projection = random_projection(config.dim, seed=config.seed + SEED_PROJECTION)
    model = ToyMLP(config.dim, depth=config.depth, width=config.width).to(config.device)
    u_fn, has_aux = make_u_fn(model, config.prediction)
    ema_model = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed + SEED_DATA)   # noise and times
    data_stream = np.random.RandomState(config.seed + SEED_DATA)           # fresh data each step
    projection_device = projection.to(config.device)

    losses = np.zeros(config.steps)
    bar = tqdm(range(config.steps), desc=f"{config.prediction}-pred D={config.dim}", disable=not progress,
               leave=False, dynamic_ncols=True)
    for step in bar:
        x_2d = sample_2d(config.dataset, config.batch_size, seed=data_stream)       # (B, 2)
        x = embed(x_2d.to(config.device), projection_device)                        # (B, D)
        e = torch.randn(config.batch_size, config.dim, generator=generator).to(config.device)
        r, t = P.sample_time_pair(config.batch_size, mean=config.time_mean, std=config.time_std,
                                  generator=generator)
        terms = loss_terms(u_fn, has_aux, x, e, r.to(config.device), t.to(config.device), config.tangent)
        loss = terms.loss.mean()   # batch mean last (pMF)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update_ema(ema_model, model, min(config.ema_decay, (1 + step) / (EMA_WARMUP + step)))
        losses[step] = float(terms.raw.detach().mean())
        if step % 50 == 0:
            bar.set_postfix(raw_loss=f"{losses[step]:.3g}")

    metrics, samples_2d = evaluate(ema_model, config, projection)
    tail = max(1, int(config.steps * FINAL_LOSS_FRACTION))
    record = {"prediction": config.prediction, "dim": config.dim, "dataset": config.dataset,
              "steps": config.steps, "seed": config.seed, **metrics,
              "final_loss": float(losses[-tail:].mean())}
    return ToyRun(record, samples_2d, losses, config, ema_model, projection)
