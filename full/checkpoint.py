"""Checkpoints of the pMF trainer: atomic writes, safe loading, RNG capture, a model for sampling, and
the rest of what keeps a run folder whole (log truncation on resume, stop on SIGINT / SIGTERM).

Checkpoint dict (the contract shared with the sampler / evaluator)::

    {"format": 2, "model": state_dict, "ema": {"500": state_dict, ...}, "optimizer": ..., "step": int,
     "images_seen": int, "rng": {...tensors...}, "data": {"epoch": int, "batch": int},
     "lr_history": [[first_step, lr], ...],
     "config": {"model": {"preset": str, **overrides}, "noise_scale": float, "num_classes": int,
                "resolution": int, "train": {...TrainConfig fields...}}}

Only tensors and plain containers (dict, list, tuple, str, int, float, bool, None), so every file is
read with ``torch.load(..., weights_only=True)``: loading a checkpoint never runs code from it.
``build_model(**ckpt["config"]["model"])`` rebuilds the network. Paths inside the run folder are stored
relative to it (``out`` is "."), so a moved run folder resumes where it now is. A sharded checkpoint
folder (``checkpoint.dcp``, :mod:`full.fsdp`) reads as the same dict (:func:`load_checkpoint`).
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import pickle
import random
import re
import signal
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import torch

from .io import TEMP_PREFIX, atomic_write, refused_pickle_global, unwritable_reason

CHECKPOINT_FORMAT = 2
"""2: weights-only safe (RNG states as tensors). Files of format 1 held numpy arrays and are refused."""
CHECKPOINT_NAME, LOG_NAME = "checkpoint.pt", "log.jsonl"
"""The two files of a run folder (``full.train --out``)."""
NUMBERED_CHECKPOINT = re.compile(r"^checkpoint-(\d{9,})\.pt$")
"""``--keep-last``: ``checkpoint-000500000.pt`` (the step, 9 digits); ``checkpoint.pt`` then links to the newest."""
FID_LOG_NAME = "fid.jsonl"
MONITOR_FILES = (FID_LOG_NAME, "grid_inputs.pt", "samples/step*.png", "tensorboard/events.out.tfevents.*")
"""What full.monitor writes into a run folder (``--fid-every``, ``--sample-every``, ``--tensorboard``)."""


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the one-line message names the file and what is wrong."""


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked (not writable, or holding another run); names it."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (e.g. a full disk); the previous checkpoint under that name is untouched."""


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Write ``state`` to ``path`` atomically: temp file in the same folder, fsync, ``os.replace``.

    A crash (or kill) at any point leaves either the previous file or the new one under ``path``,
    never a partial file; a failed write removes its temp file (a SIGKILL cannot: see
    :func:`remove_stale_temp_files`).

    Raises:
        CheckpointWriteError: the disk is full or the folder not writable (the previous file is kept).
    """
    path = Path(path)
    try:
        atomic_write(path, lambda file: torch.save(state, file))
    except BaseException as error:
        os_error = _os_error_in_chain(error)
        if os_error is None:
            raise
        reason = "no space left on device" if os_error.errno == errno.ENOSPC else (os_error.strerror or str(os_error))
        previous = "the previous checkpoint is kept" if path.exists() else "no earlier checkpoint exists"
        failure = CheckpointWriteError(f"writing checkpoint {str(path)!r} failed: {reason} ({previous})")
        failure.errno = os_error.errno
        raise failure from error
    return path


def _os_error_in_chain(error: BaseException) -> OSError | None:
    """The OSError behind ``error``: torch's zip writer re-raises a failed write as a RuntimeError."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, OSError):
            return error
        error, seen = error.__cause__ or error.__context__, seen + 1
    return None


def remove_stale_temp_files(folder: str | os.PathLike, name: str = "checkpoint.pt") -> list[Path]:
    """Delete the temp files a killed :func:`save_checkpoint` of ``folder/name`` left behind; returns them."""
    stale = sorted(Path(folder).glob(f"{TEMP_PREFIX}{name}.*")) if Path(folder).is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _first_line(error: BaseException) -> str:
    """The first sentence of an error message (torch's run on for lines)."""
    text = str(error).strip()
    return text.splitlines()[0].split(". ")[0] if text else type(error).__name__


def read_checkpoint_file(path: str | os.PathLike, map_location: str | torch.device = "cpu", *,
                         mmap: bool = False) -> object:
    """``torch.load(path, weights_only=True)`` with every failure turned into a one-line CheckpointError.

    Used for any torch file a user hands us (our checkpoints, Inception weights): an empty,
    truncated or garbage file, and a pickle that asks for anything but tensors and plain
    containers, are refused -- the last without running any of it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{str(path)!r} is empty (0 bytes): an interrupted copy or download?")
    mmap = mmap and zipfile.is_zipfile(path)   # torch can mmap only its zip format (not legacy files, not garbage)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        unsafe = refused_pickle_global(path, str(error))   # read statically: nothing in the file runs
        if unsafe:
            raise CheckpointError(f"{str(path)!r} holds code and was refused: it holds Python objects other than "
                                  f"tensors and plain containers (it asks for {unsafe}); loading it would run that. Files "
                                  f"written by this project never do (full.train checkpoints of format 1 held "
                                  f"numpy RNG states)") from None
        raise CheckpointError(f"{str(path)!r} is not a torch file, or is corrupt ("
                              f"{_first_line(error) if 'WeightsUnpickler' not in str(error) else 'unreadable pickle'})"
                              ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError,
            AttributeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{str(path)!r} is not a readable torch file (truncated or corrupt?): "
                              f"{type(error).__name__}: {_first_line(error)}") from None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", *,
                    mmap: bool = False) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (weights only) and check its layout.

    A sharded checkpoint folder (``--fsdp``) is read whole, in this process, into the same dict.

    Raises:
        CheckpointError: missing, empty, truncated, garbage, unsafe or foreign file (the message says which).
    """
    if Path(path).is_dir():
        from .fsdp import is_sharded_checkpoint, sharded_as_single_file

        if not is_sharded_checkpoint(path):
            raise CheckpointError(f"{str(path)!r} is a folder, not a checkpoint file or a sharded checkpoint")
        state = sharded_as_single_file(path)
    else:
        state = read_checkpoint_file(path, map_location, mmap=mmap)
    check_checkpoint_layout(state, path)
    return state


def check_checkpoint_layout(state: object, path: str | os.PathLike) -> None:
    """The keys the sampler needs: ``model`` (a state dict) and ``config.model.preset`` (a known preset)."""
    from .model import PRESETS

    where = repr(str(path))
    if not isinstance(state, dict):
        raise CheckpointError(f"{where} is not a full.train checkpoint (it holds a {type(state).__name__}, "
                              f"not a dict)")
    if "config" not in state or "model" not in state:
        hint = (" -- it looks like one of the authors' released files: sample it with --official-ckpt"
                if any(isinstance(key, str) and key.startswith("net.") for key in state) else "")
        keys = sorted(str(key) for key in state)[:6]
        raise CheckpointError(f"{where} is not a full.train checkpoint (no 'model'/'config' keys; it has "
                              f"{keys}{'...' if len(state) > 6 else ''}){hint}")
    config = state["config"]
    preset = config.get("model", {}).get("preset") if isinstance(config, dict) and isinstance(
        config.get("model"), dict) else None
    if preset not in PRESETS:
        raise CheckpointError(f"{where}: config.model.preset is {preset!r}, not one of {sorted(PRESETS)}")
    if not isinstance(state["model"], dict) or not all(isinstance(v, torch.Tensor) for v in state["model"].values()):
        raise CheckpointError(f"{where}: 'model' is not a state dict of tensors")
    emas = state.get("ema", {})
    if not isinstance(emas, dict) or not all(_is_half_life(key) and isinstance(ema, dict) for key, ema in emas.items()):
        raise CheckpointError(f"{where}: 'ema' is not {{half-life in kimg: state dict}} (it has keys "
                              f"{sorted(map(str, emas))[:6] if isinstance(emas, dict) else type(emas).__name__})")


def _is_half_life(key: object) -> bool:
    try:
        return isinstance(key, str) and float(key) > 0 and math.isfinite(float(key))
    except ValueError:
        return False


def require_keys(state: dict, path: str | os.PathLike, keys: tuple[str, ...], purpose: str) -> None:
    """CheckpointError naming the first of ``keys`` that ``state`` lacks (e.g. a sampling-only file given to resume)."""
    missing = [key for key in keys if key not in state]
    if missing:
        raise CheckpointError(f"{str(path)!r} cannot be used to {purpose}: it lacks {missing} (a hand-made or "
                              f"sampling-only checkpoint?)")


def first_non_finite(state: dict[str, torch.Tensor]) -> str | None:
    """Name of the first floating-point tensor of a state dict holding NaN or inf, else None."""
    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            return name
    return None


def load_model(path: str | os.PathLike, ema: str | None = None, map_location: str | torch.device = "cpu"):
    """Rebuild the PMFViT of a checkpoint in eval mode, with the EMA ``ema`` (e.g. "1000") or raw weights.

    The v-head is dropped (sampling needs only the u-head).

    Raises:
        KeyError: listing the available EMAs when ``ema`` is absent.
        CheckpointError: an unusable file, weights that do not fit the recorded preset, or weights
        holding NaN / inf (a diverged run: its samples would be blank images with a finite FID).
    """
    from .model import build_model

    checkpoint = load_checkpoint(path, map_location)
    if ema is None:
        state = checkpoint["model"]
    else:
        emas = checkpoint.get("ema", {})
        available = sorted(emas, key=float)
        if str(ema) not in emas:
            raise KeyError(f"checkpoint {str(path)!r} has no EMA {ema!r}; available EMAs (half-life kimg): "
                           f"{available} (or ema=None for the raw weights)")
        state = emas[str(ema)]
    state = {key: value for key, value in state.items() if not key.startswith("v_head.")}
    bad = first_non_finite(state)
    if bad is not None:
        which = "raw weights" if ema is None else f"EMA {ema}"
        raise CheckpointError(f"{str(path)!r}: the {which} hold NaN or inf (tensor {bad!r}): the run diverged; "
                              f"use an earlier checkpoint")
    try:
        model = build_model(**checkpoint["config"]["model"], v_head=False)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, ValueError) as error:
        raise CheckpointError(f"{str(path)!r}: weights do not fit the recorded model "
                              f"{checkpoint['config']['model']}: {_first_line(error)}") from None
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- RNG states (as tensors)

def capture_rng_state(step_generator: torch.Generator) -> dict:
    """Every RNG state that can influence a run: the per-step generator, python, numpy, torch (CPU, CUDA).

    The python and numpy states are stored as int64 tensors plus plain numbers, so the checkpoint
    loads with ``weights_only=True``.
    """
    version, python_state, python_gauss = random.getstate()
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {"step_generator": step_generator.get_state(), "torch": torch.get_rng_state(),
             "python": {"version": int(version), "state": torch.tensor(python_state, dtype=torch.int64),
                        "gauss": python_gauss},
             "numpy": {"name": str(name), "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict, step_generator: torch.Generator) -> None:
    """Inverse of :func:`capture_rng_state`."""
    step_generator.set_state(state["step_generator"].cpu())   # RNG states are CPU byte tensors on every device
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([cuda_state.cpu() for cuda_state in state["cuda"]])


# ----------------------------------------------------------------------------- the run folder

def truncate_log(path: str | os.PathLike, step: int) -> int:
    """Make a JSONL step log hold each step <= ``step`` exactly once; returns the number of lines dropped.

    After a kill the log can run past the checkpoint being resumed (those steps are trained again)
    and end in a half-written line; both are dropped, and a step logged twice keeps its last record.
    The file is rewritten atomically.
    """

    path = Path(path)
    if not path.exists():
        return 0
    lines = path.read_text(errors="replace").splitlines()
    by_step: dict[int, str] = {}
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            by_step[record["step"]] = line
    kept = [by_step[key] for key in sorted(by_step)]
    if kept != lines:
        atomic_write(path, lambda file: file.write("".join(line + "\n" for line in kept).encode()))
    return len(lines) - len(kept)


def continues_in_place(out: str | os.PathLike, resume: str | None) -> bool:
    """True when ``resume`` is ``out/checkpoint.pt`` itself or one of ``out``'s numbered checkpoints
    (the run goes on in its own folder)."""
    if resume is None or not Path(resume).exists() or not Path(out).is_dir():
        return False
    target = Path(out) / CHECKPOINT_NAME
    if target.exists() and os.path.samefile(resume, target):
        return True
    return bool(NUMBERED_CHECKPOINT.match(Path(resume).name)) and os.path.samefile(Path(resume).parent, out)


def numbered_checkpoint_name(step: int) -> str:
    """``checkpoint-000500000.pt``: zero-padded, so names sort by step."""
    return f"checkpoint-{step:09d}.pt"


def numbered_checkpoints(folder: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of the numbered checkpoints in ``folder``, oldest first (temp files never match)."""
    folder = Path(folder)
    found = [(int(match.group(1)), path) for path in (folder.iterdir() if folder.is_dir() else ())
             if (match := NUMBERED_CHECKPOINT.match(path.name)) and path.is_file()]
    return sorted(found)


def keep_latest(folder: str | os.PathLike, newest: str | os.PathLike, *, keep_last: int) -> list[Path]:
    """Point ``folder/checkpoint.pt`` at the numbered checkpoint ``newest`` and delete the others but
    the ``keep_last - 1`` before it; returns the deleted files.

    ``checkpoint.pt`` becomes a relative symlink, swapped in atomically (a hard link where symlinks
    are not supported). Numbered checkpoints *after* ``newest`` are from a trajectory this run left
    by resuming from an earlier one; they are deleted too.
    """
    folder, newest = Path(folder), Path(newest)
    link = folder / f"{TEMP_PREFIX}{CHECKPOINT_NAME}.link"
    link.unlink(missing_ok=True)
    try:
        os.symlink(newest.name, link)
    except OSError:
        os.link(newest, link)
    os.replace(link, folder / CHECKPOINT_NAME)
    step = int(NUMBERED_CHECKPOINT.match(newest.name).group(1))
    older = [path for number, path in numbered_checkpoints(folder) if number < step]
    stale = [path for number, path in numbered_checkpoints(folder) if number > step]
    deleted = older[:max(len(older) - (keep_last - 1), 0)] + stale
    for path in deleted:
        path.unlink(missing_ok=True)
    return deleted


def checkpoint_step(path: str | os.PathLike) -> int:
    """The step a checkpoint file or sharded folder was saved at (reads only its counters)."""
    from .fsdp import is_sharded_checkpoint, read_sharded_meta

    state = read_sharded_meta(path) if is_sharded_checkpoint(path) else load_checkpoint(path, mmap=True)
    if not isinstance(state.get("step"), int):
        raise CheckpointError(f"{str(path)!r} records no step")
    return state["step"]


def latest_checkpoint(folder: str | os.PathLike) -> Path:
    """The checkpoint of a run folder to resume from: the readable one of the highest step.

    Candidates: ``checkpoint.pt``, the numbered ``checkpoint-<step>.pt`` and the sharded link
    ``checkpoint.dcp``. The step is read from each file, not from its name: a plain ``checkpoint.pt``
    saved after the numbered snapshots (a run resumed with ``--keep-last 0``) is newer than all of them.
    A damaged file is skipped (with a warning) for the next.

    Raises:
        CheckpointError: no readable checkpoint in ``folder``.
    """
    from .fsdp import SHARDED_NAME

    folder = Path(folder)
    candidates = [path for _, path in reversed(numbered_checkpoints(folder))] + [folder / CHECKPOINT_NAME,
                                                                                  folder / SHARDED_NAME]
    best: tuple[int, Path] | None = None
    for path in candidates:
        if not path.exists():
            continue
        try:
            step = checkpoint_step(path)
        except CheckpointError as error:
            print(f"skipping {path}: {error}", file=sys.stderr)
            continue
        if best is None or step > best[0]:
            best = (step, path)
    if best is None:
        raise CheckpointError(f"{str(folder)!r} holds no readable checkpoint ({CHECKPOINT_NAME}, "
                              f"checkpoint-<step>.pt or {SHARDED_NAME})")
    return best[1]


def resolve_resume(resume: str | None, out: str | os.PathLike) -> tuple[str | None, bool]:
    """What ``--resume`` continues, and whether ``out``'s leftovers may be deleted: ``(path or None, overwrite)``.

    ``None``: a new run. ``"auto"``: ``out``'s newest checkpoint if it has one, else a new run -- the
    same command starts and continues a run, so a requeued job needs no logic; a folder that never got
    its first checkpoint (a run killed early) is started over (overwrite True). A run folder: its newest
    checkpoint (:func:`latest_checkpoint`). A file or a sharded folder: itself.

    Raises:
        CheckpointError: the path does not exist, or the folder holds no readable checkpoint.
    """
    from .fsdp import is_sharded_checkpoint

    if resume is None:
        return None, False
    if resume == "auto":
        has_checkpoint = Path(out).is_dir() and any(Path(out).glob("checkpoint*"))
        return (str(latest_checkpoint(out)), False) if has_checkpoint else (None, Path(out).is_dir())
    if Path(resume).is_dir() and not is_sharded_checkpoint(resume):
        return str(latest_checkpoint(resume)), False
    if not Path(resume).exists():
        raise CheckpointError(f"checkpoint {str(resume)!r} does not exist")
    return str(resume), False


def read_resume_config(path: str | os.PathLike) -> dict:
    """The ``config.train`` settings a checkpoint (file or sharded folder) was trained with."""
    from .fsdp import is_sharded_checkpoint, read_sharded_meta

    state = read_sharded_meta(path) if is_sharded_checkpoint(path) else load_checkpoint(path, mmap=True)
    require_keys(state, path, ("config",), "resume")
    require_keys(state["config"], path, ("train",), "resume")
    return state["config"]["train"]


def check_run_folder(out: str | os.PathLike, *, resume: str | None, overwrite: bool,
                     check_writable: bool = True) -> None:
    """Refuse (RunFolderError) an unwritable ``out``, or one holding another run's checkpoint / log.

    Continuing is allowed only when ``resume`` is ``out/checkpoint.pt`` itself; ``overwrite`` lets a new
    run replace an old one (its files are deleted by :func:`reset_run_folder`, after every other check).
    Only reads (and a probe file), so every rank can run it.
    """

    out = Path(out)
    problem = unwritable_reason(out, folder=True) if check_writable else None
    if problem:
        raise RunFolderError(f"--out: {problem}")
    # A 0-byte log is what a full disk left before anything was logged: nothing to protect.
    existing = [name for name in (CHECKPOINT_NAME, LOG_NAME, "checkpoint.dcp") if (out / name).exists()
                and not (name == LOG_NAME and (out / name).stat().st_size == 0)]
    if numbered_checkpoints(out) and CHECKPOINT_NAME not in existing:
        existing.append("numbered checkpoints")
    if not existing or overwrite or continues_in_place(out, resume):
        return
    names = " and ".join(existing)
    if resume is None:
        raise RunFolderError(f"--out {str(out)!r} already holds {names} of an earlier run; pass --resume "
                             f"{out / CHECKPOINT_NAME} to continue it, --overwrite to delete them and start "
                             f"over, or another --out")
    raise RunFolderError(f"--out {str(out)!r} already holds {names} of another run than --resume {resume!r}; "
                         f"pass --overwrite to replace them, or another --out")


def reset_run_folder(out: str | os.PathLike, *, resume: str | None, overwrite: bool, resumed_step: int) -> None:
    """After every check passed (rank 0 only): delete the temp files of an interrupted save; when
    continuing in place, cut the log back to ``resumed_step`` (each logged step then appears exactly
    once; the same for ``fid.jsonl``); with ``overwrite``, delete the earlier run's checkpoints, log and
    monitor files (:data:`MONITOR_FILES`)."""
    out = Path(out)
    stale = remove_stale_temp_files(out, CHECKPOINT_NAME) + remove_stale_temp_files(out, "checkpoint-*.pt")
    if stale:
        print(f"removed {len(stale)} temp file(s) of an interrupted checkpoint save in {out}", file=sys.stderr)
    if continues_in_place(out, resume):
        dropped = truncate_log(out / LOG_NAME, resumed_step)
        if dropped:
            print(f"{out / LOG_NAME}: dropped {dropped} line(s) past the checkpoint's step {resumed_step} "
                  f"(they are trained again)", file=sys.stderr)
        truncate_log(out / FID_LOG_NAME, resumed_step)
    elif overwrite:
        for name in (CHECKPOINT_NAME, LOG_NAME):
            (out / name).unlink(missing_ok=True)
        for path in [path for _, path in numbered_checkpoints(out)] + [
                path for pattern in MONITOR_FILES for path in out.glob(pattern)]:
            path.unlink(missing_ok=True)


class StopOnSignal:
    """SIGINT / SIGTERM ask the loop to stop at the next step boundary instead of killing it mid-step.

    A cluster pre-empts a job with SIGTERM (SLURM, Kubernetes) and waits a grace period before SIGKILL;
    the trainer then saves a checkpoint and exits. The first signal only sets :attr:`signum`; the
    previous handler is restored, so a second one acts at once (Ctrl-C twice stops immediately --
    the atomic save keeps the last checkpoint whole). Inside :meth:`writing` (a checkpoint write) every
    signal only waits: the write finishes, then a second signal raises ``KeyboardInterrupt``. Installs
    nothing outside the main thread.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: bool = True):
        self.signum, self.announce, self.previous = 0, announce, {}

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    @contextlib.contextmanager
    def writing(self):
        """Hold every signal until the checkpoint write inside has finished (a second Ctrl-C included)."""
        if not self.previous:   # not the main thread: no handlers to swap
            yield
            return
        held, current = [], {signum: signal.getsignal(signum) for signum in self.SIGNALS}
        for signum in self.SIGNALS:
            signal.signal(signum, lambda number, frame: held.append(number))
        try:
            yield
        finally:
            for signum, handler in current.items():
                signal.signal(signum, handler)
            for number in held:
                if self.signum:     # the stop was asked already: this one is the second
                    raise KeyboardInterrupt(f"{signal.Signals(number).name} again after the checkpoint write")
                self._handle(number, None)

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        signal.signal(signum, self.previous.get(signum) or signal.SIG_DFL)
        if self.announce:
            print(f"\nreceived {signal.Signals(signum).name}: saving a checkpoint after this step "
                  f"(send it again to stop at once)", file=sys.stderr, flush=True)

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


# ----------------------------------------------------------------------------- a run's checkpoint: save, restore

def save_run_checkpoint(out: str | os.PathLike, meta: dict, *, model, optimizer, emas, sharded: bool,
                        keep_last: int, rank: int) -> Path:
    """Save the live training state with ``meta`` (step, RNG, data position, config): a sharded folder
    (every rank writes its shards), else one file from rank 0 -- ``checkpoint.pt``, or with ``keep_last``
    ``checkpoint-<step>.pt`` with ``checkpoint.pt`` linking it. Returns the path to resume from."""
    from .fsdp import SHARDED_NAME, save_sharded_checkpoint

    out = Path(out)
    if sharded:
        save_sharded_checkpoint(out / SHARDED_NAME, model=model, optimizer=optimizer, emas=emas, meta=meta,
                                keep_last=keep_last)
        return out / SHARDED_NAME
    path = out / (numbered_checkpoint_name(meta["step"]) if keep_last else CHECKPOINT_NAME)
    if rank == 0:
        save_checkpoint(path, {**meta, "model": model.state_dict(), "ema": emas.state_dict(),
                               "optimizer": optimizer.state_dict()})
        if keep_last:   # checkpoint.pt -> the newest; only the keep_last newest numbered ones stay
            keep_latest(out, path, keep_last=keep_last)
    return path


def read_run_checkpoint(path: str | os.PathLike, *, sharded: bool) -> dict:
    """The parts of a checkpoint a resumed run needs before it builds anything (a sharded one's ``meta.pt``)."""
    from .fsdp import is_sharded_checkpoint, read_dcp_metadata, read_sharded_meta

    if not sharded and is_sharded_checkpoint(path):
        raise CheckpointError(f"{str(path)!r} is a sharded checkpoint: pass --fsdp, or write one file with "
                              f"python -m full.fsdp export {path} --out DIR (DIR/checkpoint.pt)")
    if sharded:
        read_dcp_metadata(path)   # a corrupt or unsafe .metadata fails here, before anything is built
    state = read_sharded_meta(path) if sharded else load_checkpoint(path, map_location="cpu")
    require_keys(state, path, ("step", "images_seen", "rng", "data") if sharded else
                 ("ema", "optimizer", "step", "images_seen", "rng", "data"), "resume")
    require_keys(state["config"], path, ("train",), "resume")
    return state


def restore_run(path: str | os.PathLike, state: dict, *, model, optimizer, emas, sharded: bool,
                generator: torch.Generator) -> None:
    """Load weights, optimiser state, EMAs and every RNG state of ``state`` (read from ``path``) in place."""
    from .fsdp import load_sharded_checkpoint

    try:
        if sharded:   # every rank reads its shards, resharded to this run's process count
            load_sharded_checkpoint(path, model=model, optimizer=optimizer, emas=emas)
        else:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            if emas is not None:
                emas.load_state_dict(state["ema"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise CheckpointError(f"{str(path)!r}: its weights or optimiser state do not fit this run: "
                              f"{_first_line(error)}") from None
    restore_rng_state(state["rng"], generator)


def portable_settings(settings: dict, out: str | os.PathLike) -> dict:
    """``settings`` (a TrainConfig as a dict) with the run folder as "." and paths inside it relative to it."""
    out = Path(out).resolve()
    portable = dict(settings, out=".")
    resume = settings.get("resume")
    if resume is not None and Path(resume).resolve().parent == out:
        portable["resume"] = Path(resume).name
    return portable
