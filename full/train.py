"""Train a pMF ViT on ImageNet (or any class-folder dataset): the released-code recipe, flat.

    python -m full.train --preset pMF-B/16 --data /data/imagenet/train --batch-size 1024 --steps 400000
    torchrun --nproc_per_node=8 -m full.train --preset pMF-B/16 --data /data/imagenet/train ...
    python -m full.train --preset pMF-T/4 --data synthetic --steps 50 --resume auto   # start, or continue

``train()`` reads top to bottom: set-up (settings, processes, run folder, model, step, EMAs, optimiser,
resume), the loop (randomness, loss, check point, checkpoint, step, EMA, watch, log), the end. The loss of a
step is :class:`full.step.TrainingStep`, built from the preset; every equation in it comes from ``pmf_ref``. Settings and their
checks: :mod:`full.config`; the log, the lock, the guard and the monitor: :mod:`full.runlog`. In-process
API: ``train(TrainConfig(...), dataset)``.

Failure behaviour (a run loses nothing and never fails silently):

* the divergence guard (:class:`full.runlog.DivergenceGuard`) stops the run (exit 3) at a step whose loss
  terms or gradient norm are NaN / inf, or whose raw loss explodes (> 100x the run's recent median); a
  checkpoint is written only once the next step's loss has passed the guard, so a diverged state is never
  saved and the checkpoint the error names is a good one;
* no step waits for the device: a step's logged terms stay there, and only at a *check point* (a log step,
  the last step, a stop, a step whose loss clears a pending checkpoint) is the window read to the host, in
  one transfer, and judged by the guard step by step. A diverged step between check points may therefore
  already be applied to the weights in memory when the run stops -- harmless, since nothing of it is saved;
* SIGINT / SIGTERM finish the step, save a checkpoint and exit 128 + signal number (ranks agree on the stop
  through a CPU all-reduce, :func:`full.distributed.any_rank`); signals during the checkpoint write wait
  for it to finish;
* ``--out`` is locked while a run uses it; holding a checkpoint or log of another run it is refused unless
  ``--resume`` continues that run or ``--overwrite`` deletes them; on resume ``log.jsonl`` is cut back to
  the checkpoint's step;
* on ``--resume`` every flag not given comes from the checkpoint; one that would change what is trained
  (preset, seed, batch, EMAs, optimiser, recipe) is refused; ``--lr`` is applied and recorded.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import random
import signal
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from .checkpoint import (CHECKPOINT_FORMAT, LOG_NAME, CheckpointError, RunFolderError, StopOnSignal, capture_rng_state,
                         check_run_folder, continues_in_place, portable_settings, read_run_checkpoint,
                         reset_run_folder, resolve_resume, restore_run, save_run_checkpoint, truncate_log)
from .config import TrainConfig, UsageError, check_config, check_resume, config_from_argv
from .data import ImageFolderDataset, SyntheticDataset, UnreadableImageError, infinite_batches
from .distributed import any_rank, barrier, init_distributed, mean_over_ranks, parallelize, world_size_from_env
from .ema import EMASet
from .finetune import InitFromOfficialError, init_from_official
from .fsdp import SHARDED_NAME, ShardedEMA, ensure_process_group, remove_sharded, remove_stale_sharded, \
    use_gathered_muon, whole
from .model import build_model
from .monitor import prepare_fid
from .optim import build_optimizer
from .precision import apply_precision, default_precision
from .perceptual import PerceptualDistances, build_convnext_v2, build_lpips_vgg
from .presets import ARCHITECTURES
from .step import TrainingStep
from .runlog import (DivergenceError, DivergenceGuard, LogWriteError, RunFolderLocked, RunLock, RunLog, RunMonitor,
                     changed_settings_note, read_config, say, summary, summary_rows, write_config)

__all__ = ["TrainConfig", "TrainResult", "UsageError", "DivergenceError", "train", "main"]
LOGGED_TERMS = ("loss", "loss_u", "loss_v", "raw_u", "raw_v", "lpips", "convnext")
SYNTHETIC_SIZE = 1024   # images in ``--data synthetic``
EXIT_USAGE, EXIT_FAILED, EXIT_DIVERGED, EXIT_INTERRUPTED = 2, 1, 3, 130


class TrainResult(NamedTuple):
    model: torch.nn.Module
    emas: dict                     # {"500": nn.Module, ...} (empty on ranks > 0 and with --fsdp)
    history: list                  # per-step dicts of the logged terms
    checkpoint: Path | None
    stopped_by: int = 0            # the signal (SIGINT / SIGTERM) that stopped the run early, else 0


def train(cfg: TrainConfig, dataset=None, progress: bool = True) -> TrainResult:
    """Train (or resume) a PMFViT; returns the model, its EMAs, the per-step history and the last checkpoint."""
    # ---- set-up: settings (checked before anything starts), processes, run folder
    cfg, dataset, state = settle(cfg, dataset, world_size_from_env())
    rank, world_size, _, device = init_distributed(cfg.device)
    cfg = dataclasses.replace(cfg, precision=cfg.precision or default_precision(device))
    apply_precision(cfg.precision, device)            # the TF32 switches (full.precision)
    if cfg.fsdp:   # FSDP needs a process group, of one process too
        ensure_process_group(device)
    out = Path(cfg.out)
    with RunLock(out, enabled=rank == 0):
        in_place = continues_in_place(out, cfg.resume) or (cfg.fsdp and cfg.resume is not None and
                                                           Path(cfg.resume).parent.resolve() == out.resolve())
        check_run_folder(out, resume=cfg.resume, overwrite=cfg.overwrite or in_place, check_writable=rank == 0)
        try:   # the Inception weights and reference statistics now: a bad file fails at start, not at step N
            resolution = cfg.resolution or getattr(ARCHITECTURES.get(cfg.preset), "resolution", None)
            fid_reference = (prepare_fid(cfg.fid_ref, cfg.inception_weights, device, resolution=resolution)
                             if cfg.fid_every else None)
        except ValueError as error:
            raise UsageError(f"--ref: {error}") from None
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)                       # same initial weights on every rank

        # ---- model, training step (+ DDP / FSDP / compile), EMAs, optimiser
        model = build_model(cfg.preset, **cfg.model_overrides(), prediction=cfg.prediction,
                            activation_checkpointing=cfg.activation_checkpointing).to(device)
        if cfg.init_official and state is None:   # fine-tuning: before the EMAs, the optimiser and the wrapping
            init_from_official(model, cfg.init_official, num_classes=model.num_classes)
        objective = build_step(cfg, model, device)
        step_fn = parallelize(objective, world_size=world_size, device=device, fsdp=cfg.fsdp,
                              fsdp_mixed_precision=cfg.fsdp_mixed_precision, compile=cfg.compile)
        emas = (ShardedEMA(model, cfg.ema_half_lives_kimg) if cfg.fsdp else     # after sharding: shards alike
                EMASet(model, cfg.ema_half_lives_kimg) if rank == 0 else None)
        optimizer = build_optimizer(model, kind=cfg.optimizer, lr=cfg.lr)
        if cfg.fsdp:   # Newton-Schulz on whole matrices, bit-identical to the unsharded update
            use_gathered_muon(optimizer)
        generator = torch.Generator(device).manual_seed(cfg.seed)   # per-step randomness of the global batch
        step, images_seen, epoch, batch_in_epoch, lr_history = 0, 0, 0, 0, [[0, cfg.lr]]
        if state is not None:
            restore_run(cfg.resume, state, model=model, optimizer=optimizer, emas=emas, sharded=cfg.fsdp,
                        generator=generator)
            step, images_seen, epoch, batch_in_epoch = (state["step"], state["images_seen"], state["data"]["epoch"],
                                                        state["data"]["batch"])
            lr_history = apply_lr(optimizer, state, cfg.lr, announce=rank == 0)
        batches = infinite_batches(dataset, cfg.batch_size, rank=rank, world_size=world_size, seed=cfg.seed,
                                   epoch=epoch, start_batch=batch_in_epoch,
                                   num_workers=cfg.num_workers if device.type == "cuda" else 0)
        if rank == 0:
            prepare_run_folder(cfg, out, step, images_seen, in_place)
            say(summary(summary_rows(cfg, model, dataset, world_size, step)))
        barrier()
        log = RunLog(out / LOG_NAME, device=device, total_steps=cfg.steps, start_step=step, batch_size=cfg.batch_size,
                     progress=progress, enabled=rank == 0, terms=(*LOGGED_TERMS, "grad_norm"))
        monitor = RunMonitor(cfg, out, model, emas, rank=rank, world_size=world_size, fid_reference=fid_reference,
                             start_step=step if cfg.resume else 0, sharded=cfg.fsdp,
                             make_scratch=lambda: scratch_model(cfg, model, device))
        guard, pending, checkpoint, stopped_by = DivergenceGuard(), None, None, 0
        last_saved = f"{cfg.resume} (step {step})" if cfg.resume else "none yet"
        local_batch = cfg.batch_size // world_size
        micro_batch = local_batch // cfg.accum_steps

        # ---- the loop: one more forward-backward than steps, so the last state is checked before it is saved;
        # no value leaves the device except at a check point (log, last, stop, a pending checkpoint)
        objective.train()
        with StopOnSignal(announce=rank == 0) as stop, log, monitor:
            while True:
                epoch, batch_in_epoch, (x, y) = next(batches)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                randomness = objective.draw_randomness(x, generator=generator, batch_size=cfg.batch_size)
                micro_means = []
                for micro in range(cfg.accum_steps):     # rows [first, first + micro_batch) of the global batch
                    first, rows = rank * local_batch + micro * micro_batch, slice(micro * micro_batch,
                                                                                  (micro + 1) * micro_batch)
                    with no_sync(step_fn, last_micro_batch=micro == cfg.accum_steps - 1):
                        terms = step_fn(x[rows], y[rows], randomness.rows(first, first + micro_batch))
                        (terms["loss"] / cfg.accum_steps).backward()
                    micro_means.append(torch.stack([terms[name].detach().mean() for name in LOGGED_TERMS]))
                log.add(step + 1, images_seen + cfg.batch_size, logged_terms(model, micro_means))   # on the device
                stop_requested = any_rank(stop.signum > 0)      # a CPU flag, the same on every rank
                write_due = ((step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps or stop_requested
                             or monitor.fid_due(step + 1, last=step + 1 == cfg.steps, stopping=stop_requested))
                if write_due or pending is not None or step == cfg.steps:   # a check point: one host read
                    log.check(guard, last_saved)   # DivergenceError: nothing after the last good step is saved
                if pending is not None:     # the state of the step before: its next loss passed the guard
                    with stop.writing():
                        checkpoint = save_run_checkpoint(out, pending, model=model, optimizer=optimizer, emas=emas,
                                                         sharded=cfg.fsdp, keep_last=cfg.keep_last, rank=rank)
                    last_saved, pending = f"{checkpoint} (step {step})", None
                    if rank == 0:
                        say(f"saved {checkpoint} (step {step})")
                if step == cfg.steps or stopped_by:
                    break
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)   # freed here: the next batch starts from none, as the first
                if emas is not None:
                    emas.update(model, batch=cfg.batch_size, images_seen=images_seen)
                step, images_seen = step + 1, images_seen + cfg.batch_size
                stopped_by = (stop.signum or signal.SIGTERM) if stop_requested else 0   # a rank was signalled
                extra = monitor.after_step(step, images_seen, last=step == cfg.steps, stopping=bool(stopped_by))
                if write_due:
                    monitor.scalars(log.write(step, images_seen, extra), optimizer.param_groups[0]["lr"])
                if step % cfg.ckpt_every == 0 or step == cfg.steps or stopped_by:
                    pending = checkpoint_meta(cfg, model, step, images_seen, generator, epoch, batch_in_epoch,
                                              lr_history)

        # ---- the end
        barrier()                                        # the checkpoint is complete before any rank exits
    return TrainResult(model, dict(emas.models) if isinstance(emas, EMASet) else {}, log.history, checkpoint,
                       stopped_by)


# ----------------------------------------------------------------------------- set-up

def settle(cfg: TrainConfig, dataset, world_size: int) -> tuple[TrainConfig, object, dict | None]:
    """The run's final settings (resume target resolved, data and classes settled, every value checked), its
    dataset and the checkpoint to resume (read, not yet loaded): a wrong flag fails in seconds."""
    resume, restart = resolve_resume(cfg.resume, cfg.out)
    cfg = dataclasses.replace(cfg, resume=resume, overwrite=cfg.overwrite or restart)
    state = read_run_checkpoint(cfg.resume, sharded=cfg.fsdp) if cfg.resume else None
    if state is not None and cfg.data is None and dataset is None:
        cfg = dataclasses.replace(cfg, data=state["config"]["train"].get("data"))
    check_config(cfg, world_size)
    architecture = dataclasses.replace(ARCHITECTURES[cfg.preset], **{
        name: value for name, value in cfg.model_overrides().items() if name != "noise_scale"})
    if dataset is None:
        dataset = (SyntheticDataset(SYNTHETIC_SIZE, architecture.resolution, channels=architecture.channels,
                                    num_classes=architecture.num_classes, seed=cfg.seed) if cfg.data == "synthetic"
                   else ImageFolderDataset(cfg.data, architecture.resolution, architecture.channels))
    if cfg.num_classes is None and isinstance(dataset, ImageFolderDataset):   # the folder's classes, not 1000
        cfg = dataclasses.replace(cfg, num_classes=dataset.num_classes)
    classes = cfg.num_classes or architecture.num_classes
    if getattr(dataset, "num_classes", 0) > classes:
        raise UsageError(f"the data has {dataset.num_classes} classes but the model only {classes}; "
                         f"pass --num-classes {dataset.num_classes}")
    if cfg.perceptual != "none" and architecture.channels != 3:
        raise UsageError(f"--perceptual {cfg.perceptual} needs RGB images (LPIPS / ConvNeXt), got "
                         f"{architecture.channels} channel(s); use --perceptual none")
    if len(dataset) < cfg.batch_size:   # the sampler drops incomplete batches: it would never yield one
        raise UsageError(f"--data holds {len(dataset)} images, fewer than one global batch (--batch-size "
                         f"{cfg.batch_size}); lower --batch-size")
    if state is not None:
        check_resume(cfg, state["config"]["train"], state["step"])
    return cfg, dataset, state


def build_step(cfg: TrainConfig, model: torch.nn.Module, device: torch.device) -> TrainingStep:
    """The training step of ``cfg.preset`` around ``model``: the preset's recipe numbers, the run's ablations
    (time sampler, guidance off) and perceptual networks."""
    perceptual = None
    if cfg.perceptual != "none":
        convnext = (build_convnext_v2(arch=cfg.convnext_arch, weights=cfg.convnext_weights,
                                      pretrained=cfg.perceptual_pretrained) if cfg.perceptual == "lpips+convnext" else None)
        perceptual = PerceptualDistances(build_lpips_vgg(pretrained_backbone=cfg.perceptual_pretrained), convnext,
                                         crop_size=cfg.perceptual_crop)
    return TrainingStep.from_preset(model, cfg.preset, perceptual=perceptual, time_sampler=cfg.time_sampler,
                                    guidance=cfg.guidance, precision=cfg.precision,   # bf16: every pass, the JVP's too
                                    autocast_dtype=torch.bfloat16 if cfg.bf16 else None).to(device)


def scratch_model(cfg: TrainConfig, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A whole copy of ``model`` to sample with (its weights are overwritten before each use); with --fsdp a
    new unsharded network, built without touching the RNG a checkpoint records."""
    if not cfg.fsdp:
        return copy.deepcopy(model).eval().requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        scratch = build_model(cfg.preset, **cfg.model_overrides(), prediction=cfg.prediction)
    return scratch.to(device).eval().requires_grad_(False)


def apply_lr(optimizer, state: dict, lr: float, *, announce: bool) -> list:
    """The lr history of a resumed run, with ``lr`` applied from its step when it differs from the last."""
    lr_history = [list(entry) for entry in state.get("lr_history", [[0, state["config"]["train"]["lr"]]])]
    if lr_history[-1][1] != lr:   # load_state_dict restored the old lr: apply the one asked for
        for group in optimizer.param_groups:
            group["lr"] = lr
        lr_history.append([state["step"], lr])
        if announce:
            say(f"--lr {lr:g} applied from step {state['step']} (was {lr_history[-2][1]:g})")
    return lr_history


def prepare_run_folder(cfg: TrainConfig, out: Path, step: int, images_seen: int, in_place: bool) -> None:
    """Rank 0, every check passed: clean up, cut the logs back to ``step``, write config.json, say where we are."""
    reset_run_folder(out, resume=cfg.resume, overwrite=cfg.overwrite, resumed_step=step)
    if cfg.fsdp:
        remove_stale_sharded(out / SHARDED_NAME)
        if in_place:
            truncate_log(out / LOG_NAME, step)
        elif cfg.overwrite:
            remove_sharded(out / SHARDED_NAME)
    settings = portable_settings(dataclasses.asdict(cfg), out)
    if cfg.resume:
        say(f"resumed from {cfg.resume} (step {step}, images seen {images_seen})")
        note = changed_settings_note(read_config(out), settings)
        if note:
            say(note)
    write_config(out, settings)


# ----------------------------------------------------------------------------- the loop's helpers

def no_sync(step_fn: torch.nn.Module, last_micro_batch: bool):
    """DDP all-reduces gradients in the backward of the last micro-batch only; FSDP reduce-scatters after
    every one (unsharded gradients would cost the memory it saves); one process has nothing to sync."""
    inner = getattr(step_fn, "_orig_mod", step_fn)   # under torch.compile
    if last_micro_batch or not isinstance(inner, DistributedDataParallel):
        return contextlib.nullcontext()
    return inner.no_sync()


def logged_terms(model, micro_means: list) -> torch.Tensor:
    """The step's logged terms and gradient norm averaged over ranks, as one tensor on the device (its
    all-reduce is queued, not waited for): every rank judges the same values at the next check point."""
    grad_norm = whole(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))
    return mean_over_ranks(torch.cat([torch.stack(micro_means).mean(dim=0), grad_norm.detach().reshape(1)]))


def checkpoint_meta(cfg: TrainConfig, model, step: int, images_seen: int, generator, epoch: int, batch: int,
                    lr_history: list) -> dict:
    """Everything but the tensors of a checkpoint at the end of ``step``: the RNG states now, and the data
    position of the next batch (``batch`` is the index of this step's batch in ``epoch``)."""
    return {"format": CHECKPOINT_FORMAT, "step": step, "images_seen": images_seen, "rng": capture_rng_state(generator),
            "data": {"epoch": epoch, "batch": batch + 1}, "lr_history": [list(entry) for entry in lr_history],
            "config": {"model": {"preset": cfg.preset, **cfg.model_overrides(), "prediction": cfg.prediction},
                       "noise_scale": model.noise_scale, "num_classes": model.num_classes,
                       "resolution": model.resolution, "jvp": "forward_ad",
                       "train": portable_settings(dataclasses.asdict(cfg), cfg.out)}}


# ----------------------------------------------------------------------------- command line

def fail(message: str, code: int) -> None:
    print(f"python -m full.train: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        cfg, progress = config_from_argv(argv)
        result = train(cfg, progress=progress)
    except CheckpointError as error:
        fail(f"--resume: {error}", EXIT_USAGE)
    except InitFromOfficialError as error:
        fail(f"--init-official: {error}", EXIT_USAGE)
    except (UsageError, RunFolderError, RunFolderLocked, UnreadableImageError, FileNotFoundError) as error:
        fail(str(error), EXIT_USAGE)        # a setting, file or folder to fix: one line, nothing trained
    except DivergenceError as error:
        fail(str(error), EXIT_DIVERGED)
    except (OSError, LogWriteError) as error:   # a full disk, a vanished file system: the last checkpoint is kept
        fail(str(error), EXIT_FAILED)
    except KeyboardInterrupt as error:      # a second Ctrl-C: after the checkpoint write, never inside it
        fail(f"interrupted ({error or 'KeyboardInterrupt'}); the last complete checkpoint is kept", EXIT_INTERRUPTED)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if result.stopped_by:
        name = signal.Signals(result.stopped_by).name
        print(f"stopped by {name} at step {result.history[-1]['step'] if result.history else '?'}; checkpoint "
              f"{result.checkpoint}; continue with --resume {Path(result.checkpoint).parent} (or --resume auto)",
              file=sys.stderr)
        raise SystemExit(128 + result.stopped_by)


if __name__ == "__main__":
    main()
