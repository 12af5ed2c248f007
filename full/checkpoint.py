"""Checkpoints of the pMF trainer: atomic writes, RNG capture, and loading a model for sampling.

Checkpoint dict (the contract shared with the sampler / evaluator)::

    {"model": state_dict, "ema": {"500": state_dict, ...}, "optimizer": ..., "step": int,
     "images_seen": int, "rng": {...}, "data": {"epoch": int, "batch": int},
     "config": {"model": {"preset": str, **overrides}, "noise_scale": float, "num_classes": int,
                "resolution": int, "train": {...TrainConfig fields...}}}

``build_model(**ckpt["config"]["model"])`` rebuilds the network.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

TEMP_PREFIX = ".tmp-"
"""Prefix of the temporary file written next to the final one; renamed over it once complete."""


def save_checkpoint(path: str | os.PathLike, state: dict) -> Path:
    """Write ``state`` to ``path`` atomically: temp file in the same folder, fsync, ``os.replace``.

    A crash (or kill) at any point leaves either the previous file or the new one under ``path``,
    never a partial file; a failed write removes its temp file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=TEMP_PREFIX + path.name + ".", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)       # atomic on POSIX within one file system
    except BaseException:
        if os.path.exists(temp_name):
            os.remove(temp_name)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (a FileNotFoundError names the path)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    return torch.load(path, map_location=map_location, weights_only=False)


def load_model(path: str | os.PathLike, ema: str | None = None, map_location: str | torch.device = "cpu"):
    """Rebuild the PMFViT of a checkpoint in eval mode, with the EMA ``ema`` (e.g. "1000") or raw weights.

    The v-head is dropped (sampling needs only the u-head). Raises a KeyError listing the
    available EMAs when ``ema`` is absent.
    """
    from .model import build_model

    checkpoint = load_checkpoint(path, map_location)
    if ema is None:
        state = checkpoint["model"]
    else:
        available = sorted(checkpoint.get("ema", {}), key=float)
        if str(ema) not in checkpoint.get("ema", {}):
            raise KeyError(f"checkpoint {str(path)!r} has no EMA {ema!r}; available EMAs (half-life kimg): "
                           f"{available} (or ema=None for the raw weights)")
        state = checkpoint["ema"][str(ema)]
    model = build_model(**checkpoint["config"]["model"], v_head=False)
    state = {key: value for key, value in state.items() if not key.startswith("v_head.")}
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- RNG states

def capture_rng_state(step_generator: torch.Generator) -> dict:
    """Every RNG state that can influence a run: the per-step generator, python, numpy, torch (CPU, CUDA)."""
    state = {"step_generator": step_generator.get_state(), "python": random.getstate(),
             "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict, step_generator: torch.Generator) -> None:
    """Inverse of :func:`capture_rng_state`."""
    step_generator.set_state(state["step_generator"].cpu())   # RNG states are CPU byte tensors on every device
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([cuda_state.cpu() for cuda_state in state["cuda"]])
