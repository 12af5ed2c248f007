"""Train one toy model (one dataset, one D, one parametrisation) and evaluate its 1-NFE samples.

Every equation comes from ``pmf_ref``: the loss is the paper's Alg. 1 (``velocity_loss``) or the
original MeanFlow tangent ``e - x`` (``meanflow_loss`` + ``tangent_conditional``); times from
``sample_time_pair``; samples from ``sample_one_step``. x- and u-prediction share the network,
loss, time sampler, optimiser, batch and steps; only the output's meaning differs.

The recipe (the defaults of :class:`ToyConfig`) is public so that the tutorials follow it:
``sample_times(config, n, generator=...)`` draws (r, t) as the recipe does and
``training_precision(config)`` is the context the training step runs in.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

import pmf_ref as P
from full import fast_jvp

from .data import DATASETS, embed, off_manifold, project, random_projection, sample_2d
from .metrics import coverage_distance, energy_distance, precision_distance, sliced_wasserstein
from .model import DEPTH, PREDICTIONS, WIDTH, ToyMLP

TANGENTS = ("model", "conditional")
"""JVP tangent for z: the model's own ``sg(u(z_t, t, t))`` (pMF Alg. 1) or ``e - x`` (MeanFlow)."""
LR_SCHEDULES = ("constant", "cosine", "linear")
"""Learning rate over the run: constant, or decayed from ``lr`` to 0 by a half cosine or linearly."""
COMPUTE_DTYPES = ("auto", "bfloat16", "float32")
"""Matmul precision of the training step: "auto" = bfloat16 autocast on a CPU with native bf16 matmuls
(AMX tiles or AVX512-BF16), else float32. Weights, optimiser state, EMA and evaluation are always float32."""
UNIFORM_FRACTION = 1.0
# Share of rows whose (t, r) are drawn from U(0, 1)^2 instead of the logit-normal (pMF-H: 10%).
# Deviation: pMF's ImageNet sampler is logit-normal (0.8, 0.8). The toy draws every row uniformly:
# the one-step map x(z, 0, 1) is learned through the MeanFlow identity all along r = 0 and up to
# t = 1, which a uniform sampler covers and a logit-normal one starves. Measured (D = 2, x-prediction,
# 2,000 steps, seed 0): precision distance 0.038 uniform, 0.047 logit-normal (0, 1); 0.41 vs 0.23
# swd at (0.8, 0.8) vs (0, 1) in an earlier 1,000-step measurement. The README has the table.
TIME_MEAN, TIME_STD = 0.0, 1.0
# Logit-normal (mean, std) of the rows not drawn uniformly (none at the default UNIFORM_FRACTION = 1).
EQUAL_FRACTION = P.EQUAL_FRACTION  # share of rows with r = t: 50%, as in pMF
CORNER_FRACTION = 0.0
# Share of rows set to (r, t) = (0, 1) after the draw above: the point one-step sampling evaluates.
# Off by default: measured (D = 2, x-prediction, 2,000 x 512, seed 0; precision / swd) 0.038 / 0.242
# without, 0.043 / 0.236 at 10%, 0.052 / 0.263 at 25% -- the identity along r = 0 already trains it.
EMA_DECAY = 0.995
# Samples come from an exponential moving average of the weights, as in pMF (EMA half-lives of
# 500-2000 kimg there). With the warm-up below, decay_k = min(0.995, (1 + k) / (10 + k)) averages
# over roughly the last tenth of the steps: it smooths Adam's step noise at constant lr, which
# otherwise dominates the 1-NFE sample quality of a short run. (Within 1,200 steps the warm-up
# term, 0.993 at the last step, is always the smaller one: a larger ema_decay changes nothing there.)
EMA_WARMUP = 10              # decay_k = min(EMA_DECAY, (1 + k) / (EMA_WARMUP + k)): early steps not frozen in
EVAL_SAMPLES = 4096          # 1-NFE samples and fresh data samples compared by the metrics
FINAL_LOSS_FRACTION = 0.1    # final_loss averages the raw loss over the last 10% of the steps
# Seed offsets, so the projection, the init, the data stream, the evaluation and the floor never share draws.
SEED_PROJECTION, SEED_DATA, SEED_EVAL_NOISE, SEED_EVAL_DATA, SEED_FLOOR = 0, 1_000_003, 2_000_003, 3_000_017, 4_000_037


class ToyDivergenceError(ArithmeticError):
    """A run whose raw loss or sample metrics became NaN or inf; the one-line message names the run and the step."""


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    """One run: its dataset, D, parametrisation and seed, and the training recipe (the defaults).

    Built at the entry point (``run_sweep`` or the CLI); ``ToyConfig()`` is the recipe of ``make demo``.
    """
    dataset: str = "swiss_roll"
    dim: int = 2                 # D, dimension of the observation space
    prediction: str = "x"        # "x" (pMF) or "u" (iMF)
    seed: int = 0
    # Why 1,200 steps of batch 1,024 at lr 2e-3 with a 100-step warm-up: a toy step costs mostly per-call
    # overhead on one CPU thread (D = 2, bf16, interleaved: 18.8 ms at batch 512, 30.5 ms at 1,024, 53 ms at
    # 2,048), so a large batch is cheap, and at that batch Adam takes a larger lr. Measured (x-prediction,
    # precision / its floor, seeds 0 1 2 at D = 2, seeds 0 1 at D = 512): 1,000 steps at lr 1e-3: 3.03 2.53 2.94
    # / 2.38 2.59; lr 2e-3: 2.31 2.50 2.97 / 2.08 2.50; 1,200 steps at lr 1.5e-3: 2.76 2.48 2.91 / 2.20 2.18;
    # at lr 2e-3: 2.00 2.23 2.61 / 1.84 2.27, but without a warm-up x-prediction on the checkerboard at
    # D = 512 (seed 0) collapsed onto a few cells (coverage 36x its floor); with the warm-up (chosen):
    # 2.35 2.19 2.44 / 1.92 2.03, and that run is fine (1.7x). The README has every run.
    steps: int = 1200
    batch_size: int = 1024
    lr: float = 2e-3             # Adam's peak lr (pMF's ImageNet lr is 1e-3 at the same batch)
    warmup_steps: int = 100      # the lr rises linearly over these first steps; 0 = none
    lr_schedule: str = "constant"
    # Decaying the lr (cosine or linear to 0) gave a better swd (0.20 vs 0.21-0.24) but a worse precision
    # (0.050-0.062 vs 0.038-0.045) at D = 2 and a worse swd at D = 512 (0.26 at 1,200 cosine steps).
    tangent: str = "model"       # pMF Alg. 1 by default
    # p of the loss's adaptive weight L / sg(L + c)^p stays pMF's 1: the loss is Alg. 1's. It is p, not the
    # recipe, that sets x-prediction's swd: the weight 1 / (L + c) discounts the rows whose data point lies
    # on another arm than the one most of the noise near z_t flows to, so the learned velocity field itself
    # over-fills the dense inner arm (32-step sampling as well as 1-step). Measured (x, D = 512, seeds 0 1,
    # 1,000 steps at lr 1e-3): swd 0.166 at p = 1, 0.130 at 0.75, 0.101 at 0.5; precision 2.5x, 2.8x, 4.0x
    # its floor. The README has the runs.
    adaptive_power: float = P.ADAPTIVE_P
    uniform_fraction: float = UNIFORM_FRACTION
    time_mean: float = TIME_MEAN
    time_std: float = TIME_STD
    equal_fraction: float = EQUAL_FRACTION
    corner_fraction: float = CORNER_FRACTION
    depth: int = DEPTH           # 7 Linear layers of width 256: pMF's toy network
    width: int = WIDTH
    ema_decay: float = EMA_DECAY  # 0 evaluates the raw weights
    compute_dtype: str = "auto"
    eval_samples: int = EVAL_SAMPLES
    device: str = "cpu"

    def __post_init__(self):
        checks = [(self.dataset in DATASETS, f"dataset must be one of {', '.join(DATASETS)}"),
                  (self.dim >= 2, "dim must be >= 2 (the data are 2-D)"),
                  (self.prediction in PREDICTIONS, f"prediction must be one of {PREDICTIONS}"),
                  (self.tangent in TANGENTS, f"tangent must be one of {TANGENTS}"),
                  (self.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {LR_SCHEDULES}"),
                  (self.compute_dtype in COMPUTE_DTYPES, f"compute_dtype must be one of {COMPUTE_DTYPES}"),
                  (self.steps >= 1 and self.batch_size >= 2 and self.eval_samples >= 2,
                   "steps >= 1, batch_size >= 2 and eval_samples >= 2 are needed"),
                  (self.lr > 0 and self.time_std > 0, "lr and time_std must be > 0"),
                  (all(map(math.isfinite, (self.lr, self.time_mean, self.time_std, self.adaptive_power))),
                   "lr, time_mean, time_std and adaptive_power must be finite"),
                  (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
                  (self.adaptive_power >= 0, "adaptive_power must be >= 0"),
                  (0 <= self.uniform_fraction <= 1 and 0 <= self.equal_fraction <= 1
                   and 0 <= self.corner_fraction <= 1,
                   "uniform_fraction, equal_fraction and corner_fraction must lie in [0, 1]"),
                  (0 <= self.ema_decay < 1, "ema_decay must lie in [0, 1)")]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"ToyConfig: {message}; got {self}")


@dataclasses.dataclass
class ToyRun:
    """A trained toy model with its metrics (``record``, the JSON row) and what the plots need."""
    record: dict
    samples_2d: np.ndarray       # (eval_samples, 2): 1-NFE samples projected back by P^T
    losses: np.ndarray           # (steps,): batch mean of the raw (unweighted) loss per step
    config: ToyConfig
    model: ToyMLP                # the EMA weights (those that drew samples_2d)
    projection: torch.Tensor     # P, (D, 2)
    cpu_seconds: float = 0.0     # process CPU time of the training loop (not in the record: not reproducible)


def sample_times(config: ToyConfig, n: int, *, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, t), each (n,), 0 <= r <= t <= 1, drawn as the recipe does: ``pmf_ref.sample_time_pair``, then
    a ``corner_fraction`` of the rows (a coin flip each) set to (r, t) = (0, 1)."""
    r, t = P.sample_time_pair(n, mean=config.time_mean, std=config.time_std, equal_fraction=config.equal_fraction,
                              uniform_fraction=config.uniform_fraction, generator=generator)
    if config.corner_fraction > 0:   # no extra draw otherwise: the stream of a corner-free recipe is unchanged
        corner = torch.rand(n, generator=generator) < config.corner_fraction
        r, t = r.masked_fill(corner, 0.0), t.masked_fill(corner, 1.0)
    return r, t


def learning_rate(config: ToyConfig, step: int) -> float:
    """Adam's lr at ``step`` (0-based) of ``config.steps``: ``lr``, or decayed to 0 at the last step, times
    the warm-up factor ``min(1, (k + 1) / warmup_steps)``.

    cosine: ``lr (1 + cos(pi k / (K - 1))) / 2``; linear: ``lr (1 - k / (K - 1))``.
    """
    progress = step / max(1, config.steps - 1)
    warmup = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps > 0 else 1.0
    if config.lr_schedule == "cosine":
        return warmup * config.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if config.lr_schedule == "linear":
        return warmup * config.lr * (1.0 - progress)
    return warmup * config.lr


def cpu_has_native_bf16() -> bool:
    """True on a CPU whose bf16 matmuls run in hardware: AMX tiles (Intel Sapphire Rapids and later) or
    AVX512-BF16 (e.g. AMD Zen 4). Measured (7 x 256 MLP, Alg. 1 step, batch 1,024, one thread): bf16 is
    1.7-2.0x faster than float32 on both kinds (AMD EPYC with AVX512-BF16: 30.5 vs 60.6 ms at D = 2)."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_compute_dtype(config: ToyConfig) -> torch.dtype:
    """The training step's matmul dtype: ``compute_dtype``, with "auto" = bfloat16 on a CPU with native
    bf16 matmuls (:func:`cpu_has_native_bf16`), float32 elsewhere (emulated bf16 would be slower)."""
    if config.compute_dtype == "auto":
        native = torch.device(config.device).type == "cpu" and cpu_has_native_bf16()
        return torch.bfloat16 if native else torch.float32
    return getattr(torch, config.compute_dtype)


def training_precision(config: ToyConfig) -> contextlib.AbstractContextManager:
    """The context of the training step's forward passes: nothing for float32, bf16 autocast otherwise.

    Autocast runs every Linear in bfloat16 (AMX tiles or AVX512-BF16) with float32 weights and
    gradients; the network's ``full.fast_jvp`` ops take it, so the JVP stays the cheap one.
    Measured interleaved on one thread (7 x 256 MLP, batch 512, Alg. 1 step): bf16 with the fast ops
    25.5 ms at D = 2 and 36.3 ms at D = 512; bf16 on plain torch ops 33.4 / 44.2; float32 41.0 / 63.5.
    """
    dtype = resolve_compute_dtype(config)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(config.device).type, dtype=dtype)


def make_u_fn(model: ToyMLP, prediction: str) -> tuple[Callable, bool]:
    """The toy's one adapter to the core: ``(u_fn, has_aux)`` -- x-prediction wrapped by ``u_fn_from_x_fn``
    (``u = (z - x_hat) / max(t, t_eps)``, x_hat as aux), u-prediction the network itself. The only place the
    toy asks what its network predicts (tutorials call it too)."""
    if prediction == "x":
        return P.u_fn_from_x_fn(model), True
    if prediction == "u":
        return model, False
    raise ValueError(f"prediction must be 'x' or 'u', got {prediction!r}")


def loss_terms(u_fn: Callable, has_aux: bool, x: torch.Tensor, e: torch.Tensor, r: torch.Tensor,
               t: torch.Tensor, tangent: str, *, p: float = P.ADAPTIVE_P) -> P.MeanFlowLossTerms:
    """Per-sample loss terms with the chosen JVP tangent (both from ``pmf_ref``); ``p`` is the
    adaptive weight's power (pMF: 1). The JVP runs on the fast engine, ``full.fast_jvp.jvp``."""
    if tangent == "model":
        return P.velocity_loss(u_fn, x, e, r, t, has_aux=has_aux, p=p, jvp=fast_jvp.jvp)
    if tangent == "conditional":
        z_t = P.interpolate(x, e, t)
        return P.meanflow_loss(u_fn, z_t, r, t, v_target=P.target_velocity(z_t, x, t),
                               v_tangent=P.tangent_conditional(x, e), has_aux=has_aux, p=p, jvp=fast_jvp.jvp)
    raise ValueError(f"tangent must be one of {TANGENTS}, got {tangent!r}")


@torch.no_grad()
def update_ema(ema_model: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """``theta_ema <- decay * theta_ema + (1 - decay) * theta``, parameter by parameter."""
    for ema_parameter, parameter in zip(ema_model.parameters(), model.parameters()):
        ema_parameter.lerp_(parameter, 1.0 - decay)


def evaluate(model: ToyMLP, config: ToyConfig, projection: torch.Tensor) -> tuple[dict, np.ndarray]:
    """1-NFE samples from fixed noise, scored on the plane against fresh data (float32, no autocast).

    swd, energy, precision and coverage compare the samples with ``eval_samples`` data points;
    ``*_floor`` are the same metrics for a second, independent data sample of that size (what a
    perfect model would score). off_manifold is the samples' mean distance from the data plane.
    """
    u_fn, has_aux = make_u_fn(model, config.prediction)
    generator = torch.Generator().manual_seed(config.seed + SEED_EVAL_NOISE)
    e = torch.randn(config.eval_samples, config.dim, generator=generator).to(config.device)
    model.eval()
    x_hat = P.sample_one_step(u_fn, e, has_aux=has_aux).cpu()                      # (n, D)
    model.train()
    samples_2d = project(x_hat, projection)                                         # (n, 2)
    reference = sample_2d(config.dataset, config.eval_samples, seed=config.seed + SEED_EVAL_DATA)
    second = sample_2d(config.dataset, config.eval_samples, seed=config.seed + SEED_FLOOR)
    metrics = {}
    for name, metric in (("swd", sliced_wasserstein), ("energy", energy_distance),
                         ("precision", precision_distance), ("coverage", coverage_distance)):
        metrics[name] = metric(samples_2d, reference)
        metrics[f"{name}_floor"] = metric(second, reference)
    metrics["off_manifold"] = float(off_manifold(x_hat, projection).mean())
    return metrics, samples_2d.numpy()


def _name(config: ToyConfig) -> str:
    return f"{config.prediction}-pred D={config.dim} seed {config.seed}"


def train(config: ToyConfig, *, progress: bool = True) -> ToyRun:
    """Train one model for ``config.steps`` Adam steps on fresh batches; evaluate it.

    Raises:
        ToyDivergenceError: the raw loss of a step, or a sample metric, is NaN or inf (the run stops there).
    """
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
    start = time.process_time()
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        x_2d = sample_2d(config.dataset, config.batch_size, seed=data_stream)       # (B, 2)
        x = embed(x_2d.to(config.device), projection_device)                        # (B, D)
        e = torch.randn(config.batch_size, config.dim, generator=generator).to(config.device)
        r, t = sample_times(config, config.batch_size, generator=generator)
        with training_precision(config):
            terms = loss_terms(u_fn, has_aux, x, e, r.to(config.device), t.to(config.device), config.tangent,
                               p=config.adaptive_power)
            loss = terms.loss.mean()   # batch mean last (pMF)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        update_ema(ema_model, model, min(config.ema_decay, (1 + step) / (EMA_WARMUP + step)))
        losses[step] = float(terms.raw.detach().mean())
        if not math.isfinite(losses[step]):   # NaN / inf: nothing after this step means anything
            raise ToyDivergenceError(f"{_name(config)}: the raw loss is {losses[step]} at step {step + 1} of "
                                     f"{config.steps}: the run diverged (lr {config.lr:g}); lower the lr "
                                     f"(the recipe's is {ToyConfig.lr:g})")
        if step % 50 == 0:
            bar.set_postfix(raw_loss=f"{losses[step]:.3g}")
    cpu_seconds = time.process_time() - start

    metrics, samples_2d = evaluate(ema_model, config, projection)
    bad = [name for name, value in metrics.items() if not math.isfinite(value)]
    if bad:
        raise ToyDivergenceError(f"{_name(config)}: the samples' {', '.join(bad)} are NaN or inf after "
                                 f"{config.steps} steps: the run diverged (lr {config.lr:g}); lower the lr")
    tail = max(1, int(config.steps * FINAL_LOSS_FRACTION))
    record = {"prediction": config.prediction, "dim": config.dim, "dataset": config.dataset,
              "steps": config.steps, "seed": config.seed, **metrics,
              "final_loss": float(losses[-tail:].mean())}
    return ToyRun(record, samples_2d, losses, config, ema_model, projection, cpu_seconds)
