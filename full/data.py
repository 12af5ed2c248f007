"""ImageNet-style data for the pMF trainer: ADM center crop, [-1, 1], no flip, global-batch sharding.

* :func:`center_crop_arr` -- the ADM (guided-diffusion) preprocessing used by pMF/JiT/DiT: halve the
  image with a box filter while it is at least twice the target, resize so the short side equals
  the target with bicubic filtering, then crop the center square.
* :func:`to_rgb` -- any image PIL opens (16-bit, palette, alpha, grayscale, CMYK) as 8-bit RGB.
* :class:`ImageFolderDataset` -- ``root/<class>/<image>`` folders, classes sorted by name -> labels
  0..K-1 (torchvision's ImageFolder convention), images as (C, H, W) float32 in [-1, 1]; an unreadable
  file is skipped with a warning naming it.
* :class:`SyntheticDataset` -- random smooth images with labels, for tests and ``--data synthetic``.
* :class:`GlobalBatchSampler` -- a distributed sampler that shards each *global* batch contiguously
  across ranks, so rank k sees rows [k*b, (k+1)*b) of the same global batch a single process sees.
"""
from __future__ import annotations

import os
import signal
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""File suffixes (lower case) read as images; everything else in a class folder is ignored."""
PIXEL_MAX = 255.0
SIXTEEN_BIT_MAX = 65535.0
"""Full scale of 16-bit images (PIL modes ``I;16*``; mode ``I`` is read as 16-bit too, as PNG decoders give it)."""
ALPHA_BACKGROUND = (255, 255, 255)
"""Transparent pixels are composited over white (what an image viewer shows), not dropped to their hidden RGB."""
MAX_SKIPPED_IN_A_ROW = 16
"""Unreadable files tried in a row before giving up: a few broken files are skipped, a wrong folder is an error."""
UNREADABLE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
"""What PIL raises for a truncated, corrupt or non-image file (UnidentifiedImageError is an OSError)."""


class UnreadableImageError(ValueError):
    """An image file PIL cannot decode; the message names the file."""


# ----------------------------------------------------------------------------- preprocessing

def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM center crop: box-downsample by 2 while ``min(size) >= 2 * image_size``, bicubic-resize the
    short side to ``image_size``, crop the central ``image_size`` square.

    The repeated halving with a box filter anti-aliases large images before the bicubic step
    (as in guided-diffusion's ``center_crop_arr``, used by ADM, DiT, JiT and pMF).

    Args:
        pil_image: any PIL image.  image_size: side of the output, >= 1.
    Returns:
        PIL image of size (image_size, image_size), same mode as the input.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(side // 2 for side in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(side * scale) for side in pil_image.size), resample=Image.BICUBIC)
    array = np.asarray(pil_image)
    top = (array.shape[0] - image_size) // 2
    left = (array.shape[1] - image_size) // 2
    return Image.fromarray(array[top:top + image_size, left:left + image_size])


def to_rgb(pil_image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB on one scale: 0..255 means black..white whatever the file's bit depth.

    ``convert("RGB")`` alone clips 16-bit grey values (0..65535) to 255, so a 16-bit PNG comes out
    nearly white; here they are rescaled (``round(v / 257)``). Palette images go through their
    palette (and transparency), alpha is composited over :data:`ALPHA_BACKGROUND`, float images
    (mode ``F``) are read as 0..1.
    """
    mode = pil_image.mode
    if mode.startswith("I") or mode == "F":
        array = np.asarray(pil_image, dtype=np.float64)
        scale = 1.0 if mode == "F" else SIXTEEN_BIT_MAX
        grey = np.clip(np.round(array / scale * PIXEL_MAX), 0, PIXEL_MAX).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "P":
        pil_image = pil_image.convert("RGBA" if "transparency" in pil_image.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa"):
        pil_image = pil_image.convert("RGBA")
    if pil_image.mode == "RGBA":
        background = Image.new("RGB", pil_image.size, ALPHA_BACKGROUND)
        background.paste(pil_image, mask=pil_image.getchannel("A"))
        return background
    return pil_image if pil_image.mode == "RGB" else pil_image.convert("RGB")


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """Read an image file as 8-bit RGB (:func:`to_rgb`); UnreadableImageError names a file PIL cannot decode."""
    try:
        with Image.open(path) as image:
            image.load()                  # decode now: a truncated file fails here, naming it, not later
            rgb = to_rgb(image)
            return rgb.copy() if rgb is image else rgb   # detached from the file that is closed next
    except UNREADABLE_ERRORS as error:
        raise UnreadableImageError(f"cannot read image {str(path)!r}: {type(error).__name__}: {error}") from None


def pil_to_tensor(pil_image: Image.Image, channels: int = 3) -> torch.Tensor:
    """PIL image (any mode, via :func:`to_rgb`) -> float32 (C, H, W) in [-1, 1] (``x = value / 127.5 - 1``)."""
    pil_image = to_rgb(pil_image) if channels == 3 else to_rgb(pil_image).convert("L")
    array = np.asarray(pil_image, dtype=np.float32)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array / (PIXEL_MAX / 2.0) - 1.0).permute(2, 0, 1).contiguous()


# ----------------------------------------------------------------------------- datasets

class ImageFolderDataset(Dataset):
    """``root/<class_name>/**/<image>``; classes sorted by name get labels 0..K-1; no flip.

    Args:
        root: folder with one sub-folder per class.  resolution: output side (ADM center crop).
        channels: 3 (RGB) or 1 (grayscale).
    An image PIL cannot decode is skipped with a warning naming it: the item is the next readable
    image of the folder (with that image's label), so a few broken files out of a million do not stop
    a run, and the substitution is deterministic (the same on every rank and after a resume).

    Raises:
        FileNotFoundError: ``root`` is missing, or no class folder holds an image.
        UnreadableImageError: ``MAX_SKIPPED_IN_A_ROW`` files in a row cannot be read.
    """

    def __init__(self, root: str | os.PathLike, resolution: int, channels: int = 3):
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"data folder {str(root)!r} does not exist (expected an ImageNet-style "
                                    f"folder: root/<class>/<image>.JPEG)")
        self.classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
        self.samples: list[tuple[str, int]] = []
        for label, name in enumerate(self.classes):
            for path in sorted((root / name).rglob("*")):
                if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                    self.samples.append((str(path), label))
        if not self.samples:
            raise FileNotFoundError(
                f"data folder {str(root)!r} holds no images: expected root/<class>/<image> with suffix "
                f"in {sorted(set(IMAGE_EXTENSIONS))} ({len(self.classes)} class folders found)")
        self.root, self.resolution, self.channels = str(root), resolution, channels
        self.num_classes = len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> tuple[Image.Image, int]:
        """(center-cropped RGB image, label) of item ``index``, skipping unreadable files (see the class)."""
        for offset in range(min(MAX_SKIPPED_IN_A_ROW, len(self.samples))):
            path, label = self.samples[(index + offset) % len(self.samples)]
            try:
                return center_crop_arr(open_rgb(path), self.resolution), label
            except UnreadableImageError as error:
                warnings.warn(f"skipping it: {error}", stacklevel=2)
        raise UnreadableImageError(f"{min(MAX_SKIPPED_IN_A_ROW, len(self.samples))} images in a row from "
                                   f"{self.samples[index][0]!r} cannot be read: is {self.root!r} an image folder?")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self.read(index)
        return pil_to_tensor(image, self.channels), label


class SyntheticDataset(Dataset):
    """A fixed set of ``n`` smooth random images with labels: a low-frequency Gaussian field per
    image (bilinear upsampling of a 4x4 grid), squashed into [-1, 1] by tanh. Deterministic in ``seed``.

    Used by the tests and by ``--data synthetic`` for smoke runs without ImageNet.
    """

    LOW_RES = 4  # side of the random grid that is upsampled: smooth images a small net can learn

    def __init__(self, n: int, resolution: int, *, channels: int = 3, num_classes: int = 10, seed: int = 0):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        generator = torch.Generator().manual_seed(seed)
        grid = torch.randn(n, channels, self.LOW_RES, self.LOW_RES, generator=generator)
        images = torch.nn.functional.interpolate(grid, size=(resolution, resolution), mode="bilinear",
                                                 align_corners=False)
        self.images = torch.tanh(images)                                    # (n, C, res, res)
        self.labels = torch.randint(0, num_classes, (n,), generator=generator)
        self.label_list = self.labels.tolist()   # Python ints: fetching an item reads no tensor
        self.num_classes = num_classes

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], self.label_list[index]


# ----------------------------------------------------------------------------- sharding

class GlobalBatchSampler(Sampler[int]):
    """Distributed sampler over whole global batches, resumable mid-epoch.

    Epoch ``k`` uses the permutation ``randperm(N, generator=seed + k)`` (identical on every rank);
    it is cut into ``N // global_batch`` global batches (the incomplete last one is dropped) and
    rank ``rank`` takes rows ``[rank * b, (rank + 1) * b)`` of each, ``b = global_batch / world_size``.

    # Deviation: torch's DistributedSampler deals indices round-robin (rank k gets k, k+W, ...),
    # so a rank's rows are not a contiguous slice of the single-process batch. Contiguous slices
    # let the per-step randomness be drawn for the global batch and sliced per rank, which makes a
    # run on N processes reproduce the 1-process run (tests/test_full_distributed.py).

    Args:
        dataset_size: N.  global_batch: rows per step over all ranks.  rank, world_size: this shard.
        seed: base seed of the permutations.  epoch: epoch index.  start_batch: global batches of
        this epoch already consumed (resume).
    """

    def __init__(self, dataset_size: int, global_batch: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0, epoch: int = 0, start_batch: int = 0):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
        if dataset_size < global_batch:
            raise ValueError(f"the dataset has {dataset_size} images, fewer than one global batch "
                             f"({global_batch}); lower --batch-size")
        self.dataset_size, self.global_batch = dataset_size, global_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch, self.start_batch = epoch, start_batch
        self.local_batch = global_batch // world_size

    @staticmethod
    def batches_per_epoch(dataset_size: int, global_batch: int) -> int:
        return dataset_size // global_batch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.dataset_size, generator=generator).numpy()   # host indices, read per batch
        for batch in range(self.start_batch, self.batches_per_epoch(self.dataset_size, self.global_batch)):
            first = batch * self.global_batch + self.rank * self.local_batch
            yield from order[first:first + self.local_batch].tolist()

    def __len__(self) -> int:
        return (self.batches_per_epoch(self.dataset_size, self.global_batch) - self.start_batch) * self.local_batch


def make_loader(dataset: Dataset, global_batch: int, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                epoch: int = 0, start_batch: int = 0, num_workers: int = 0) -> DataLoader:
    """DataLoader over one epoch (from ``start_batch``) of this rank's shard; yields
    ``(x (b, C, H, W) float32 in [-1, 1], y (b,) int64)`` with ``b = global_batch / world_size``."""
    sampler = GlobalBatchSampler(len(dataset), global_batch, rank=rank, world_size=world_size, seed=seed,
                                 epoch=epoch, start_batch=start_batch)
    return DataLoader(dataset, batch_size=sampler.local_batch, sampler=sampler, num_workers=num_workers,
                      drop_last=True, pin_memory=torch.cuda.is_available(),
                      persistent_workers=False, worker_init_fn=ignore_stop_signals if num_workers else None)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers ignore SIGINT / SIGTERM: Ctrl-C and a cluster's SIGTERM reach the whole process
    group, and the main process must survive them to save a checkpoint (it then shuts the workers down)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def infinite_batches(dataset: Dataset, global_batch: int, *, rank: int, world_size: int, seed: int,
                     epoch: int, start_batch: int, num_workers: int = 0
                     ) -> Iterator[tuple[int, int, tuple[torch.Tensor, torch.Tensor]]]:
    """Endless stream of ``(epoch, batch_index_in_epoch, (x, y))``, starting at (epoch, start_batch).

    The (epoch, batch index) pair *after* a yielded batch is what a checkpoint stores to resume.

    Raises:
        ValueError: the dataset holds fewer images than one global batch (it would never yield).
    """
    per_epoch = GlobalBatchSampler.batches_per_epoch(len(dataset), global_batch)
    if per_epoch < 1:   # checked here, not in the sampler: the loop below would otherwise spin forever
        raise ValueError(f"the data has {len(dataset)} images, fewer than one global batch ({global_batch}); "
                         f"lower --batch-size")
    while True:
        if start_batch < per_epoch:
            loader = make_loader(dataset, global_batch, rank=rank, world_size=world_size, seed=seed,
                                 epoch=epoch, start_batch=start_batch, num_workers=num_workers)
            for offset, batch in enumerate(loader):
                yield epoch, start_batch + offset, batch
        epoch, start_batch = epoch + 1, 0
