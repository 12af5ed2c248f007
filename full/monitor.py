"""Watching a run while it trains: a fixed sample grid, in-training FID / IS, TensorBoard.

Called by ``full.train`` (``--sample-every``, ``--fid-every``, ``--tensorboard``); nothing here
changes what is trained.

* Sample grid: ``rows x GRID_COLUMNS`` one-step samples, one class per row, from noise and labels
  chosen once (``grid_inputs.pt`` in the run folder, re-read on resume), so grids of different
  steps differ only by the weights. Written as ``samples/step000000500-ema2000.png`` (and ``-raw``).
* FID / IS: ``full.sample``'s class-balanced samples (label ``i mod K``, noise keyed by
  ``(seed, i)``) scored by ``full.evaluate``'s metrics with the same Inception network, so a number
  logged here equals ``python -m full.sample`` + ``python -m full.evaluate`` on that checkpoint
  (same seed and count). Every rank samples and featurises its shard; rank 0 gathers the features
  and scores. Appended to ``fid.jsonl``.
* TensorBoard: scalars and grid images through ``torch.utils.tensorboard`` into ``tensorboard/``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torchvision

from .checkpoint import FID_LOG_NAME
from .evaluate import metrics_from_features
from .io import atomic_write
from .fid import IS_SPLITS, POOL_DIM, build_inception, extract_features, load_statistics, reference_info
from .ema import format_half_life
from .presets import SAMPLING
from .sample import GRID_PADDING, generate, iter_samples, sample_noise, save_png, shard, to_uint8

GRID_INPUTS_FILE = "grid_inputs.pt"
SAMPLES_DIR = "samples"
FID_LOG = FID_LOG_NAME      # --overwrite deletes these files and cuts fid.jsonl on resume (full.checkpoint.MONITOR_FILES)
TENSORBOARD_DIR = "tensorboard"
GRID_COLUMNS = 8        # samples per class (row) of the grid
GRID_MAX_ROWS = 10      # classes shown; evenly spread over the label range when there are more
MIN_FID_SAMPLES = 2     # a covariance needs two feature vectors


# --------------------------------------------------------------------------------------------
# What is sampled: settings and network
# --------------------------------------------------------------------------------------------

def sampling_settings(preset: str, *, guidance: bool = True, omega: float | None = None,
                      t_min: float | None = None, t_max: float | None = None) -> tuple[float, float, float]:
    """(omega, t_min, t_max) of the grids and FID: the given values, else the preset's best one-step
    settings; a run trained without guidance only ever saw omega = 1 on [0, 1], so that is its default."""
    best = SAMPLING[preset]
    defaults = (best.omega, best.t_min, best.t_max) if guidance else (1.0, 0.0, 1.0)
    return tuple(float(default if value is None else value) for value, default in zip((omega, t_min, t_max),
                                                                                      defaults))


def default_fid_ema(preset: str, half_lives_kimg: tuple[float, ...]) -> str:
    """The EMA the in-training FID scores: the preset's sampling EMA if the run keeps it, else the longest."""
    best = format_half_life(SAMPLING[preset].ema_kimg)
    keys = [format_half_life(hl) for hl in half_lives_kimg]
    return best if best in keys else keys[max(range(len(keys)), key=lambda i: float(half_lives_kimg[i]))]


@torch.no_grad()
def broadcast_weights(module: torch.nn.Module, src: int = 0) -> torch.nn.Module:
    """Overwrite ``module``'s parameters and buffers with rank ``src``'s (same architecture on every rank).

    The EMAs live on rank 0 only; for the FID every rank samples with them, so the other ranks receive
    a copy into a scratch network. No-op without a process group.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for tensor in module.state_dict().values():
            dist.broadcast(tensor, src=src)
    return module


# --------------------------------------------------------------------------------------------
# The fixed sample grid
# --------------------------------------------------------------------------------------------

class GridInputs(NamedTuple):
    y: torch.Tensor     # labels (G,), long; row-major, GRID_COLUMNS per class
    z_1: torch.Tensor   # noise s * eps, (G, C, H, W) float32

    @property
    def columns(self) -> int:
        """Samples per class (grid row)."""
        return int((self.y == self.y[0]).sum())


def grid_classes(rows: int, num_classes: int) -> torch.Tensor:
    """``rows`` labels spread evenly over 0..K-1 (all of them when K <= rows), (rows,) long."""
    rows = min(rows, num_classes)
    return torch.linspace(0, num_classes - 1, rows).round().long()


def make_grid_inputs(num_classes: int, shape: tuple[int, int, int], *, seed: int, noise_scale: float,
                     rows: int = GRID_MAX_ROWS, columns: int = GRID_COLUMNS) -> GridInputs:
    """Labels (one class per row) and noise of the grid; noise of sample i keyed by (seed, i) as in full.sample.

    Args:
        shape: (C, H, W) of one image.
    Returns:
        GridInputs with G = min(rows, K) * columns samples.
    """
    y = grid_classes(rows, num_classes).repeat_interleave(columns)
    z_1 = sample_noise(torch.arange(len(y)), shape, seed=seed, noise_scale=noise_scale)
    return GridInputs(y, z_1)


def save_grid_inputs(path: Path, inputs: GridInputs) -> None:
    atomic_write(path, lambda file: torch.save({"y": inputs.y, "z_1": inputs.z_1}, file))


def load_or_make_grid_inputs(run_dir: str | Path, num_classes: int, shape: tuple[int, int, int], *, seed: int,
                             noise_scale: float) -> GridInputs:
    """The run's grid inputs: read from ``run_dir/grid_inputs.pt``, or drawn once and written there.

    Raises:
        ValueError: the stored file does not fit this model (another run's folder?).
    """
    path = Path(run_dir) / GRID_INPUTS_FILE
    if not path.exists():
        inputs = make_grid_inputs(num_classes, shape, seed=seed, noise_scale=noise_scale)
        save_grid_inputs(path, inputs)
        return inputs
    stored = torch.load(path, map_location="cpu", weights_only=True)
    inputs = GridInputs(stored["y"], stored["z_1"])
    if tuple(inputs.z_1.shape[1:]) != tuple(shape) or int(inputs.y.max()) >= num_classes:
        raise ValueError(f"{path}: grid noise {tuple(inputs.z_1.shape[1:])} / labels up to {int(inputs.y.max())} "
                         f"do not fit this model ({tuple(shape)}, {num_classes} classes); delete it or use "
                         f"another --out")
    return inputs


@torch.no_grad()
def grid_samples(model: torch.nn.Module, inputs: GridInputs, *, omega: float, t_min: float, t_max: float,
                 batch_size: int = 64) -> torch.Tensor:
    """One-step samples ``x = z_1 - u(z_1, 0, 1)`` of the grid inputs (``full.sample.generate``; x- or
    u-prediction is the model's), uint8 (G, C, H, W) on the CPU. The model's train/eval mode is restored."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    images = []
    for y, z_1 in zip(inputs.y.split(batch_size), inputs.z_1.split(batch_size)):
        x = generate(model, z_1.to(device), y.to(device), omega=omega, t_min=t_min, t_max=t_max)
        images.append(to_uint8(x).cpu())
    model.train(was_training)
    return torch.cat(images)


def tile(images: torch.Tensor, columns: int = GRID_COLUMNS) -> torch.Tensor:
    """uint8 (G, C, H, W) -> one uint8 image (3, H', W'), ``columns`` per row, white padding."""
    return torchvision.utils.make_grid(images, nrow=columns, padding=GRID_PADDING, pad_value=255)


def grid_path(run_dir: str | Path, step: int, name: str) -> Path:
    """``run_dir/samples/step000000500-ema2000.png`` (``name`` "2000") or ``...-raw.png`` (``name`` "raw")."""
    label = name if name == "raw" else f"ema{name}"
    return Path(run_dir) / SAMPLES_DIR / f"step{step:09d}-{label}.png"


def write_sample_grids(run_dir: str | Path, step: int, networks: dict[str, torch.nn.Module], inputs: GridInputs, *,
                       omega: float, t_min: float, t_max: float) -> dict[str, torch.Tensor]:
    """Sample and write one grid PNG per network (``{"500": ema, ..., "raw": model}``); returns the tiles."""
    tiles = {}
    for name, network in networks.items():
        tiles[name] = tile(grid_samples(network, inputs, omega=omega, t_min=t_min, t_max=t_max), inputs.columns)
        save_png(tiles[name], grid_path(run_dir, step, name))
    return tiles


# --------------------------------------------------------------------------------------------
# In-training FID / IS
# --------------------------------------------------------------------------------------------

class FIDReference(NamedTuple):
    extractor: torch.nn.Module   # full.fid.build_inception
    mu: np.ndarray               # (2048,)
    sigma: np.ndarray            # (2048, 2048)


def prepare_fid(ref: str | Path, inception_weights: str | None, device: torch.device | str, *,
                resolution: int | None = None) -> FIDReference:
    """Load the Inception network and the reference statistics once, at the start of the run.

    ``resolution``: the model's image side; refused (ValueError) when the reference file records another
    (``full.fid.reference_info``; JiT's and the authors' files record none).

    Raises:
        FileNotFoundError: the Inception weights or ``ref`` are missing (the run refuses to start).
        ValueError: ``ref`` lacks ``mu`` / ``sigma``, or holds statistics of other than 2048-d features.
    """
    if not Path(ref).is_file():
        raise FileNotFoundError(f"reference statistics {str(ref)!r} not found "
                                f"(make them with `python -m full.evaluate ref-stats`)")
    mu, sigma = load_statistics(ref)
    extractor = build_inception(inception_weights, device).eval()   # its file checked before the dimension
    load_statistics(ref, dim=POOL_DIM)   # statistics of other features would fail only at the first FID
    expected = reference_info(ref).resolution
    if resolution is not None and expected is not None and expected != resolution:
        raise ValueError(f"{str(ref)!r} holds statistics of {expected} px images but the model makes {resolution} px "
                         f"samples: FID across resolutions is meaningless (python -m full.evaluate ref-stats "
                         f"--resolution {resolution})")
    return FIDReference(extractor, mu, sigma)


def gather_rows(rows: torch.Tensor, counts: list[int], *, rank: int, world_size: int) -> torch.Tensor | None:
    """Concatenate every rank's ``rows`` (counts[r], D) on rank 0 in rank order; None on other ranks.

    Rows are padded to the largest count for ``dist.gather`` (equal shapes), then trimmed.
    """
    if world_size == 1:
        return rows
    padded = rows.new_zeros((max(counts), *rows.shape[1:]))
    padded[:len(rows)] = rows
    pieces = [torch.empty_like(padded) for _ in range(world_size)] if rank == 0 else None
    dist.gather(padded, pieces, dst=0)
    if rank != 0:
        return None
    return torch.cat([piece[:count] for piece, count in zip(pieces, counts)])


def in_training_fid(model: torch.nn.Module, reference: FIDReference, *, num: int, omega: float, t_min: float,
                    t_max: float, seed: int = 0, batch_size: int = 64, is_splits: int = IS_SPLITS,
                    rank: int = 0, world_size: int = 1) -> dict | None:
    """FID / IS of ``num`` one-step samples of ``model`` (all ranks sample, rank 0 scores).

    The samples are full.sample's (indices 0..num-1 split contiguously over ranks); the Inception
    features are float32, gathered losslessly, so the result equals the offline evaluation.
    Returns ``{"fid", "is_mean", "is_std", "num"}`` on rank 0, None elsewhere.
    """
    if num < MIN_FID_SAMPLES:
        raise ValueError(f"FID needs at least {MIN_FID_SAMPLES} samples, got {num}")
    was_training = model.training
    model.eval()
    indices = shard(num, rank, world_size)
    batches = (images for _, _, images in iter_samples(model, indices, omega=omega, t_min=t_min, t_max=t_max,
                                                       seed=seed, batch_size=batch_size, progress=False))
    features = extract_features(reference.extractor, batches, total=len(indices), progress=False)
    model.train(was_training)
    device = next(reference.extractor.parameters()).device
    # The extractor's outputs are float32: gathering in float32 loses nothing.
    local = torch.from_numpy(np.concatenate([features.pool, features.logits], axis=1)).float().to(device)
    counts = [len(shard(num, r, world_size)) for r in range(world_size)]
    gathered = gather_rows(local, counts, rank=rank, world_size=world_size)
    if gathered is None:
        return None
    gathered = gathered.cpu().double().numpy()
    pool, logits = gathered[:, :features.pool.shape[1]], gathered[:, features.pool.shape[1]:]
    return metrics_from_features(pool, logits, reference.mu, reference.sigma, is_splits=min(is_splits, num))


def append_jsonl(path: str | Path, record: dict) -> None:
    """Append one JSON line to ``path``; the whole file is rewritten through a temp file and a rename."""
    path = Path(path)
    previous = path.read_bytes() if path.exists() else b""
    if previous and not previous.endswith(b"\n"):
        previous += b"\n"
    atomic_write(path, lambda file: file.write(previous + (json.dumps(record) + "\n").encode()))


# --------------------------------------------------------------------------------------------
# TensorBoard
# --------------------------------------------------------------------------------------------

class TensorBoard:
    """``torch.utils.tensorboard.SummaryWriter`` into ``run_dir/tensorboard``: scalars and grid images.

    Event files are appended by TensorBoard's own writer (they are streams, not renamed into place).
    """

    def __init__(self, run_dir: str | Path, purge_step: int | None = None):
        """``purge_step``: on resume, the checkpoint's step; TensorBoard hides what an earlier process
        logged from that step on (those steps are trained again)."""
        from torch.utils.tensorboard import SummaryWriter   # imported only when --tensorboard is on

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR), purge_step=purge_step)

    def scalars(self, group: str, record: dict, step: int) -> None:
        """Every finite number of ``record`` (but "step") as ``group/name``."""
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                self.writer.add_scalar(f"{group}/{name}", value, global_step=step)
        self.writer.flush()   # a live TensorBoard sees each log line, not one every two minutes

    def image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """uint8 (C, H, W) image (a :func:`tile`)."""
        self.writer.add_image(tag, image, global_step=step, dataformats="CHW")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


__all__ = ["sampling_settings", "default_fid_ema", "broadcast_weights", "GridInputs", "grid_classes", "make_grid_inputs", "load_or_make_grid_inputs", "grid_samples", "tile",
           "grid_path", "write_sample_grids", "FIDReference", "prepare_fid", "gather_rows", "in_training_fid",
           "append_jsonl", "TensorBoard"]
