"""One arm of a digits experiment: train with ``full.train.train`` (unchanged), sample in one step, score.

An arm is a training configuration plus the guidance settings it is sampled at. Its result (metrics of
every sampling setting, raw and EMA weights, the loss curve, a few samples per class) is cached as JSON in
``<out>/runs/<key>/result.json``, where the key names the arm's full training configuration: experiments
that share an arm (the pMF baseline appears in all four) train it once, and an interrupted sweep resumes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..io import write_json
from .data import NUM_CLASSES, DigitsDataset
from ..checkpoint import load_model
from .metrics import DigitsEvaluator
from ..ema import format_half_life
from ..sample import class_labels, generate, sample_noise
from ..train import TrainConfig, train

PRESET = "pMF-T/4"
"""Width 64, trunk 2 + u-head 2 + v-head 2 blocks, bottleneck 16 (the contract's tiny CPU preset)."""
SAMPLE_SEED = 1
"""Seed of the sampling noise: every arm at one resolution sees the same z_1 (common random numbers)."""
GRID_PER_CLASS = 8
"""Samples per class kept for the figure."""
RESULT_VERSION = 1
"""Bump when the result format or the evaluation changes, so cached arms are re-evaluated."""


@dataclass(frozen=True)
class ArmSpec:
    """What one arm trains (passed to ``TrainConfig``) and how it is sampled."""
    resolution: int = 16
    patch: int = 4
    prediction: str = "x"          # "x" (pMF) | "u"
    optimizer: str = "muon"        # "muon" (pMF) | "adam"
    time_sampler: str = "full"     # "full" (pMF) | "diagonal" | "endpoint" | "two_lines"
    guidance: bool = True          # trained-in CFG (pMF)
    omegas: tuple[float, ...] = (1.0,)   # guidance scales to sample at (1 = no guidance)
    noise_scale: float = 1.0       # s of e ~ N(0, s^2 I) (the preset's 1); the paper uses 2-4 at 512 px


@dataclass(frozen=True)
class Budget:
    """Training length and evaluation size shared by every arm of a sweep."""
    steps: int
    batch_size: int
    lr: float
    seed: int
    per_class: int                 # generated images per class (held-out floor: 50 per class)
    ema_kimg: float                # EMA half-life; ramped to 5% of images seen (EDM), so short runs use the ramp
    precision: str = "fp32"        # full.train's --precision on this CPU: "fp32" or "bf16" (every pass autocast)


def train_config(spec: ArmSpec, budget: Budget, out: Path) -> TrainConfig:
    return TrainConfig(
        preset=PRESET, num_classes=NUM_CLASSES, channels=1, resolution=spec.resolution, patch=spec.patch,
        noise_scale=spec.noise_scale,
        batch_size=budget.batch_size, steps=budget.steps, lr=budget.lr, seed=budget.seed,
        precision=budget.precision, optimizer=spec.optimizer, prediction=spec.prediction,
        time_sampler=spec.time_sampler,
        guidance=spec.guidance, ema_half_lives_kimg=(budget.ema_kimg,),
        # Deviation: MSE only (no LPIPS / ConvNeXt): their pretrained nets need 224 px RGB and weights we
        # do not ship; the paper's own ablations (Tables 2-5) are MSE-only too.
        perceptual="none",
        ckpt_every=budget.steps, log_every=max(1, budget.steps // 20), out=str(out), device="cpu",
        num_workers=0, overwrite=True)   # the arm folder is this cache's own: retraining replaces it


def arm_key(spec: ArmSpec, budget: Budget) -> str:
    """A readable, unique folder name for the training configuration (the omegas are not part of it)."""
    training = {k: v for k, v in dataclasses.asdict(spec).items()
                if k != "omegas" and not (k == "noise_scale" and v == 1.0)}   # keys of pMF arms unchanged
    training.update({k: v for k, v in dataclasses.asdict(budget).items()
                     if not (k == "precision" and v == "fp32")})   # keys of fp32 arms unchanged
    digest = hashlib.sha1(json.dumps(training, sort_keys=True).encode()).hexdigest()[:8]
    scale = "" if spec.noise_scale == 1.0 else f"-noisescale{spec.noise_scale:g}"
    return (f"{spec.resolution}px-p{spec.patch}-{spec.prediction}-{spec.optimizer}-{spec.time_sampler}-"
            f"{'cfg' if spec.guidance else 'nocfg'}{scale}-{budget.steps}steps"
            f"{'' if budget.precision == 'fp32' else '-' + budget.precision}-{digest}")



@torch.no_grad()
def one_step_samples(model: torch.nn.Module, *, per_class: int, omega: float,
                     t_min: float, t_max: float, batch_size: int = 250) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` one-step samples of every class: x = z_1 - u(z_1, 0, 1) (``full.sample.generate``;
    x- or u-prediction is the model's).

    Returns:
        (images (N, 1, res, res), labels (N,)), N = per_class * 10, labels ``i mod 10``.
    """
    indices = torch.arange(per_class * NUM_CLASSES)
    shape = (model.channels, model.resolution, model.resolution)
    images, labels = [], []
    for batch in indices.split(batch_size):
        y = class_labels(batch, NUM_CLASSES)
        z_1 = sample_noise(batch, shape, seed=SAMPLE_SEED, noise_scale=model.noise_scale)
        images.append(generate(model, z_1, y, omega=omega, t_min=t_min, t_max=t_max))
        labels.append(y)
    return torch.cat(images), torch.cat(labels)


def _grid(images: torch.Tensor, labels: torch.Tensor) -> list:
    """The first GRID_PER_CLASS samples of every class as nested lists, (10, k, res, res) in [-1, 1]."""
    rows = [images[labels == k][:GRID_PER_CLASS, 0].clamp(-1, 1) for k in range(NUM_CLASSES)]
    return np.round(torch.stack(rows).numpy(), 3).tolist()


def _evaluate(networks: dict, spec: ArmSpec, omega: float, budget: Budget, evaluator: DigitsEvaluator,
              sample_interval: tuple[float, float], result: dict) -> None:
    # Without trained-in CFG the network only ever saw omega = 1 on the interval [0, 1].
    t_min, t_max = sample_interval if spec.guidance else (0.0, 1.0)
    for name, network in networks.items():
        images, labels = one_step_samples(network, per_class=budget.per_class,
                                          omega=omega, t_min=t_min, t_max=t_max)
        result["metrics"][name][str(omega)] = evaluator.evaluate(images, labels)
        if name == "ema":
            result["grid"][str(omega)] = _grid(images, labels)


def run_arm(spec: ArmSpec, budget: Budget, evaluator: DigitsEvaluator, *, out: Path,
            sample_interval: tuple[float, float], progress: bool = True, fresh: bool = False,
            report_only: bool = False) -> dict | None:
    """Train one arm (or reuse its cached training) and evaluate it at every omega of ``spec``.

    Omegas missing from a cached result are evaluated from the arm's checkpoint, without retraining.

    Returns:
        ``{"key", "spec", "budget", "train_seconds", "final_raw_u", "loss_curve", "metrics": {"ema"|"raw":
        {str(omega): {"fd", "accuracy", "off_subspace_rms"}}}, "grid": {str(omega): (10, k, res, res) list}}``
        (grids of the EMA weights); None with ``report_only`` when the arm was never trained.
    """
    key = arm_key(spec, budget)
    folder = out / "runs" / key
    result_path = folder / "result.json"
    ema_key = format_half_life(budget.ema_kimg)
    result, networks = None, None
    if result_path.exists() and not fresh:
        try:
            result = json.loads(result_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):   # a cache: a damaged entry is recomputed
            print(f"{result_path}: unreadable cached result, training the arm again", flush=True)
            result = None
        if not isinstance(result, dict) or result.get("version") != RESULT_VERSION:
            result = None
    if result is None and report_only:
        return None
    if result is None:
        start = time.perf_counter()
        trained = train(train_config(spec, budget, folder), dataset=DigitsDataset(spec.resolution),
                        progress=progress)
        train_seconds = time.perf_counter() - start
        networks = {"ema": trained.emas[ema_key], "raw": trained.model.eval()}
        losses = [record["raw_u"] for record in trained.history]
        tail = max(1, len(losses) // 10)
        result = {"version": RESULT_VERSION, "key": key, "spec": dataclasses.asdict(spec),
                  "budget": dataclasses.asdict(budget), "train_seconds": train_seconds,
                  "final_raw_u": float(np.mean(losses[-tail:])),
                  "loss_curve": [float(np.mean(losses[i:i + tail])) for i in range(0, len(losses), tail)],
                  "sample_interval": list(sample_interval), "metrics": {"ema": {}, "raw": {}}, "grid": {}}
    missing = [float(omega) for omega in spec.omegas if str(float(omega)) not in result["metrics"]["ema"]]
    if missing:
        if networks is None:
            checkpoint = folder / "checkpoint.pt"
            networks = {"ema": load_model(checkpoint, ema_key), "raw": load_model(checkpoint, None)}
        for omega in missing:
            _evaluate(networks, spec, omega, budget, evaluator, sample_interval, result)
        write_json(result_path, result)
    return result
