"""What a training run tells its user, and the guards around it: the run-folder lock, ``config.json``,
the start-up summary, ``log.jsonl`` records, the console, the divergence guard, and the monitor's
grids / FID / TensorBoard as one call per step (:class:`RunMonitor`).

* **Lock.** ``<out>/.lock`` is held with ``flock`` for the whole run (rank 0): a second run into the same
  folder is refused; the kernel drops the lock when the process dies, so a crashed run never leaves it stuck.
* **Check points.** A step's logged terms stay on the device (one stacked tensor, :meth:`RunLog.add`):
  reading them every step would stall a GPU's launch queue. At a check point (a log step, the last step, a
  stop, and every step whose loss clears a pending checkpoint) the window is read to the host in one
  transfer (:func:`to_host`, the loop's only read of device values) and the guard checks its steps in order
  (:meth:`RunLog.check`).
* **log.jsonl.** One record per ``--log-every`` steps: time stamp (UTC, ISO 8601, and Unix seconds), step,
  images seen, the *means over the window* of every logged term and the gradient norm, seconds per kimg,
  images per second, peak memory of the device (CUDA's max allocated) and of the host (max RSS), in GiB;
  in-training FID / IS when computed. A failed append (a full disk) names the file and stops the run.
* **Divergence guard** (:class:`DivergenceGuard`): a step diverged when any logged term or the gradient norm
  is NaN / inf, or when ``raw_u`` / ``raw_v`` (the un-weighted squared errors) exceed
  :data:`DIVERGENCE_FACTOR` x their median over the last :data:`DIVERGENCE_WINDOW` steps (from the second
  step on), or the gradient norm does (once the window is full). It is judged at the next check point, so
  a diverged step between check points may already have been applied to the weights in memory when the
  run stops; that is harmless, because a checkpoint of the state after step N is written only once the
  guard has passed step N + 1, so nothing diverged is ever saved and the checkpoint the error names is good.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import math
import os
import resource
import statistics
import sys
import time
from collections import deque
from pathlib import Path

import torch

from .distributed import any_rank
from .ema import EMA_RAMPUP_RATIO
from .io import write_json

LOCK_NAME = ".lock"
CONFIG_NAME = "config.json"
DIVERGENCE_FACTOR = 100.0
"""A step whose raw loss (or gradient norm) is this many times the run's recent median has diverged: a
healthy run's batch means move within ~4x of each other (pMF-T/2, lr 1e-3), an lr-100 run jumps 1e8x
in one step."""
DIVERGENCE_WINDOW = 100
"""Steps of history the guard's medians are taken over."""
WATCHED_FOR_EXPLOSION = ("raw_u", "raw_v")
GIB = 2 ** 30


class RunFolderLocked(RuntimeError):
    """Another process holds the run folder's lock."""


class DivergenceError(RuntimeError):
    """A step's loss or gradient norm is NaN / inf or exploded; raised at the next check point, before any
    state after it is saved."""


class LogWriteError(OSError):
    """Appending to log.jsonl failed (a full disk); the message names the file."""


class RunLock:
    """``flock`` on ``<out>/.lock`` while the run lives, taken by rank 0 (``enabled``); released by the
    kernel on any exit. Every rank learns whether it was taken, so all refuse together."""

    def __init__(self, out: str | os.PathLike, *, enabled: bool = True):
        self.path, self.enabled, self.handle = Path(out) / LOCK_NAME, enabled, None

    def __enter__(self) -> "RunLock":
        holder = None
        if self.enabled:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.handle = open(self.path, "a+")
            except OSError:   # an unwritable --out: check_run_folder names the problem
                self.handle = None
            if self.handle is not None:   # opened, never written: a refused run leaves the folder untouched
                try:
                    fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    self.handle.close()
                    self.handle, holder = None, True
        if any_rank(holder is not None):
            raise RunFolderLocked(f"--out {str(self.path.parent)!r} is in use by another full.train run (it holds "
                                  f"{LOCK_NAME} there); wait for it to finish or choose another --out")
        return self

    def __exit__(self, *exc_info) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()


# ----------------------------------------------------------------------------- config.json

def write_config(out: str | os.PathLike, settings: dict) -> Path:
    """The resolved settings of the run as ``<out>/config.json`` (atomic)."""
    return write_json(Path(out) / CONFIG_NAME, settings)


def read_config(out: str | os.PathLike) -> dict | None:
    """``<out>/config.json`` as a dict, or None when absent or unreadable (it is rewritten at start)."""
    try:
        settings = json.loads((Path(out) / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return None
    return settings if isinstance(settings, dict) else None


def changed_settings_note(old: dict | None, new: dict) -> str | None:
    """One line naming what a resumed run changes against the previous config.json, or None.

    Only settings that may change on resume reach this point (:data:`full.config.RESUME_FIXED` were
    checked against the checkpoint): ``--steps``, ``--lr``, logging, watching, checkpointing, the machine.
    """
    if not old:
        return None
    changes = [f"{name} {old[name]!r} -> {value!r}" for name, value in new.items()
               if name in old and name not in ("resume", "overwrite")
               and (list(old[name]) if isinstance(old[name], (list, tuple)) else old[name])
               != (list(value) if isinstance(value, (list, tuple)) else value)]
    return f"changed on resume (allowed): {', '.join(changes)}" if changes else None


# ----------------------------------------------------------------------------- the console

def summary(rows: dict[str, object]) -> str:
    """The start-up block: one ``name: value`` line per entry, aligned."""
    width = max(map(len, rows))
    return "\n".join(["-" * 72, *(f"{name + ':':<{width + 1}} {value}" for name, value in rows.items()), "-" * 72])


def say(text: str) -> None:
    """A console line the user should see (stderr: stdout stays free for piping)."""
    print(text, file=sys.stderr, flush=True)


def peak_memory_gib(device: torch.device) -> tuple[float | None, float]:
    """(device peak allocated, host peak RSS) in GiB; the device's is None off CUDA."""
    gpu = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
    return gpu, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB   # Linux: KiB


def summary_rows(cfg, model, dataset, world_size: int, start_step: int) -> dict:
    """The start-up summary: what is trained, where, how fast it can be compared."""
    total = sum(p.numel() for p in model.parameters())
    heads = sum(p.numel() for name, p in model.named_parameters() if name.startswith("v_head."))
    # EDM ramp: hl_imgs = min(hl * 1000, 0.05 * images seen); every EMA is equal until the shortest departs.
    split = int(min(cfg.ema_half_lives_kimg) * 1000 / EMA_RAMPUP_RATIO) // cfg.batch_size + 1
    emas = " ".join(f"{hl:g}" for hl in cfg.ema_half_lives_kimg)
    if len(cfg.ema_half_lives_kimg) > 1:
        emas += (f" kimg (all equal for this whole run: the EDM ramp caps each half-life at 5% of the images "
                 f"seen; they differ from step {split})" if split > cfg.steps else f" kimg (equal until step {split}: "
                 f"EDM ramp)")
    precision = cfg.precision + (" + bf16 autocast of the no-grad and perceptual passes (--bf16)" if cfg.bf16
                                 else "") + (", bf16 FSDP all-gather" if cfg.fsdp_mixed_precision else "") + (
        ", activation checkpointing" if cfg.activation_checkpointing else "")
    return {"preset": cfg.preset + (f" ({', '.join(f'{k}={v}' for k, v in cfg.model_overrides().items())})"
                                    if cfg.model_overrides() else ""),
            "parameters": f"{total:,} ({total - heads:,} without the v-head)",
            "processes": f"{world_size} ({'FSDP' if cfg.fsdp else 'DDP' if world_size > 1 else 'single'}), "
                         f"device {next(model.parameters()).device}",
            "batch": f"{cfg.batch_size} global, {cfg.batch_size // world_size} per process, "
                     f"{cfg.accum_steps} micro-batch(es) of {cfg.batch_size // world_size // cfg.accum_steps}",
            "precision": precision, "jvp": jvp_route(),
            "data": f"{cfg.data}: {len(dataset)} images, {getattr(dataset, 'num_classes', '?')} classes "
                    f"(model: {model.num_classes})",
            "steps": f"{start_step} -> {cfg.steps}, lr {cfg.lr:g} ({cfg.optimizer})",
            "EMAs": emas, "weights": ("the checkpoint's" if start_step else f"the authors' {cfg.init_official} "
                                      f"(v-head: copy of the u-head)" if cfg.init_official else
                                      f"random (seed {cfg.seed})"), "out": str(cfg.out)}


def jvp_route() -> str:
    """The JVP engine the training step hands to pmf_ref.average_velocity_jvp, in words."""
    from .fast_jvp import ENGINE_DESCRIPTIONS

    return f"forward_ad ({ENGINE_DESCRIPTIONS['forward_ad']})"


def to_host(tensor: torch.Tensor) -> list:
    """The one way the training loop reads device values: a single device-to-host transfer (a GPU sync)."""
    return tensor.tolist()


class RunLog:
    """Per-step values in (device tensors), one ``log.jsonl`` record per window out; progress bar or plain lines.

    :meth:`add` keeps a step's values on the device; :meth:`check` reads every unchecked step to the host at
    once and passes each through the guard; :meth:`write` closes the window of checked steps up to a step.
    ``history`` holds the per-step dicts of every written step (every rank keeps it; rank 0 writes the file).
    """

    def __init__(self, path: str | os.PathLike, *, device: torch.device, total_steps: int, start_step: int,
                 batch_size: int, progress: bool, enabled: bool, terms: tuple[str, ...]):
        self.path, self.device, self.total, self.batch_size = Path(path), device, total_steps, batch_size
        self.enabled, self.terms, self.tick = enabled, terms, time.perf_counter()
        self.unchecked, self.window, self.history = [], [], []   # (step, images, tensor); per-step dicts
        self.bar = None
        if enabled and progress and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, desc="pMF", dynamic_ncols=True)
        self.plain = enabled and progress and self.bar is None   # SLURM logs: a line per record, no bar

    def add(self, step: int, images_seen: int, values: torch.Tensor) -> None:
        """Step ``step``'s terms (a 1-d tensor in the order of ``terms``), left on its device."""
        self.unchecked.append((step, images_seen, values.detach()))
        if self.bar is not None and step <= self.total:
            self.bar.update(1)

    def check(self, guard: "DivergenceGuard", last_saved: str) -> None:
        """A check point: every unchecked step to the host in one transfer, then through ``guard`` in order
        (DivergenceError at the first diverged one)."""
        if not self.unchecked:
            return
        rows = to_host(torch.stack([values for _, _, values in self.unchecked]))
        for (step, images_seen, _), row in zip(self.unchecked, rows):
            values = dict(zip(self.terms, row))
            guard.check(step, values, last_saved)
            self.window.append({"step": step, "images_seen": images_seen, **values})
        self.unchecked = []

    def write(self, step: int, images_seen: int, extra: dict | None = None) -> dict:
        """Close the window at ``step`` (checked): append its record to log.jsonl (rank 0) and show it;
        returns the record."""
        window = [values for values in self.window if values["step"] <= step]
        self.window, now, steps = self.window[len(window):], time.perf_counter(), max(len(window), 1)
        self.history.extend(window)
        means = {name: sum(values[name] for values in window) / steps for name in self.terms}
        seconds = now - self.tick
        gpu, host = peak_memory_gib(self.device)
        record = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "unix_time": round(time.time(), 3), "step": step, "images_seen": images_seen, **means,
                  "window_steps": len(window), "sec_per_kimg": seconds / (steps * self.batch_size / 1000),
                  "images_per_s": steps * self.batch_size / max(seconds, 1e-9),
                  "peak_gpu_gib": gpu, "peak_host_gib": host, **(extra or {})}
        self.tick = now
        if self.enabled:
            append_record(self.path, record)
            text = f"raw_u {record['raw_u']:.4g}  raw_v {record['raw_v']:.4g}  {record['sec_per_kimg']:.3g} s/kimg"
            if self.bar is not None:
                self.bar.set_postfix_str(text)
            elif self.plain:
                print(f"step {step}/{self.total}  images {images_seen}  loss {record['loss']:.4g}  {text}", flush=True)
            if "fid" in record:
                say(f"step {step}: FID {record['fid']:.3f}, IS {record['is_mean']:.2f}")
        return record

    def __enter__(self) -> "RunLog":
        return self

    def __exit__(self, *exc_info) -> None:
        if self.bar is not None:
            self.bar.close()


def append_record(path: Path, record: dict) -> None:
    """Append one JSON line; on failure (a full disk) remove a log left empty and raise LogWriteError naming it."""
    line = (json.dumps(record) + "\n").encode()
    try:
        with open(path, "ab") as file:
            file.write(line)
            file.flush()
    except OSError as error:
        if path.exists() and path.stat().st_size == 0:
            path.unlink()
        raise LogWriteError(error.errno, f"appending to {str(path)!r} failed: {error.strerror or error}") from None


# ----------------------------------------------------------------------------- the divergence guard

class DivergenceGuard:
    """Stops the run at a step whose terms are non-finite or exploded against the run's recent history.

    It judges the steps of a window at a check point (:meth:`RunLog.check`), in order: a diverged step
    between two check points may already have been applied to the weights in memory when it is found. That
    is harmless -- nothing of it is saved: a checkpoint of the state after step N is written only once the
    guard has passed step N + 1, so the checkpoint the error names is a good one. See the module docstring.
    """

    def __init__(self, window: int = DIVERGENCE_WINDOW, factor: float = DIVERGENCE_FACTOR):
        self.factor, self.window = factor, window
        self.history: dict[str, deque] = {}

    def check(self, step: int, values: dict[str, float], last_saved: str) -> None:
        """Raise DivergenceError for step ``step`` or record its values."""
        bad = [f"{name} {value:.4g}" for name, value in values.items() if not math.isfinite(value)]
        kind = "non-finite"
        if not bad:
            kind = f"exploded (over {self.factor:g}x its median of the last steps)"
            for name in (*WATCHED_FOR_EXPLOSION, "grad_norm"):
                past = self.history.get(name, ())
                enough = len(past) >= (self.window if name == "grad_norm" else 1)
                if name in values and enough and values[name] > self.factor * statistics.median(past):
                    bad.append(f"{name} {values[name]:.4g} vs median {statistics.median(past):.4g}")
        if bad:
            raise DivergenceError(
                f"step {step} is {kind} ({', '.join(bad)}): training diverged and was stopped; a checkpoint is "
                f"written only after the next step's loss passed this check, so nothing diverged was saved; "
                f"last checkpoint: {last_saved} -- resume from it with a lower --lr")
        for name, value in values.items():
            self.history.setdefault(name, deque(maxlen=self.window)).append(value)


# ----------------------------------------------------------------------------- watching: grids, FID, TensorBoard

class RunMonitor:
    """full.monitor's grids, in-training FID and TensorBoard for one run, DDP or FSDP alike.

    Sampling needs whole networks: unsharded, rank 0 samples its EMAs directly and the other ranks get
    the FID's EMA broadcast into a scratch copy; sharded (``--fsdp``), every rank gathers the network in
    turn (a collective) into a scratch copy -- with ``--fsdp`` watching costs one whole unsharded network per
    process. Nothing here changes what is trained.
    """

    def __init__(self, cfg, out: Path, model: torch.nn.Module, emas, *, rank: int, world_size: int,
                 fid_reference, start_step: int, sharded: bool, make_scratch):
        from .monitor import TensorBoard, default_fid_ema, sampling_settings

        self.cfg, self.out, self.model, self.emas, self.rank, self.world_size = cfg, out, model, emas, rank, world_size
        self.fid_reference, self.sharded = fid_reference, sharded
        self.omega, self.t_min, self.t_max = sampling_settings(cfg.preset, guidance=cfg.guidance, omega=cfg.sample_omega,
                                                               t_min=cfg.sample_t_min, t_max=cfg.sample_t_max)
        self.grid_inputs = self._grid_inputs() if cfg.sample_every and rank == 0 else None
        self.fid_ema = default_fid_ema(cfg.preset, cfg.ema_half_lives_kimg)
        watching = cfg.sample_every or cfg.fid_every
        self.scratch = make_scratch() if watching and (sharded or (cfg.fid_every and rank != 0)) else None
        self.board = (TensorBoard(out, purge_step=start_step + 1 if start_step else None)
                      if cfg.tensorboard and rank == 0 else None)

    def _grid_inputs(self):
        from .checkpoint import CheckpointError, read_checkpoint_file
        from .config import UsageError
        from .monitor import GRID_INPUTS_FILE, load_or_make_grid_inputs

        model, path = self.model, self.out / GRID_INPUTS_FILE
        try:
            if path.exists():   # read safely first: a damaged or foreign file is one clear error
                stored = read_checkpoint_file(path)
                if not (isinstance(stored, dict) and all(isinstance(stored.get(key), torch.Tensor)
                                                          for key in ("y", "z_1"))):
                    raise ValueError(f"{str(path)!r} is not a grid-inputs file (it needs tensors 'y' and 'z_1')")
            return load_or_make_grid_inputs(self.out, model.num_classes, (model.channels, model.resolution,
                                                                           model.resolution),
                                            seed=self.cfg.seed, noise_scale=model.noise_scale)
        except (CheckpointError, ValueError) as error:
            raise UsageError(f"--sample-every: {error}; delete it (new grid noise) or use another --out") from None

    def network(self, name: str) -> torch.nn.Module | None:
        """The whole network ``name`` ("raw" or an EMA key) where it is sampled; a collective with --fsdp."""
        from .fsdp import full_model_state_dict, whole

        if self.sharded:
            state = (full_model_state_dict(self.model) if name == "raw" else
                     {key: whole(value) for key, value in self.emas.averages[name].items()})
            self.scratch.load_state_dict(state)
            return self.scratch
        if self.rank == 0:
            return self.model if name == "raw" else self.emas.models[name]
        return self.scratch

    def fid_due(self, step: int, *, last: bool, stopping: bool) -> bool:
        """Whether :meth:`after_step` computes the in-training FID at ``step`` (the same on every rank)."""
        return bool(self.cfg.fid_every) and (step % self.cfg.fid_every == 0 or last) and not stopping

    def after_step(self, step: int, images_seen: int, *, last: bool, stopping: bool) -> dict:
        """Grids and FID when due; returns ``{"fid", "is_mean"}`` when the FID was computed (rank 0)."""
        from .monitor import FID_LOG, append_jsonl, broadcast_weights, in_training_fid, write_sample_grids

        cfg, extra, settings = self.cfg, {}, dict(omega=self.omega, t_min=self.t_min, t_max=self.t_max)
        if self.fid_due(step, last=last, stopping=stopping):
            network = self.network(self.fid_ema)
            if not self.sharded:
                broadcast_weights(network)
            metrics = in_training_fid(network, self.fid_reference, num=cfg.fid_num, seed=cfg.seed, rank=self.rank,
                                      world_size=self.world_size, **settings)
            if self.rank == 0:
                append_jsonl(self.out / FID_LOG, {"step": step, "images_seen": images_seen, "ema": self.fid_ema,
                                                  **settings, **metrics})
                extra = {"fid": metrics["fid"], "is_mean": metrics["is_mean"]}
        if cfg.sample_every and (step % cfg.sample_every == 0 or last):
            names = [*(self.emas.half_lives if self.sharded else (self.emas.models if self.rank == 0 else ())), "raw"]
            for name in names:
                network = self.network(name)
                if self.rank == 0:
                    tiles = write_sample_grids(self.out, step, {name: network}, self.grid_inputs, **settings)
                    if self.board is not None:
                        self.board.image(f"samples/{name if name == 'raw' else 'ema' + name}", tiles[name], step)
        return extra

    def scalars(self, record: dict, lr: float) -> None:
        if self.board is not None:
            self.board.scalars("train", {**record, "lr": lr}, record["step"])

    def __enter__(self) -> "RunMonitor":
        return self

    def __exit__(self, *exc_info) -> None:
        if self.board is not None:
            self.board.close()
