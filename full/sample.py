"""One-step class-conditional sampling from a pMF checkpoint: PNG folder, .npz and a preview grid.

    python -m full.sample --ckpt run/ckpt.pt --per-class 50 --out samples/       # FID-50K set
    torchrun --nproc_per_node 8 -m full.sample --ckpt run/ckpt.pt --num 50000 --out samples/
    python -m full.sample --official-ckpt pMF-B-16.pt --preset pMF-B/16 --out samples/   # the authors' weights
    python -m full.sample --ckpt model.safetensors --out samples/     # inference weights of python -m full.export
    python -m full.sample --ckpt run/ckpt.pt --class 207 360 387 --per-class 8 --out samples/   # chosen classes

Every image costs one network call (pMF Alg. 2):  ``x = z_1 - u(z_1, 0, 1) = x_theta(z_1, 0, 1 | c)``,
z_1 = s * eps with the preset's noise scale s, c = (y, omega, t_min, t_max). Sample i has label
``y_i = i mod K`` (any prefix is class-balanced; ``--per-class k`` gives exactly k per class; with
``--class Y_0 ... Y_n-1`` it is ``Y_(i mod n)``) and
noise from a generator seeded by the pair (seed, i), so the images depend on neither the batch size nor the
number of processes. Defaults for omega and the interval are the preset's best settings (pMF §4 and
App. A); the EMA is the preset's best too when the run kept it, else the kept one nearest to it (a note
says so). Samples whose pixels are nearly all 0 or 255 (a diverged network) are refused.

Output folder: ``images/000000.png ...``, ``samples.npz`` (``arr_0`` uint8 (N, H, W, C) and
``labels`` (N,), the layout of the ADM evaluation suite), ``grid.png`` and ``sample_config.json``.
A folder that already holds any of these is refused (a later FID would count stale images) unless
``--overwrite``, which first deletes them.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist
import torchvision
from PIL import Image
from tqdm import tqdm

import pmf_ref as P

from . import cli
from .distributed import barrier, init_distributed
from .ema import format_half_life
from .io import TEMP_PREFIX, atomic_write, unwritable_reason, write_json
from .model import core_fns, make_cond
from .presets import PRESETS, SAMPLING

PIXEL_HALF_RANGE = 127.5  # uint8 = round((x + 1) * 127.5), x in [-1, 1]
SATURATED_FRACTION = 0.99
"""Samples whose pixel values are more than this share 0 or 255 are refused (full.evaluate refuses them too)."""
GRID_PADDING = 2
FORMATS = ("png", "npz")


@dataclass(frozen=True)
class SampleConfig:
    """What to sample and where to write it (built by ``main`` or by a caller)."""
    out: str                              # output folder
    num: int                              # number of images N
    omega: float                          # guidance scale, >= 1 (1 = no guidance)
    t_min: float                          # guidance interval [t_min, t_max] within [0, 1]
    t_max: float
    seed: int = 0
    batch_size: int = 64                  # per process; the images do not depend on it
    formats: tuple[str, ...] = FORMATS    # "png" folder and/or "npz"
    grid: int = 64                        # images in grid.png (0: no grid)
    classes: tuple[int, ...] | None = None  # sample only these classes (None: all, y_i = i mod K)
    progress: bool = True
    overwrite: bool = False               # delete earlier outputs in ``out`` instead of refusing


# --------------------------------------------------------------------------------------------
# Labels, noise, one network call
# --------------------------------------------------------------------------------------------

def class_labels(indices: torch.Tensor, num_classes: int, classes: tuple[int, ...] | None = None) -> torch.Tensor:
    """Class-balanced labels for global sample indices (B,) -> (B,) long: ``y_i = i mod K``, or with
    ``classes`` (``--class 207 360 ...``) ``y_i = classes[i mod len(classes)]``."""
    if classes is None:
        return indices.long() % num_classes
    table = torch.tensor(classes, dtype=torch.long)
    return table[indices.long() % len(classes)]


def sample_noise(indices: torch.Tensor, shape: tuple[int, ...], *, seed: int, noise_scale: float) -> torch.Tensor:
    """z_1 = s * eps_i, eps_i ~ N(0, I) from a generator seeded by the pair (seed, i) alone.

    Each row uses numpy's PCG64 keyed by ``SeedSequence([seed, i])``: every pair gets its own
    stream. (torch's CPU generator is not used because it keeps only the low 32 bits of its seed,
    so no packing of (seed, i) into one torch seed keeps all pairs apart.) Drawn on the CPU, so the
    noise is the same on any device.

    Args:
        indices: global sample indices (B,), each >= 0.  shape: (C, H, W) of one image.
    Returns:
        (B, C, H, W) float32 on the CPU; row b depends only on (seed, indices[b]).
    """
    rows = [np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, index])))
            .standard_normal(shape, dtype=np.float32) for index in indices.tolist()]
    return noise_scale * torch.from_numpy(np.stack(rows))


@torch.no_grad()
def generate(model: torch.nn.Module, e: torch.Tensor, y: torch.Tensor, *, omega: float, t_min: float,
             t_max: float) -> torch.Tensor:
    """One-step sample ``x = z_1 - u_theta(z_1, 0, 1)``, z_1 = e (pMF Alg. 2), through
    ``pmf_ref.sample_one_step`` and the model's adapter ``full.model.core_fns`` (x- or u-prediction is the
    model's). The one 1-NFE sampler of a PMFViT: ``full.sample``, the monitor's grids and FID, digits.

    Args:
        model: a PMFViT.  e: noise z_1, already scaled by the noise scale, (B, C, H, W).  y: labels (B,).
        omega: guidance scale >= 1.  t_min, t_max: guidance interval, 0 <= t_min <= t_max <= 1.
    Returns:
        x, (B, C, H, W), nominally in [-1, 1].
    """
    if not (isinstance(omega, torch.Tensor) or omega >= 1):      # NaN fails too
        raise ValueError(f"omega must be >= 1 (1 = no guidance), got {omega}")
    if not (isinstance(t_min, torch.Tensor) or isinstance(t_max, torch.Tensor) or 0 <= t_min <= t_max <= 1):
        raise ValueError(f"the guidance interval must satisfy 0 <= t_min <= t_max <= 1, got [{t_min}, {t_max}]")
    return P.sample_one_step(core_fns(model, make_cond(y, omega, t_min, t_max)).u, e)


class NonFiniteSamplesError(ValueError):
    """The network produced NaN / inf images (a diverged run); nothing is written for them."""


class SaturatedSamplesError(NonFiniteSamplesError):
    """Nearly every pixel value of the samples so far is 0 or 255 (a diverged run whose outputs lie far
    outside [-1, 1]); nothing more is written. Threshold: ``full.evaluate.SATURATED_FRACTION``."""


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> uint8 ``round((x + 1) * 127.5)`` clipped to [0, 255]."""
    return ((x + 1) * PIXEL_HALF_RANGE).round().clamp(0, 255).to(torch.uint8)


def iter_samples(model: torch.nn.Module, indices: torch.Tensor, *, omega: float, t_min: float, t_max: float,
                 seed: int, batch_size: int, progress: bool = True, classes: tuple[int, ...] | None = None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Generate the samples with the given global indices, ``batch_size`` at a time (labels: :func:`class_labels`).

    Yields:
        (indices (B,), labels (B,), images uint8 (B, C, H, W) on the CPU).
    Raises:
        NonFiniteSamplesError: the network returned NaN / inf (uint8 would turn it into blank images).
    """
    device = next(model.parameters()).device
    shape = (model.channels, model.resolution, model.resolution)
    with tqdm(total=len(indices), unit="img", desc="sampling", disable=not progress) as bar:
        for batch in indices.split(batch_size):
            y = class_labels(batch, model.num_classes, classes)
            z_1 = sample_noise(batch, shape, seed=seed, noise_scale=model.noise_scale)
            x = generate(model, z_1.to(device), y.to(device), omega=omega, t_min=t_min, t_max=t_max)
            finite = torch.isfinite(x).flatten(1).all(dim=1)
            if not bool(finite.all()):
                raise NonFiniteSamplesError(
                    f"the network returned NaN or inf for sample {int(batch[~finite.cpu()][0])} (and "
                    f"{int((~finite).sum()) - 1} more of this batch): its weights are finite but diverged; "
                    f"use an earlier checkpoint")
            bar.update(len(batch))
            yield batch, y, to_uint8(x).cpu()


# --------------------------------------------------------------------------------------------
# Writing: PNGs, a shared .npy assembled into the .npz, the grid
# --------------------------------------------------------------------------------------------

def _pil(image: torch.Tensor) -> Image.Image:
    """uint8 (C, H, W) -> PIL image (mode L or RGB)."""
    array = image.permute(1, 2, 0).numpy()
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


def save_png(image: torch.Tensor, path: Path, *, fsync: bool = True) -> None:
    atomic_write(path, lambda file: _pil(image).save(file, format="PNG"), fsync=fsync)


def save_grid(images: torch.Tensor, path: Path) -> None:
    """A near-square grid of uint8 images (B, C, H, W) as one PNG."""
    grid = torchvision.utils.make_grid(images, nrow=math.ceil(math.sqrt(len(images))),
                                       padding=GRID_PADDING, pad_value=255)
    save_png(grid, path)


def _npz_from_npy(images_npy: Path, labels: np.ndarray, path: Path) -> None:
    """Zip the (possibly huge) images .npy as ``arr_0`` with ``labels`` into an .npz, streaming."""
    def write(file):
        with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            archive.write(images_npy, arcname="arr_0.npy")
            with archive.open("labels.npy", "w", force_zip64=True) as entry:
                np.lib.format.write_array(entry, labels)
    atomic_write(path, write)


OWNED_FILES = ("samples.npz", "grid.png", "sample_config.json", ".arr_0.npy.partial")
PNG_NAME = re.compile(r"^\d{6,}\.png$")


class OutputExistsError(ValueError):
    """The output folder holds earlier samples; the message says what and how to proceed."""


def earlier_outputs(out: Path) -> list[Path]:
    """The files of an earlier ``sample_to_folder`` in ``out``: images/NNNNNN.png, the .npz, grid, config."""
    found = [out / name for name in OWNED_FILES if (out / name).exists()]
    images = out / "images"
    if images.is_dir():
        found += sorted(path for path in images.iterdir() if PNG_NAME.match(path.name))
    return found


def prepare_output_folder(out: Path, *, overwrite: bool) -> None:
    """Refuse (OutputExistsError) a folder with earlier samples, or with ``overwrite`` delete them.

    Foreign image files in ``out/images`` are refused even with ``overwrite``: ``full.evaluate`` scores
    every image in that folder, and this function only deletes what it wrote.
    """
    from .data import IMAGE_EXTENSIONS

    images = out / "images"
    foreign = sorted(path for path in images.iterdir() if path.suffix.lower() in IMAGE_EXTENSIONS
                     and not PNG_NAME.match(path.name)) if images.is_dir() else []
    if foreign:
        raise OutputExistsError(f"--out: {str(images)!r} holds image files not written by full.sample (e.g. "
                                f"{foreign[0].name!r}); full.evaluate would score them too -- use another --out")
    earlier = earlier_outputs(out)
    if earlier and not overwrite:
        raise OutputExistsError(f"--out: {str(out)!r} already holds samples ({len(earlier)} files, e.g. "
                                f"{earlier[0].name!r}); pass --overwrite to delete them first, or use another --out")
    for path in earlier:
        path.unlink()
    for temp in out.glob(f"{TEMP_PREFIX}*"):   # atomic_write temp files of a killed earlier run
        temp.unlink()
    if images.is_dir():
        for temp in images.glob(".*.tmp"):
            temp.unlink()


def shard(num: int, rank: int, world_size: int) -> torch.Tensor:
    """Contiguous global indices [rank * N / W, (rank + 1) * N / W) of this process."""
    return torch.arange(rank * num // world_size, (rank + 1) * num // world_size)


def sample_to_folder(model: torch.nn.Module, cfg: SampleConfig, *, rank: int = 0, world_size: int = 1,
                     extra_info: dict | None = None) -> Path:
    """Sample ``cfg.num`` images into ``cfg.out`` (this process's share when ``world_size > 1``).

    Every process writes its own PNGs and its rows of one shared ``.npy`` (memory-mapped, so 50K
    images at 512 px never sit in memory); rank 0 then packs the ``.npz`` and writes the grid.
    Returns the output folder.
    """
    out = Path(cfg.out)
    images_npy = out / ".arr_0.npy.partial"
    shape = (model.channels, model.resolution, model.resolution)
    if not cfg.overwrite and earlier_outputs(out):   # every rank checks, so no rank waits for a failed one
        prepare_output_folder(out, overwrite=False)
    barrier()   # every rank has checked before rank 0 writes anything
    if rank == 0:
        prepare_output_folder(out, overwrite=cfg.overwrite)
        (out / "images" if "png" in cfg.formats else out).mkdir(parents=True, exist_ok=True)
        if "npz" in cfg.formats:   # created once, before any process writes its rows into it
            np.lib.format.open_memmap(images_npy, mode="w+", dtype=np.uint8,
                                      shape=(cfg.num, shape[1], shape[2], shape[0])).flush()
    barrier()
    rows = np.lib.format.open_memmap(images_npy, mode="r+") if "npz" in cfg.formats else None
    grid_images = []
    saturated, values = 0, 0
    for indices, _, images in iter_samples(model, shard(cfg.num, rank, world_size), omega=cfg.omega,
                                           t_min=cfg.t_min, t_max=cfg.t_max, seed=cfg.seed,
                                           batch_size=cfg.batch_size, progress=cfg.progress and rank == 0,
                                           classes=cfg.classes):
        saturated += int(((images == 0) | (images == 255)).sum())
        values += images.numel()
        if saturated > SATURATED_FRACTION * values:   # checked before this batch is written
            raise SaturatedSamplesError(
                f"{100 * saturated / values:.1f}% of the pixel values of samples 0..{int(indices[-1])} are 0 or 255: "
                f"the network's outputs lie far outside [-1, 1] (a diverged run); nothing more was written -- "
                f"use an earlier checkpoint")
        if "png" in cfg.formats:
            for index, image in zip(indices.tolist(), images):
                save_png(image, out / "images" / f"{index:06d}.png", fsync=False)   # renamed whole, not synced
        if rows is not None:
            rows[indices.numpy()] = images.permute(0, 2, 3, 1).numpy()   # (B, H, W, C)
        if rank == 0 and len(grid_images) * cfg.batch_size < cfg.grid:
            grid_images.append(images)
    if rows is not None:
        rows.flush()
        del rows
    barrier()   # every row is on disk before rank 0 packs the archive
    if rank == 0:
        if "npz" in cfg.formats:
            labels = class_labels(torch.arange(cfg.num), model.num_classes, cfg.classes).numpy()
            _npz_from_npy(images_npy, labels, out / "samples.npz")
            images_npy.unlink()
        if cfg.grid > 0 and grid_images:
            save_grid(torch.cat(grid_images)[:cfg.grid], out / "grid.png")
        info = {**dataclasses.asdict(cfg), **(extra_info or {}), "world_size": world_size,
                "num_classes": model.num_classes, "noise_scale": model.noise_scale}
        write_json(out / "sample_config.json", info)
    barrier()
    return out


# --------------------------------------------------------------------------------------------
# Checkpoint loading and the command line
# --------------------------------------------------------------------------------------------

def sampling_defaults(preset: str) -> dict:
    """The preset's best one-step settings: omega, t_min, t_max, EMA half-life (kimg, as str)."""
    best = SAMPLING[preset]
    return dict(omega=best.omega, t_min=best.t_min, t_max=best.t_max, ema=str(best.ema_kimg))


def checkpoint_info(path: str) -> tuple[str, list[str]]:
    """(preset name, EMA keys) of a ``full.train`` checkpoint or a ``full.export`` file (its one EMA);
    CheckpointError for an unusable file."""
    from .checkpoint import CheckpointError, load_checkpoint
    from .export import ExportError, is_export, read_export_config

    if is_export(path):
        try:
            config = read_export_config(path)
        except ExportError as error:
            raise CheckpointError(str(error)) from None
        return config["model"]["preset"], [config["ema"]]
    # mmap: read the config without pulling every tensor (EMAs, optimizer) into memory.
    checkpoint = load_checkpoint(path, mmap=True)
    return checkpoint["config"]["model"]["preset"], sorted(checkpoint.get("ema", {}), key=float)


def normalize_ema(ema: str) -> str:
    """"raw" or the checkpoint key of a half-life: "2000.0" and "2000" name the same EMA (ValueError if neither)."""
    if ema == "raw":
        return ema
    try:
        return format_half_life(float(ema))
    except ValueError:
        raise ValueError(f"--ema must be a half-life in kimg or 'raw', got {ema!r}") from None


def load_for_sampling(path: str, ema: str | None, device: torch.device) -> tuple[torch.nn.Module, str, str]:
    """(model in eval mode on ``device``, preset name, EMA key used) from a ``full.train`` checkpoint or a
    ``full.export`` file.

    ``ema`` is the EMA half-life key ("2000"), "raw" for the raw weights, or None for the preset's best
    when the run kept it, else the kept EMA nearest to it (``full.export.choose_ema``).
    Raises ``full.export.MissingEMAError`` (a KeyError naming --ema and the EMAs kept) when the checkpoint
    lacks it, and ``full.checkpoint.CheckpointError`` for an unusable file or non-finite weights.
    """
    from .checkpoint import CheckpointError, load_model  # the trainer's format, read only here
    from .export import ExportError, MissingEMAError, choose_ema, is_export, load_exported

    if is_export(path):   # one EMA's inference weights: --ema may only name that one
        try:
            model, config = load_exported(path, device)
        except ExportError as error:
            raise CheckpointError(str(error)) from None
        if ema is not None and normalize_ema(ema) != config["ema"]:
            raise MissingEMAError(f"--ema {ema}: {str(path)!r} was exported from EMA {config['ema']!r} only; "
                                  f"omit --ema, or export another with python -m full.export --ema {ema}")
        return model, config["model"]["preset"], config["ema"]
    preset, kept = checkpoint_info(path)
    ema = choose_ema(preset, kept, ema)
    model = load_model(path, None if ema == "raw" else ema)
    return model.to(device).eval(), preset, ema


def load_official_for_sampling(path: str, preset: str, device: torch.device) -> torch.nn.Module:
    """The authors' released inference weights (``full.official``) as a PMFViT in eval mode on ``device``.

    Raises:
        full.official.OfficialCheckpointError: an unusable file, or weights that hold NaN / inf.
    """
    from .checkpoint import first_non_finite
    from .official import OfficialCheckpointError, load_official_checkpoint   # lazy: only this path needs it

    model = load_official_checkpoint(path, preset)
    bad = first_non_finite(model.state_dict())
    if bad is not None:
        raise OfficialCheckpointError(f"{path}: weight {bad!r} holds NaN or inf")
    return model.to(device).eval().requires_grad_(False)


def build_parser() -> argparse.ArgumentParser:
    parser = cli.Parser("python -m full.sample", __doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--ckpt", default=None, help="checkpoint written by full.train")
    source.add_argument("--official-ckpt", default=None, metavar="PATH",
                        help="one of the authors' released inference files (pMF-B-16.pt, ...); needs --preset; "
                             "sampled with the preset's best omega and interval unless given")
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="the preset of --official-ckpt (a full.train checkpoint records its own)")
    parser.add_argument("--ema", default=None,
                        help="EMA half-life in kimg (a key of the checkpoint's EMAs, e.g. 2000), or 'raw' for "
                             "the raw weights; default: the preset's best (B/16: 2000) if the run kept it, else "
                             "the kept EMA nearest to it")
    parser.add_argument("--omega", type=float, default=None,
                        help="guidance scale omega >= 1 (1 = unguided); default: the preset's best (B/16: 8.5)")
    parser.add_argument("--interval", type=cli.interval, metavar="TMIN,TMAX", default=None,
                        help="guidance interval, 0 <= TMIN <= TMAX <= 1; default: the preset's best (B/16: 0.1,0.7)")
    parser.add_argument("--class", dest="classes", type=int, nargs="+", default=None, metavar="Y",
                        help="sample only these class labels, e.g. --class 207 360 387 (image i gets the "
                             "(i mod n)-th); without it every class of the model")
    parser.add_argument("--num", type=int, default=None,
                        help="number of images N (labels i mod K, balanced to within one per class)")
    parser.add_argument("--per-class", type=int, default=None,
                        help="images per class k (N = k * number of classes); default 50 (FID-50K on ImageNet) "
                             "when --num is not given")
    cli.add_out(parser, None, "images/*.png, samples.npz, grid.png and sample_config.json")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the samples an earlier run wrote to --out (default: refuse such a folder)")
    parser.add_argument("--format", choices=["png", "npz", "both"], default="both",
                        help="write images/*.png, samples.npz (arr_0 uint8 NHWC, labels), or both")
    parser.add_argument("--seed", type=int, default=0, help="noise seed; sample i draws from a generator keyed by (seed, i)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per network call per process")
    parser.add_argument("--grid", type=int, default=64, help="images in grid.png (0: none)")
    cli.add_device(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def check_classes(classes: list[int], num_classes: int) -> str | None:
    """Why ``--class`` values do not fit a model of ``num_classes`` classes (labels 0..K-1), or None."""
    bad = [label for label in classes if not 0 <= label < num_classes]
    if bad:
        return (f"--class {bad[0]}: the model has {num_classes} classes, labels 0..{num_classes - 1} "
                f"(the null label {num_classes} is not a class)")
    if len(set(classes)) != len(classes):
        return f"--class lists a label twice ({classes}); give each class once (--per-class sets the count)"
    return None


def check_sampling_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Range checks shared with full.guidance_search; ``parser.error`` names the argument."""
    if args.omega is not None and not (math.isfinite(args.omega) and args.omega >= 1):
        parser.error(f"--omega must be a finite number >= 1, got {args.omega}")
    if args.interval is not None:
        t_min, t_max = args.interval
        if not 0 <= t_min <= t_max <= 1:
            parser.error(f"--interval needs 0 <= TMIN <= TMAX <= 1, got {t_min},{t_max}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.seed < 0 or args.seed >= 2 ** 31:
        parser.error(f"--seed must lie in [0, 2^31), got {args.seed}")
    if args.ckpt is not None and not (Path(args.ckpt).is_file() or (Path(args.ckpt) / "meta.pt").is_file()):
        parser.error(f"--ckpt {args.ckpt} is not a file (or a sharded checkpoint folder)")


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_sampling_args(parser, args)
    if args.num is not None and args.num < 1:
        parser.error(f"--num must be >= 1, got {args.num}")
    if args.per_class is not None and args.per_class < 1:
        parser.error(f"--per-class must be >= 1, got {args.per_class}")
    if args.grid < 0:
        parser.error(f"--grid must be >= 0, got {args.grid}")

    if args.official_ckpt is not None:
        if args.preset is None:
            parser.error("--official-ckpt needs --preset (e.g. --preset pMF-B/16 for pMF-B-16.pt)")
        if args.ema is not None:
            parser.error("--ema does not apply to --official-ckpt (the released files hold one set of weights)")
        if not Path(args.official_ckpt).is_file():
            parser.error(f"--official-ckpt {args.official_ckpt} is not a file")
    elif args.preset is not None:
        parser.error("--preset applies only to --official-ckpt (a full.train checkpoint records its preset)")
    problem = unwritable_reason(args.out, folder=True)
    if problem:
        parser.error(f"--out: {problem}")
    if not args.overwrite:                 # before loading a model: a stale folder fails in a second
        try:
            prepare_output_folder(Path(args.out), overwrite=False)
        except OutputExistsError as error:
            parser.error(str(error))

    from .checkpoint import CheckpointError

    cli.resolve_device(parser, args.device)   # a bad or absent device is an error line before any work
    rank, world_size, _, device = init_distributed(args.device)
    if args.official_ckpt is not None:
        from .official import OfficialCheckpointError

        try:
            model, preset, ema = load_official_for_sampling(args.official_ckpt, args.preset, device), args.preset, None
        except OfficialCheckpointError as error:
            parser.error(f"--official-ckpt: {error}")
    else:
        try:
            model, preset, ema = load_for_sampling(args.ckpt, args.ema, device)
        except CheckpointError as error:
            parser.error(f"--ckpt: {error}")
        except (KeyError, ValueError) as error:   # an absent EMA (the message lists those kept), or not a number
            parser.error(error.args[0])
    defaults = sampling_defaults(preset)
    classes = None
    if args.classes is not None:
        problem = check_classes(args.classes, model.num_classes)
        if problem:
            parser.error(problem)
        classes = tuple(args.classes)
    num_classes = len(classes) if classes is not None else model.num_classes
    per_class = args.per_class if args.per_class is not None or args.num is not None else 50
    num = args.num if args.num is not None else per_class * num_classes
    if per_class is not None and num != per_class * num_classes:
        parser.error(f"--num {num} disagrees with --per-class {per_class} x {num_classes} classes")
    t_min, t_max = args.interval if args.interval is not None else (defaults["t_min"], defaults["t_max"])
    cfg = SampleConfig(out=args.out, num=num, omega=args.omega if args.omega is not None else defaults["omega"],
                       t_min=t_min, t_max=t_max, seed=args.seed, batch_size=args.batch_size,
                       formats=FORMATS if args.format == "both" else (args.format,), grid=args.grid,
                       classes=classes, progress=not args.no_progress, overwrite=args.overwrite)
    extra = ({"official_ckpt": str(args.official_ckpt)} if args.official_ckpt is not None
             else {"ckpt": str(args.ckpt)})
    extra.update(ema=ema, preset=preset)
    try:
        out = sample_to_folder(model, cfg, rank=rank, world_size=world_size, extra_info=extra)
    except (OutputExistsError, NonFiniteSamplesError) as error:
        parser.error(str(error))
    except OSError as error:   # a full disk or a vanished folder: one line, not a traceback
        print(f"{parser.prog}: error: writing samples to {args.out} failed: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    if rank == 0:
        from .export import is_export

        if args.ckpt is not None and args.ema is None and ema != defaults["ema"] and not is_export(args.ckpt):
            print(f"note: the run did not keep EMA {defaults['ema']} (the preset's best); sampled "
                  f"{'the raw weights' if ema == 'raw' else 'EMA ' + ema} (choose with --ema)", file=sys.stderr)
        weights = "released weights" if ema is None else f"EMA {ema}"
        print(f"wrote {num} samples (omega {cfg.omega}, interval [{t_min}, {t_max}], {weights}) to {out}")
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
