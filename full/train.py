"""Train a pMF ViT on ImageNet (or any class-folder dataset): the released-code recipe, flat.

    python -m full.train --preset pMF-B/16 --data /data/imagenet/train --batch-size 1024 --steps 400000
    torchrun --nproc_per_node=8 -m full.train --preset pMF-B/16 --data /data/imagenet/train ...
    python -m full.train --preset pMF-T/4 --data synthetic --steps 50          # CPU smoke run

setup -> model + EMAs -> data -> objective (+ DDP) -> optimiser -> loop (randomness, loss, step,
EMA, log, checkpoint). The loss of a step is :class:`full.step.TrainingStep`; every equation in
it comes from ``pmf_ref``. In-process API: ``train(TrainConfig(...), dataset)``.

Failure behaviour (a run loses nothing and never fails silently):

* a non-finite loss or gradient norm stops the run *before* the optimiser step (exit 3); the last
  checkpoint is never overwritten from a diverged state;
* SIGINT / SIGTERM finish the step, save a checkpoint and exit 128 + signal number;
* ``--out`` holding a checkpoint or log of another run is refused unless ``--resume`` continues that
  run or ``--overwrite`` deletes them; on resume ``log.jsonl`` is cut back to the checkpoint's step;
* on ``--resume`` every flag not given comes from the checkpoint; one that would change what is
  trained (preset, seed, batch, EMAs, optimiser, recipe) is refused; ``--lr`` is applied and recorded.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import random
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import pmf_ref as P

from . import cli
from .checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_NAME, LOG_NAME, CheckpointError, RunFolderError, StopOnSignal,
                         capture_rng_state, check_run_folder, keep_latest, latest_checkpoint, load_checkpoint,
                         numbered_checkpoint_name, require_keys, reset_run_folder, restore_rng_state, save_checkpoint,
                         truncate_log)
from .data import ImageFolderDataset, SyntheticDataset, UnreadableImageError, infinite_batches
from .distributed import barrier, init_distributed, mean_over_ranks, world_size_from_env
from .ema import EMASet
from .fsdp import (SHARDED_NAME, ShardedEMA, ensure_process_group, is_sharded_checkpoint, load_sharded_checkpoint,
                   read_sharded_meta, remove_sharded, remove_stale_sharded, resume_target, save_sharded_checkpoint,
                   shard_objective, use_gathered_muon, whole)
from .model import build_model
from .presets import PRESETS
from .monitor import (FID_LOG, TensorBoard, append_jsonl, broadcast_weights, default_fid_ema, in_training_fid,
                      load_or_make_grid_inputs, prepare_fid, sampling_settings, write_sample_grids)
from .optim import build_optimizer
from .perceptual import CROP_SIZE, PerceptualDistances, build_convnext_v2, build_lpips_vgg
from .step import TIME_SAMPLERS, TrainingStep
from . import fast_jvp
PERCEPTUAL_CHOICES = ("none", "lpips", "lpips+convnext")
MODEL_OVERRIDE_FIELDS = ("num_classes", "channels", "resolution", "patch", "noise_scale")
LOGGED_TERMS = ("loss", "loss_u", "loss_v", "raw_u", "raw_v", "lpips", "convnext")
SYNTHETIC_SIZE = 1024   # images in ``--data synthetic``
EXIT_USAGE, EXIT_FAILED, EXIT_DIVERGED = 2, 1, 3
RESUME_FIXED = ("preset", *MODEL_OVERRIDE_FIELDS, "batch_size", "seed", "optimizer", "prediction", "time_sampler",
                "guidance", "ema_half_lives_kimg", "perceptual", "perceptual_pretrained", "convnext_arch",
                "perceptual_crop")
"""Fields a resumed run must share with its checkpoint: they fix the weights' shapes, the data order,
the per-step randomness, the EMA set, the optimiser state or the loss."""
NOT_INHERITED = ("resume", "overwrite", "device", "num_workers")
"""Fields a CLI resume does not take from the checkpoint when absent from the command line (the machine's)."""
FLAG_OF = {"ema_half_lives_kimg": "--ema-kimg", "guidance": "--no-guidance", "accum_steps": "--accum-steps",
           "fid_ref": "--ref"}


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "pMF-B/16"
    data: str = "synthetic"                  # class-folder root, or "synthetic"
    num_classes: int | None = None           # model overrides (None: the preset's)
    channels: int | None = None
    resolution: int | None = None
    patch: int | None = None
    noise_scale: float | None = None         # s of the noise e ~ N(0, s^2 I) (None: the preset's recipe)
    batch_size: int = 1024                   # global batch over all ranks (pMF: 1024)
    accum_steps: int = 1                     # micro-batches per rank per step (gradient accumulation)
    steps: int = 400_000
    lr: float = 1e-3                         # constant, no warm-up (pMF §6)
    seed: int = 0
    optimizer: str = "muon"                  # "muon" (pMF) | "adam" (ablation)
    prediction: str = "x"                    # "x" (pMF) | "u" (ablation: output read as u)
    time_sampler: str = "full"               # "full" (pMF) | "diagonal" | "endpoint" | "two_lines"
    guidance: bool = True                    # trained-in CFG (omega, interval, label drop)
    ema_half_lives_kimg: tuple[float, ...] = (500.0, 1000.0, 2000.0)
    perceptual: str = "lpips+convnext"       # "none" | "lpips" | "lpips+convnext" (pMF)
    perceptual_pretrained: bool = True       # False: random VGG / ConvNeXt (tests only)
    convnext_arch: str = "convnextv2_base"
    convnext_weights: str | None = None      # default: <torch hub dir>/checkpoints/convnextv2_base_22k_224_ema.pt
    perceptual_crop: int = CROP_SIZE
    bf16: bool = False                       # autocast the v-head passes and perceptual nets (JVP stays fp32)
    ckpt_every: int = 5000
    log_every: int = 100
    out: str = "runs/pmf"
    resume: str | None = None
    overwrite: bool = False                  # delete an earlier run's checkpoint / log in ``out`` (else refuse)
    num_workers: int = 8
    device: str | None = None                # None: CUDA when available
    # Watching the run (full.monitor); nothing here changes what is trained.
    sample_every: int = 0                    # steps between sample grids of every EMA and the raw weights (0: none)
    sample_omega: float | None = None        # grids' and FID's sampling settings (None: the preset's best)
    sample_t_min: float | None = None
    sample_t_max: float | None = None
    fid_every: int = 0                       # steps between FID / IS evaluations of one EMA (0: none)
    fid_num: int = 5000                      # samples per evaluation (the paper's FID-50K is offline)
    fid_ref: str | None = None               # reference statistics .npz (python -m full.evaluate ref-stats)
    inception_weights: str | None = None     # default: the torch hub cache
    tensorboard: bool = False                # scalars and grids into <out>/tensorboard
    keep_last: int = 0                       # numbered checkpoints kept (checkpoint.pt links the newest); 0: only checkpoint.pt
    compile: bool = False                    # torch.compile the objective (forward, JVP and backward)
    # Sharded training (full.fsdp): FSDP2 instead of DDP; checkpoints are folders (checkpoint.dcp).
    fsdp: bool = False
    fsdp_mixed_precision: str | None = None  # None | "bf16": bf16 all-gather, fp32 reduce and compute

    def model_overrides(self) -> dict:
        return {name: getattr(self, name) for name in MODEL_OVERRIDE_FIELDS if getattr(self, name) is not None}


class TrainResult(NamedTuple):
    model: torch.nn.Module
    emas: dict                     # {"500": nn.Module, ...} (empty on ranks > 0)
    history: list                  # per-step dicts of the logged terms
    checkpoint: Path | None
    stopped_by: int = 0            # the signal (SIGINT / SIGTERM) that stopped the run early, else 0


class UsageError(ValueError):
    """A setting, file or folder the user must fix; found before training. The message names it."""


class DivergenceError(RuntimeError):
    """The loss or the gradient norm became NaN / inf; raised before the optimiser step applies it."""


def flag_of(field: str) -> str:
    """The command-line flag of a TrainConfig field (``batch_size`` -> ``--batch-size``)."""
    return FLAG_OF.get(field, "--" + field.replace("_", "-"))


def check_config(cfg: TrainConfig, world_size: int = 1) -> None:
    """Raise UsageError (a ValueError) naming the field and its allowed values for any bad setting."""
    checks = [
        (cfg.preset in PRESETS, f"preset must be one of {sorted(PRESETS)}, got {cfg.preset!r}"),
        (cfg.steps >= 1, f"steps must be >= 1, got {cfg.steps}"),
        (cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}"),
        (cfg.accum_steps >= 1, f"accum_steps must be >= 1, got {cfg.accum_steps}"),
        (cfg.batch_size % (world_size * max(cfg.accum_steps, 1)) == 0,
         f"batch_size {cfg.batch_size} must be divisible by world size x accum_steps = "
         f"{world_size} x {cfg.accum_steps}"),
        (cfg.lr > 0, f"lr must be > 0, got {cfg.lr}"),
        (cfg.optimizer in ("muon", "adam"), f"optimizer must be 'muon' or 'adam', got {cfg.optimizer!r}"),
        (cfg.prediction in ("x", "u"), f"prediction must be 'x' or 'u', got {cfg.prediction!r}"),
        (cfg.time_sampler in TIME_SAMPLERS, f"time_sampler must be one of {list(TIME_SAMPLERS)}, got {cfg.time_sampler!r}"),
        (cfg.perceptual in PERCEPTUAL_CHOICES, f"perceptual must be one of {PERCEPTUAL_CHOICES}, got {cfg.perceptual!r}"),
        (len(cfg.ema_half_lives_kimg) > 0 and all(hl > 0 for hl in cfg.ema_half_lives_kimg),
         f"ema_half_lives_kimg must be positive numbers, got {cfg.ema_half_lives_kimg}"),
        (cfg.ckpt_every >= 1 and cfg.log_every >= 1, "ckpt_every and log_every must be >= 1"),
        (min(cfg.sample_every, cfg.fid_every, cfg.keep_last) >= 0, "sample_every, fid_every and keep_last must be >= 0"),
        (cfg.fid_every == 0 or cfg.fid_ref is not None, "fid_every needs fid_ref (--ref STATS.npz)"),
        (cfg.fid_every == 0 or cfg.fid_num >= 2, f"fid_num must be >= 2, got {cfg.fid_num}"),
        (cfg.fsdp_mixed_precision in (None, "bf16"),
         f"fsdp_mixed_precision must be None or 'bf16', got {cfg.fsdp_mixed_precision!r}"),
        (cfg.fsdp or cfg.fsdp_mixed_precision is None, "fsdp_mixed_precision needs fsdp (--fsdp)"),
        # Not yet with sharding: the grids, FID and --keep-last read whole EMAs or single-file checkpoints.
        (not cfg.fsdp or not (cfg.sample_every or cfg.fid_every or cfg.keep_last or cfg.compile),
         "fsdp does not combine with sample_every, fid_every, keep_last or compile yet"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    omega, t_min, t_max = sampling_settings(cfg.preset, guidance=cfg.guidance, omega=cfg.sample_omega,
                                            t_min=cfg.sample_t_min, t_max=cfg.sample_t_max)
    if not (omega >= 1 and 0 <= t_min <= t_max <= 1):
        raise UsageError(f"sampling settings need omega >= 1 and 0 <= t_min <= t_max <= 1, got omega {omega}, "
                         f"interval [{t_min}, {t_max}]")


def check_resume(cfg: TrainConfig, saved: dict, step: int) -> None:
    """UsageError unless ``cfg`` may continue a checkpoint at ``step`` trained with the settings ``saved``."""
    for name in RESUME_FIXED:
        if name not in saved:
            continue
        ours, theirs = getattr(cfg, name), saved[name]
        if name == "ema_half_lives_kimg":
            ours, theirs = tuple(map(float, ours)), tuple(map(float, theirs))
        if ours != theirs:
            raise UsageError(f"--resume: the checkpoint was trained with {name}={theirs!r} but this run asks for "
                             f"{ours!r}; {flag_of(name)} cannot change on resume (start a new run in another --out)")
    if cfg.steps <= step:
        raise UsageError(f"--steps {cfg.steps} is not beyond the checkpoint's step {step}: nothing to train "
                         f"(pass a larger --steps)")


def open_dataset(cfg: TrainConfig, resolution: int, channels: int, num_classes: int):
    if cfg.data == "synthetic":
        return SyntheticDataset(SYNTHETIC_SIZE, resolution, channels=channels, num_classes=num_classes, seed=cfg.seed)
    return ImageFolderDataset(cfg.data, resolution, channels)


def build_perceptual(cfg: TrainConfig) -> PerceptualDistances | None:
    if cfg.perceptual == "none":
        return None
    lpips_net = build_lpips_vgg(pretrained_backbone=cfg.perceptual_pretrained)
    convnext = (build_convnext_v2(arch=cfg.convnext_arch, weights=cfg.convnext_weights,
                                  pretrained=cfg.perceptual_pretrained)
                if cfg.perceptual == "lpips+convnext" else None)
    return PerceptualDistances(lpips_net, convnext, crop_size=cfg.perceptual_crop)


def train(cfg: TrainConfig, dataset=None, progress: bool = True) -> TrainResult:
    """Train (or resume) a PMFViT; returns the model, its EMAs, the per-step history and the last checkpoint."""
    dist_info = init_distributed(cfg.device)
    rank, world_size, device = dist_info.rank, dist_info.world_size, dist_info.device
    if cfg.fsdp:   # FSDP needs a process group, of one process too
        ensure_process_group(device)
    check_config(cfg, world_size)
    if cfg.resume is not None and Path(cfg.resume).is_dir():   # a run folder: its newest readable checkpoint
        cfg = dataclasses.replace(cfg, resume=str(resume_target(cfg.resume, latest_checkpoint)))
    if cfg.resume is not None and not cfg.fsdp and is_sharded_checkpoint(cfg.resume):
        raise UsageError(f"--resume {cfg.resume!r} is a sharded checkpoint: pass --fsdp, or write one file with "
                         f"python -m full.fsdp export {cfg.resume} --out DIR (DIR/checkpoint.pt)")
    # A sharded checkpoint in ``out`` continues in place (the folder checks know only checkpoint.pt).
    sharded_in_place = (cfg.fsdp and cfg.resume is not None
                        and Path(cfg.resume).parent.resolve() == Path(cfg.out).resolve())
    check_run_folder(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite or sharded_in_place,
                     check_writable=rank == 0)
    state = None
    if cfg.resume:   # read and checked before anything is built: a wrong flag fails in seconds
        # load_state_dict copies to the device; a sharded checkpoint's tensors are read after sharding.
        state = read_sharded_meta(cfg.resume) if cfg.fsdp else load_checkpoint(cfg.resume, map_location="cpu")
        require_keys(state, cfg.resume, ("step", "images_seen", "rng", "data") if cfg.fsdp else
                     ("ema", "optimizer", "step", "images_seen", "rng", "data"), "resume")
        require_keys(state["config"], cfg.resume, ("train",), "resume")
        check_resume(cfg, state["config"]["train"], state["step"])
    try:   # the Inception weights and reference statistics now: a missing file fails at start, not at step N
        fid_reference = prepare_fid(cfg.fid_ref, cfg.inception_weights, device) if cfg.fid_every else None
    except ValueError as error:
        raise UsageError(f"--ref: {error}") from None
    local_batch = cfg.batch_size // world_size
    micro_batch = local_batch // cfg.accum_steps
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)                       # same initial weights on every rank

    # ---- model, EMAs
    model = build_model(cfg.preset, **cfg.model_overrides(), prediction=cfg.prediction).to(device)
    emas = EMASet(model, cfg.ema_half_lives_kimg) if rank == 0 and not cfg.fsdp else None   # --fsdp: after sharding

    # ---- data
    dataset = dataset if dataset is not None else open_dataset(cfg, model.resolution, model.channels,
                                                               model.num_classes)
    if getattr(dataset, "num_classes", 0) > model.num_classes:
        raise UsageError(f"the data has {dataset.num_classes} classes but the model only {model.num_classes}; "
                         f"pass --num-classes {dataset.num_classes}")
    if cfg.perceptual != "none" and model.channels != 3:
        raise UsageError(f"perceptual={cfg.perceptual!r} needs RGB images (LPIPS / ConvNeXt), got "
                         f"{model.channels} channel(s); use perceptual='none'")
    if len(dataset) < cfg.batch_size:   # the sampler drops incomplete batches: it would never yield one
        raise UsageError(f"--data holds {len(dataset)} images, fewer than one global batch (--batch-size "
                         f"{cfg.batch_size}); lower --batch-size")
    image_shape = (model.channels, model.resolution, model.resolution)

    # ---- the training step, built from the preset (the ablations are its overrides)
    objective = TrainingStep.from_preset(
        model, cfg.preset, perceptual=build_perceptual(cfg), autocast_dtype=torch.bfloat16 if cfg.bf16 else None,
        time_sampler=cfg.time_sampler, guidance=cfg.guidance).to(device)
    # DDP wraps the whole objective: the JVP runs inside DDP.forward, so gradients are all-reduced.
    # --fsdp: FSDP2 per block, rooted at the objective for the same reason (full.fsdp); EMAs sharded alike.
    step_objective = (shard_objective(objective, mixed_precision=cfg.fsdp_mixed_precision) if cfg.fsdp else
                      DistributedDataParallel(objective, device_ids=[device.index] if device.type == "cuda" else None)
                      if world_size > 1 else objective)
    if cfg.fsdp:
        emas = ShardedEMA(model, cfg.ema_half_lives_kimg)
    if cfg.compile:   # Dynamo + AOTAutograd: forward, JVP and backward; the first step pays the compilation
        step_objective = torch.compile(step_objective)

    # ---- optimiser, state
    optimizer = build_optimizer(model, kind=cfg.optimizer, lr=cfg.lr)
    if cfg.fsdp:   # Newton-Schulz on whole matrices, bit-identical to the unsharded update
        use_gathered_muon(optimizer)
    step_generator = torch.Generator(device).manual_seed(cfg.seed)   # per-step randomness, global batch
    step, images_seen, epoch, batch_in_epoch = 0, 0, 0, 0
    lr_history = [[0, cfg.lr]]                    # [first step, lr]: what every step was trained with
    if state is not None:
        try:
            if cfg.fsdp:   # every rank reads its shards, resharded to this run's process count
                load_sharded_checkpoint(cfg.resume, model=model, optimizer=optimizer, emas=emas)
            else:
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
            if emas is not None and not cfg.fsdp:
                emas.load_state_dict(state["ema"])
        except (RuntimeError, ValueError, KeyError) as error:
            raise CheckpointError(f"{cfg.resume!r}: its weights or optimiser state do not fit this run: "
                                  f"{str(error).strip().splitlines()[0]}") from None
        step, images_seen = state["step"], state["images_seen"]
        epoch, batch_in_epoch = state["data"]["epoch"], state["data"]["batch"]
        restore_rng_state(state["rng"], step_generator)
        lr_history = [list(entry) for entry in state.get("lr_history", [[0, state["config"]["train"]["lr"]]])]
        if lr_history[-1][1] != cfg.lr:   # load_state_dict restored the old lr: apply the one asked for
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr
            lr_history.append([step, cfg.lr])
            if rank == 0:
                print(f"--lr {cfg.lr:g} applied from step {step} (was {lr_history[-2][1]:g})", file=sys.stderr)
        del state
    batches = infinite_batches(dataset, cfg.batch_size, rank=rank, world_size=world_size, seed=cfg.seed,
                               epoch=epoch, start_batch=batch_in_epoch,
                               num_workers=cfg.num_workers if device.type == "cuda" else 0)

    out = Path(cfg.out)
    if rank == 0:
        reset_run_folder(cfg.out, resume=cfg.resume, overwrite=cfg.overwrite, resumed_step=step)
        if cfg.fsdp:
            remove_stale_sharded(out / SHARDED_NAME)
            if sharded_in_place:
                truncate_log(out / LOG_NAME, step)
            elif cfg.overwrite:
                remove_sharded(out / SHARDED_NAME)
    barrier()
    log_path, checkpoint_path = out / LOG_NAME, None
    # ---- watching: grids (rank 0), FID (every rank samples with rank 0's EMA), TensorBoard (rank 0)
    omega, t_min, t_max = sampling_settings(cfg.preset, guidance=cfg.guidance, omega=cfg.sample_omega,
                                            t_min=cfg.sample_t_min, t_max=cfg.sample_t_max)
    try:
        grid_inputs = (load_or_make_grid_inputs(out, model.num_classes, image_shape, seed=cfg.seed,
                                                noise_scale=model.noise_scale)
                       if cfg.sample_every and rank == 0 else None)
    except ValueError as error:
        raise UsageError(f"--sample-every: {error}") from None
    fid_ema = default_fid_ema(cfg.preset, cfg.ema_half_lives_kimg)
    fid_network = ((emas.models[fid_ema] if rank == 0 else copy.deepcopy(model).eval().requires_grad_(False))
                   if cfg.fid_every else None)
    board = TensorBoard(out, purge_step=step + 1 if cfg.resume else None) if cfg.tensorboard and rank == 0 else None
    last_saved = f"{cfg.resume} (step {step})" if cfg.resume else "none yet"
    history, stopped_by = [], 0
    if rank == 0 and progress:   # which of pmf_ref.average_velocity_jvp's routes the JVP takes
        print(f"jvp: {fast_jvp.ENGINE_DESCRIPTIONS['forward_ad']}", file=sys.stderr)
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress or rank != 0, desc="pMF", dynamic_ncols=True)
    tick = time.perf_counter()
    objective.train()
    with StopOnSignal(announce=rank == 0) as stop, bar:
        while step < cfg.steps:
            epoch, batch_in_epoch, (x, y) = next(batches)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            randomness = objective.draw_randomness(x, generator=step_generator, batch_size=cfg.batch_size)

            optimizer.zero_grad(set_to_none=True)
            micro_means = []
            for micro in range(cfg.accum_steps):     # rows [first, first + micro_batch) of the global batch
                first = rank * local_batch + micro * micro_batch
                rows = slice(micro * micro_batch, (micro + 1) * micro_batch)
                last = micro == cfg.accum_steps - 1
                # DDP all-reduces gradients in the backward of the last micro-batch only.
                # FSDP reduce-scatters after every micro-batch (unsharded gradients would cost the memory it saves).
                with contextlib.nullcontext() if last or world_size == 1 or cfg.fsdp else step_objective.no_sync():
                    terms = step_objective(x[rows], y[rows], randomness.rows(first, first + micro_batch))
                    (terms["loss"] / cfg.accum_steps).backward()
                micro_means.append(torch.stack([terms[name].detach().mean() for name in LOGGED_TERMS]))
            grad_norm = whole(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))
            # One all-reduce carries the logged terms, the gradient norm and "a rank was signalled", so
            # every rank takes the same decision below (stop, or refuse a non-finite step).
            logged = torch.cat([torch.stack(micro_means).mean(dim=0), grad_norm.detach().reshape(1),
                                torch.tensor([float(stop.signum > 0)], device=grad_norm.device)])
            logged = mean_over_ranks(logged).tolist()
            stop_requested = logged.pop() > 0
            if not all(math.isfinite(value) for value in logged):
                # Numerical guard: the weights, EMAs and checkpoint still hold the last good step.
                terms_text = ", ".join(f"{name} {value:.4g}" for name, value in
                                       zip((*LOGGED_TERMS, "grad_norm"), logged) if not math.isfinite(value))
                raise DivergenceError(f"step {step + 1} is non-finite ({terms_text}): training diverged and was "
                                      f"stopped before the optimiser step, so nothing was saved from it; last "
                                      f"checkpoint: {last_saved} -- resume from it with a lower --lr")
            optimizer.step()
            if emas is not None:
                emas.update(model, batch=cfg.batch_size, images_seen=images_seen)
            images_seen += cfg.batch_size
            step += 1
            batch_in_epoch += 1                      # position of the next batch (for resume)

            now = time.perf_counter()
            record = {"step": step, "images_seen": images_seen, **dict(zip(LOGGED_TERMS, logged[:-1])),
                      "grad_norm": logged[-1], "images_per_s": cfg.batch_size / max(now - tick, 1e-9)}
            tick = now
            history.append(record)
            bar.update(1)
            if cfg.fid_every and (step % cfg.fid_every == 0 or step == cfg.steps) and not stop_requested:
                metrics = in_training_fid(broadcast_weights(fid_network), fid_reference, num=cfg.fid_num, omega=omega,
                                          t_min=t_min, t_max=t_max, seed=cfg.seed, rank=rank, world_size=world_size)
                if rank == 0:
                    append_jsonl(out / FID_LOG, {"step": step, "images_seen": images_seen, "ema": fid_ema,
                                                 "omega": omega, "t_min": t_min, "t_max": t_max, **metrics})
                    record.update(fid=metrics["fid"], is_mean=metrics["is_mean"])
            if rank == 0 and (step % cfg.log_every == 0 or step == cfg.steps or stop_requested or "fid" in record):
                # The adaptively weighted terms sit near 1 by construction; the raw sums show progress.
                bar.set_postfix(raw_u=f"{record['raw_u']:.1f}", raw_v=f"{record['raw_v']:.1f}",
                                img_s=f"{record['images_per_s']:.0f}")
                with open(log_path, "a") as log_file:
                    log_file.write(json.dumps(record) + "\n")
                if board is not None:
                    board.scalars("train", {**record, "lr": optimizer.param_groups[0]["lr"]}, step)
            if grid_inputs is not None and (step % cfg.sample_every == 0 or step == cfg.steps):
                tiles = write_sample_grids(out, step, {**emas.models, "raw": model}, grid_inputs, omega=omega,
                                           t_min=t_min, t_max=t_max)
                for name, tile in tiles.items() if board is not None else ():
                    board.image(f"samples/{name if name == 'raw' else 'ema' + name}", tile, step)
            if step % cfg.ckpt_every == 0 or step == cfg.steps or stop_requested:
                checkpoint_path = out / (numbered_checkpoint_name(step) if cfg.keep_last else CHECKPOINT_NAME)
                meta = {"format": CHECKPOINT_FORMAT, "step": step, "images_seen": images_seen,
                        "rng": capture_rng_state(step_generator), "data": {"epoch": epoch, "batch": batch_in_epoch},
                        "lr_history": lr_history,
                        "config": {"model": {"preset": cfg.preset, **cfg.model_overrides(), "prediction": cfg.prediction},
                                   "noise_scale": model.noise_scale, "num_classes": model.num_classes,
                                   "resolution": model.resolution, "train": dataclasses.asdict(cfg),
                                   "jvp": "forward_ad"}}
                if cfg.fsdp:   # every rank writes its shards; the link checkpoint.dcp moves when all are written
                    checkpoint_path = out / SHARDED_NAME
                    save_sharded_checkpoint(checkpoint_path, model=model, optimizer=optimizer, emas=emas, meta=meta)
                elif rank == 0:
                    save_checkpoint(checkpoint_path, {**meta, "model": model.state_dict(), "ema": emas.state_dict(),
                                                      "optimizer": optimizer.state_dict()})
                    if cfg.keep_last:   # checkpoint.pt -> the newest; only the keep_last newest numbered ones stay
                        keep_latest(out, checkpoint_path, keep_last=cfg.keep_last)
                last_saved = f"{checkpoint_path} (step {step})"
            if stop_requested:
                stopped_by = stop.signum or signal.SIGTERM   # another rank's signal: name the usual one
                barrier()                                    # the checkpoint is complete before any rank exits
                break
    if board is not None:
        board.close()
    return TrainResult(model, dict(emas.models) if isinstance(emas, EMASet) else {}, history, checkpoint_path,
                       stopped_by)


# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser("python -m full.train", __doc__.split("\n\n")[0])
    parser.add_argument("--preset", default=TrainConfig.preset, help=f"model preset, one of {' '.join(sorted(PRESETS))}")
    parser.add_argument("--data", default=None,
                        help="ImageNet-style folder root/<class>/<image> (ADM center crop, no flip), or 'synthetic' "
                             "(required unless --resume)")
    parser.add_argument("--batch-size", type=int, default=TrainConfig.batch_size, help="global batch over all processes (pMF: 1024)")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps, help="optimiser steps (320 epochs of ImageNet at 1024 = 400k)")
    parser.add_argument("--accum-steps", type=int, default=TrainConfig.accum_steps,
                        help="micro-batches per process per step (gradient accumulation; same global batch)")
    parser.add_argument("--lr", type=float, default=TrainConfig.lr, help="constant learning rate of Muon and Adam (pMF: 1e-3)")
    parser.add_argument("--seed", type=int, default=TrainConfig.seed, help="seed of weights, data order and per-step randomness")
    parser.add_argument("--optimizer", choices=("muon", "adam"), default=TrainConfig.optimizer,
                        help="muon: Muon for Linear weights + Nesterov Adam for the rest; adam: Nesterov Adam for all")
    parser.add_argument("--prediction", choices=("x", "u"), default=TrainConfig.prediction,
                        help="x: the network outputs x_hat (pMF); u: its output is read as u (ablation)")
    parser.add_argument("--time-sampler", choices=tuple(TIME_SAMPLERS), default=TrainConfig.time_sampler,
                        help="(r, t) sampler: full plane (pMF) or the paper's ablations")
    parser.add_argument("--no-guidance", action="store_true",
                        help="train without CFG: omega = 1, no interval, no label drop")
    parser.add_argument("--ema-kimg", type=float, nargs="+", default=list(TrainConfig.ema_half_lives_kimg),
                        metavar="KIMG", help="EMA half-lives in kimg")
    parser.add_argument("--perceptual", choices=PERCEPTUAL_CHOICES, default=TrainConfig.perceptual,
                        help="perceptual terms on x_hat for rows with t < t_thr")
    parser.add_argument("--convnext-weights", default=None,
                        help="local ConvNeXt-V2-Base checkpoint (default: <torch hub dir>/checkpoints/"
                             "convnextv2_base_22k_224_ema.pt)")
    parser.add_argument("--num-classes", type=int, default=None, help="override the preset's 1000 classes")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for the v-head and perceptual passes "
                                                             "(the JVP stays fp32)")
    parser.add_argument("--ckpt-every", type=int, default=TrainConfig.ckpt_every, help="steps between (atomic) checkpoints")
    parser.add_argument("--log-every", type=int, default=TrainConfig.log_every, help="steps between JSONL log lines")
    cli.add_out(parser, TrainConfig.out, "checkpoint.pt and log.jsonl (and what the watch flags write)")
    parser.add_argument("--resume", default=None,
                        help="checkpoint to continue from, exactly (weights, EMAs, optimiser, RNG, data position) "
                             "up to --steps in total; flags not given come from the checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a new run in an --out that holds an earlier run's checkpoint.pt / log.jsonl "
                             "(deletes them; default: refuse)")
    parser.add_argument("--num-workers", type=int, default=TrainConfig.num_workers, help="data-loading processes per GPU")
    cli.add_device(parser)
    parser.add_argument("--fsdp", action="store_true",
                        help="shard weights, gradients, optimiser state and EMAs over the processes (FSDP2; for "
                             "pMF-H); checkpoints become folders <out>/checkpoint.dcp, resumable on any number of "
                             "processes; python -m full.fsdp export writes the single file full.sample reads")
    parser.add_argument("--fsdp-mixed-precision", choices=("bf16",), default=None,
                        help="with --fsdp: all-gather the weights in bf16 (half the traffic), reduce gradients in "
                             "fp32; every forward, the JVP included, still computes in fp32")
    watch = parser.add_argument_group("watching the run (full.monitor; none of these changes what is trained)")
    watch.add_argument("--sample-every", type=int, default=0, metavar="N",
                       help="steps between sample grids (fixed noise and classes) of every EMA and the raw "
                            "weights, written as <out>/samples/step<N>-ema<K>.png; 0: none")
    watch.add_argument("--sample-omega", type=float, default=None, metavar="OMEGA",
                       help="omega of the grids and the FID (default: the preset's best; 1 without guidance)")
    watch.add_argument("--sample-t-min", type=float, default=None, metavar="T", help="guidance interval start (default: the preset's)")
    watch.add_argument("--sample-t-max", type=float, default=None, metavar="T", help="guidance interval end (default: the preset's)")
    watch.add_argument("--fid-every", type=int, default=0, metavar="N",
                       help="steps between FID / IS of the preset's sampling EMA (all processes sample), appended "
                            "to log.jsonl and <out>/fid.jsonl; needs --ref; 0: none")
    watch.add_argument("--fid-num", type=int, default=TrainConfig.fid_num, metavar="K", help="samples per FID evaluation")
    watch.add_argument("--ref", dest="fid_ref", default=None, metavar="STATS.npz",
                       help="reference statistics .npz for --fid-every (python -m full.evaluate ref-stats)")
    watch.add_argument("--inception-weights", default=None, metavar="PATH",
                       help="torch-fidelity's Inception weights for --fid-every (default: the torch hub cache)")
    watch.add_argument("--tensorboard", action="store_true",
                       help="write every logged value, lr and the grids to <out>/tensorboard")
    watch.add_argument("--keep-last", type=int, default=0, metavar="K",
                       help="keep the K newest numbered checkpoints checkpoint-<step>.pt (checkpoint.pt links the "
                            "newest; --resume <out> picks it); 0: one checkpoint.pt")
    watch.add_argument("--compile", action="store_true",
                       help="torch.compile the training step (on CPU it paid off after ~1,000 steps; "
                            "measure yours with python -m full.bench.compile)")
    return parser


def explicit_dests(argv: list[str]) -> set[str]:
    """The argparse destinations actually given on the command line (not filled in by defaults)."""
    probe = build_parser()
    for action in probe._actions:
        action.default, action.required = argparse.SUPPRESS, False
    return set(vars(probe.parse_known_args(argv)[0]))


DEST_OF = {"no_guidance": "guidance", "ema_kimg": "ema_half_lives_kimg"}
"""argparse destination -> TrainConfig field, where the names differ."""


def fail(message: str, code: int) -> None:
    print(f"python -m full.train: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)

    if args.preset not in PRESETS:
        parser.error(f"--preset: unknown preset {args.preset!r}; choose one of {sorted(PRESETS)}")
    for flag, value, minimum in (("--steps", args.steps, 1), ("--batch-size", args.batch_size, 1),
                                 ("--ckpt-every", args.ckpt_every, 1), ("--log-every", args.log_every, 1),
                                 ("--num-workers", args.num_workers, 0), ("--sample-every", args.sample_every, 0),
                                 ("--fid-every", args.fid_every, 0), ("--fid-num", args.fid_num, 2),
                                 ("--keep-last", args.keep_last, 0)):
        if value < minimum:
            parser.error(f"{flag} must be >= {minimum}, got {value}")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    world_size = world_size_from_env()
    if args.accum_steps < 1:
        parser.error(f"--accum-steps must be >= 1, got {args.accum_steps}")
    if args.resume is None and args.batch_size % (world_size * args.accum_steps):   # resume: after inheriting
        parser.error(f"--batch-size {args.batch_size} must be divisible by the number of processes ({world_size}) "
                     f"x --accum-steps ({args.accum_steps})")
    if args.data is None and args.resume is None:
        parser.error("--data is required (a class-folder root or 'synthetic'), unless --resume")
    if args.data is not None and args.data != "synthetic" and not Path(args.data).is_dir():
        parser.error(f"--data: folder {args.data!r} does not exist (expected root/<class>/<image>, or 'synthetic')")
    if args.fid_every and args.fid_ref is None:
        parser.error("--fid-every needs --ref STATS.npz (make one with python -m full.evaluate ref-stats)")
    for flag, path in (("--ref", args.fid_ref), ("--inception-weights", args.inception_weights)):
        if path is not None and not Path(path).is_file():
            parser.error(f"{flag}: {path!r} is not a file")
    if args.sample_omega is not None and not args.sample_omega >= 1:
        parser.error(f"--sample-omega must be >= 1, got {args.sample_omega}")
    for flag, value in (("--sample-t-min", args.sample_t_min), ("--sample-t-max", args.sample_t_max)):
        if value is not None and not 0 <= value <= 1:
            parser.error(f"{flag} must lie in [0, 1], got {value}")
    if args.resume is not None and Path(args.resume).is_dir():   # a run folder: its newest readable checkpoint
        try:
            args.resume = str(resume_target(args.resume, latest_checkpoint))
        except CheckpointError as error:
            parser.error(f"--resume: {error}")
    if args.resume is not None and not Path(args.resume).is_file() and not is_sharded_checkpoint(args.resume):
        parser.error(f"--resume: checkpoint {args.resume!r} does not exist")
    half_lives = tuple(args.ema_kimg)
    if not all(math.isfinite(hl) and hl > 0 for hl in half_lives):
        parser.error(f"--ema-kimg: each half-life must be a number > 0, got {' '.join(map(str, args.ema_kimg))}")
    cli.resolve_device(parser, args.device)

    cfg = TrainConfig(preset=args.preset, data=args.data, num_classes=args.num_classes,
                      batch_size=args.batch_size, accum_steps=args.accum_steps, steps=args.steps, lr=args.lr,
                      seed=args.seed,
                      optimizer=args.optimizer, prediction=args.prediction, time_sampler=args.time_sampler,
                      guidance=not args.no_guidance, ema_half_lives_kimg=half_lives, perceptual=args.perceptual,
                      convnext_weights=args.convnext_weights, bf16=args.bf16, ckpt_every=args.ckpt_every,
                      log_every=args.log_every, out=args.out, resume=args.resume, overwrite=args.overwrite,
                      num_workers=args.num_workers, device=None if args.device == "auto" else args.device, sample_every=args.sample_every,
                      sample_omega=args.sample_omega, sample_t_min=args.sample_t_min, sample_t_max=args.sample_t_max,
                      fid_every=args.fid_every, fid_num=args.fid_num, fid_ref=args.fid_ref,
                      inception_weights=args.inception_weights, tensorboard=args.tensorboard,
                      keep_last=args.keep_last, compile=args.compile, fsdp=args.fsdp,
                      fsdp_mixed_precision=args.fsdp_mixed_precision)
    if args.resume is not None:   # what the command line does not say comes from the checkpoint
        try:
            saved = (read_sharded_meta(args.resume) if is_sharded_checkpoint(args.resume)
                     else load_checkpoint(args.resume, mmap=True))
            require_keys(saved["config"], args.resume, ("train",), "resume")
        except CheckpointError as error:
            fail(f"--resume: {error}", EXIT_USAGE)
        given = {DEST_OF.get(dest, dest) for dest in explicit_dests(argv)}
        inherited = {name: saved["config"]["train"][name] for name in saved["config"]["train"]
                     if name in TrainConfig.__dataclass_fields__ and name not in given and name not in NOT_INHERITED}
        if "ema_half_lives_kimg" in inherited:
            inherited["ema_half_lives_kimg"] = tuple(inherited["ema_half_lives_kimg"])
        cfg = dataclasses.replace(cfg, **inherited)
        del saved
    try:
        result = train(cfg)
    except CheckpointError as error:
        fail(f"--resume: {error}", EXIT_USAGE)
    except (UsageError, RunFolderError, UnreadableImageError, FileNotFoundError) as error:
        fail(str(error), EXIT_USAGE)        # a setting, file or folder to fix: one line, nothing trained
    except DivergenceError as error:
        fail(str(error), EXIT_DIVERGED)
    except OSError as error:                # a full disk, a vanished file system: the last checkpoint is kept
        fail(str(error), EXIT_FAILED)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if result.stopped_by:
        name = signal.Signals(result.stopped_by).name
        print(f"stopped by {name} at step {result.history[-1]['step'] if result.history else '?'}; checkpoint "
              f"{result.checkpoint}; continue with --resume {result.checkpoint}", file=sys.stderr)
        raise SystemExit(128 + result.stopped_by)


if __name__ == "__main__":
    main()
