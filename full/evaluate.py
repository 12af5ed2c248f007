"""FID and Inception Score of a sample set, and the reference statistics FID compares against.

    python -m full.evaluate ref-stats --data /data/imagenet/train --resolution 256 --out ref/   # ref/ref_stats.npz
    python -m full.evaluate --samples samples/samples.npz --ref ref/ref_stats.npz
    python -m full.evaluate --samples samples/images --ref ref/ref_stats.npz --out samples/   # + metrics.json

Samples: an .npz with ``arr_0`` uint8 (N, H, W, C) (what full.sample writes; the ADM evaluation
suite's layout) or a folder of image files. Reference statistics: an .npz with the mean (2048,) and
covariance (2048, 2048) of the Inception pool features, as published (full.fid.STATISTICS_KEYS):

* ours, from ``ref-stats`` (an ImageFolder with the trainer's ADM center crop,
  full.data.center_crop_arr): ``mu``, ``sigma``, ``num``, ``resolution`` and ``features`` (a random
  subset of the reference images' pool features, for precision / recall and KID);
* JiT's ``jit_in256_stats.npz`` / ``jit_in512_stats.npz`` (what the authors' torch evaluate.py uses):
  ``mu``, ``sigma``;
* the authors' JAX ``imagenet_<size>_fid_stats.npz``: ``ref_mu``, ``ref_sigma``;
* an ADM reference batch (``VIRTUAL_imagenet256_labeled.npz``): ``mu``, ``sigma`` and the images ``arr_0``
  (their features give precision / recall and KID).

``metrics.json`` holds FID, IS, precision, recall, KID (null when the reference holds neither features
nor images) and which reference was used (its path, keys, resolution, size). The paper reports
FID-50K against ImageNet-train statistics (pMF §5); below 10,000 samples FID is biased upwards (a
warning says so). Refused: a sample set whose resolution differs from the reference's (when the file
records it), statistics of another feature dimension, one sample, a constant or saturated set.

The Inception-v3 weights (torch-fidelity's TF port) are read from --inception-weights or the torch
hub cache, never downloaded; see full/fid.py.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from . import cli
from .data import IMAGE_EXTENSIONS, ImageFolderDataset, UnreadableImageError, open_rgb
from .io import write_json
from .sample import SATURATED_FRACTION as SAMPLE_SATURATED_FRACTION
from .fid import (IS_SPLITS, POOL_DIM, InceptionWeightsError, build_inception, extract_features,
                  feature_statistics, frechet_distance_from_features, inception_score, kernel_inception_distance,
                  load_reference_features, load_reference_images, load_statistics, open_npz, precision_recall,
                  reference_info, save_statistics)

METRICS_NAME = "metrics.json"      # python -m full.evaluate --out DIR
REF_STATS_NAME = "ref_stats.npz"   # python -m full.evaluate ref-stats --out DIR
UNBIASED_FID_SAMPLES = 10_000
"""Below this many samples FID is noticeably biased upwards (its bias falls like 1/N); a warning says so."""
SATURATED_FRACTION = SAMPLE_SATURATED_FRACTION
"""A sample set with more than this share of its pixel values at 0 or 255 is refused as saturated: what a
diverged network gives (its outputs, far outside [-1, 1], are clipped to the two ends). Real images, digits
upsampled bilinearly included, keep intermediate values at every edge."""
REF_FEATURES = 10_000
"""Pool features ``ref-stats`` keeps (a random subset) for precision / recall and KID (ADM's reference
batches hold 10,000 images)."""


@dataclass(frozen=True)
class EvalConfig:
    samples: str
    ref: str
    inception_weights: str | None = None   # None: the torch hub cache
    batch_size: int = 100
    is_splits: int = IS_SPLITS
    device: str = "cpu"
    progress: bool = True
    pr_kid: bool = True                    # precision / recall and KID, when the reference allows them


@dataclass(frozen=True)
class RefStatsConfig:
    data: str
    resolution: int
    out: str
    inception_weights: str | None = None
    batch_size: int = 100
    num_workers: int = 4
    max_images: int | None = None         # None: every image of the folder
    keep_features: int = REF_FEATURES     # pool features stored for precision / recall and KID (0: none)
    device: str = "cpu"
    progress: bool = True


# --------------------------------------------------------------------------------------------
# Reading sample sets
# --------------------------------------------------------------------------------------------

class SampleSetError(ValueError):
    """A sample set that cannot be scored (unreadable, malformed, or degenerate); the message names it."""


def _image_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS)


def _npz_images(path: Path) -> np.ndarray:
    """``arr_0`` of a samples .npz, checked: uint8 (N, H, W, 1 or 3)."""
    with open_npz(path) as data:
        if "arr_0" not in data.files:
            raise SampleSetError(f"{str(path)!r} has no 'arr_0' (uint8 images N x H x W x C); it holds {data.files}")
        try:
            images = data["arr_0"]   # ADM layout; the whole array is read, as the ADM suite does
        except (OSError, ValueError, EOFError) as error:
            raise SampleSetError(f"{str(path)!r}: arr_0 is unreadable ({type(error).__name__}: {error})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
        raise SampleSetError(f"{str(path)!r}: arr_0 must be uint8 (N, H, W, 1 or 3), got {images.dtype} {images.shape}")
    return images


def count_samples(path: str | Path) -> int:
    path = Path(path)
    if path.is_dir():
        return len(_image_files(path))
    return _npz_images(path).shape[0]


def sample_resolution(path: str | Path) -> tuple[int, int]:
    """(height, width) of a sample set: arr_0's, or the first image's of a folder."""
    path = Path(path)
    if path.is_dir():
        try:
            width, height = open_rgb(_image_files(path)[0]).size
        except UnreadableImageError as error:
            raise SampleSetError(str(error)) from None
        return height, width
    return tuple(_npz_images(path).shape[1:3])


def resolution_mismatch(samples: str | Path, ref: str | Path) -> str | None:
    """Why ``samples`` cannot be scored against ``ref`` because of their image sizes, or None (also when
    the reference file does not record its resolution: JiT's and the authors' files do not)."""
    expected = reference_info(ref).resolution
    if expected is None:
        return None
    height, width = sample_resolution(samples)
    if (height, width) != (expected, expected):
        return (f"the samples are {height}x{width} px but the reference statistics {str(ref)!r} are of "
                f"{expected}x{expected} px images: FID across resolutions is meaningless; sample at {expected} px "
                f"or make reference statistics at {height} px (python -m full.evaluate ref-stats --resolution {height})")
    return None


def iter_sample_batches(path: str | Path, batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 (B, C, H, W) batches from an .npz (``arr_0``, NHWC) or a folder of images (any mode, as RGB).

    Raises:
        SampleSetError: naming an unreadable image, images of different sizes, or a malformed .npz.
    """
    path = Path(path)
    if path.is_dir():
        files = _image_files(path)
        first_size = None
        for start in range(0, len(files), batch_size):
            arrays = []
            for file in files[start:start + batch_size]:
                try:
                    image = open_rgb(file)   # a sample set is scored whole: a broken file is an error, not skipped
                except UnreadableImageError as error:
                    raise SampleSetError(str(error)) from None
                first_size = first_size or (image.size, file)
                if image.size != first_size[0]:
                    raise SampleSetError(f"{str(file)!r} is {image.size[0]}x{image.size[1]} but "
                                         f"{str(first_size[1])!r} is {first_size[0][0]}x{first_size[0][1]}: "
                                         f"a sample set has one size")
                arrays.append(np.asarray(image))
            yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        return
    images = _npz_images(path)
    for start in range(0, len(images), batch_size):
        yield torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).permute(0, 3, 1, 2)


def saturated_fraction(images: torch.Tensor) -> float:
    """The share of uint8 pixel values of ``images`` that are 0 or 255."""
    return float(((images == 0) | (images == 255)).double().mean())


def refuse_constant_set(batches: Iterator[torch.Tensor], source: str) -> Iterator[torch.Tensor]:
    """Pass the batches through; at the end raise SampleSetError if every image equals the first, or if more
    than :data:`SATURATED_FRACTION` of all pixel values are 0 or 255.

    A diverged network writes one blank image over and over, or images of pure 0 / 255 pixels, and FID
    still gives a finite number.
    """
    first, varied, saturated, values = None, False, 0, 0
    for images in batches:
        if first is None:
            first = images[:1].clone()
        varied = varied or not bool((images == first).all())
        saturated += int(((images == 0) | (images == 255)).sum())
        values += images.numel()
        yield images
    if first is not None and not varied:
        raise SampleSetError(f"{source}: every image is identical (a constant sample set, e.g. from a diverged "
                             f"network); refusing to score it")
    if values and saturated > SATURATED_FRACTION * values:
        raise SampleSetError(f"{source}: {100 * saturated / values:.1f}% of the pixel values are 0 or 255 (a "
                             f"saturated sample set, e.g. from a diverged network); refusing to score it")


def check_samples_path(path: str) -> str | None:
    """None if ``path`` is a readable sample set, else the reason."""
    path = Path(path)
    if path.is_dir():
        return None if _image_files(path) else f"folder {path} holds no image files {sorted(set(IMAGE_EXTENSIONS))}"
    if path.is_file() and path.suffix == ".npz":
        return None
    return f"{path} is neither an .npz file nor a folder of images"


# --------------------------------------------------------------------------------------------
# FID / IS of a sample set; reference statistics of an image folder
# --------------------------------------------------------------------------------------------

def metrics_from_features(pool: np.ndarray, logits: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray, *,
                          is_splits: int = IS_SPLITS) -> dict:
    """{"fid", "is_mean", "is_std", "num"} of features (N, 2048) and logits (N, 1008)."""
    is_mean, is_std = inception_score(logits, splits=is_splits)
    return {"fid": frechet_distance_from_features(pool, ref_mu, ref_sigma), "is_mean": is_mean, "is_std": is_std,
            "num": int(pool.shape[0])}


def reference_record(ref: str | Path) -> dict:
    """What ``metrics.json`` says about the reference: path, keys used, resolution, size, what gave PR/KID."""
    info = reference_info(ref)
    return {"path": str(ref), "keys": list(info.keys), "resolution": info.resolution, "num": info.num,
            "pr_kid_from": ("features" if info.features else "arr_0 images" if info.images else None)}


def reference_features(ref: str | Path, extractor, *, batch_size: int, progress: bool) -> np.ndarray | None:
    """Pool features of the reference for precision / recall and KID: stored ``features``, else those of its
    ``arr_0`` images (an ADM batch), else None (mu and sigma alone, e.g. JiT's and the authors' files)."""
    info = reference_info(ref)
    if info.features:
        return load_reference_features(ref)
    if info.images:
        images = load_reference_images(ref)
        batches = (torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size])).permute(0, 3, 1, 2)
                   for start in range(0, len(images), batch_size))
        return extract_features(extractor, batches, total=len(images), progress=progress).pool
    return None


def pr_kid_metrics(pool: np.ndarray, reference: np.ndarray | None, device: str = "cpu") -> dict:
    """{"precision", "recall", "kid_mean", "kid_std"} of pool features (N, 2048); None each without a reference
    or with too few samples (precision / recall need more than 3 on each side, KID 2)."""
    scores = dict.fromkeys(("precision", "recall", "kid_mean", "kid_std"))
    if reference is None:
        return scores
    try:
        scores["precision"], scores["recall"] = precision_recall(pool, reference, device=device)
    except ValueError:
        pass
    try:
        scores["kid_mean"], scores["kid_std"] = kernel_inception_distance(pool, reference)
    except ValueError:
        pass
    return scores


def evaluate(cfg: EvalConfig, extractor=None) -> dict:
    """FID against ``cfg.ref``, the Inception Score, and precision / recall and KID of ``cfg.samples``.

    ``extractor``: the feature network (default: the Inception of ``cfg.inception_weights``).

    Raises:
        ValueError: an unusable ``--ref`` (wrong keys, dimension, NaN).
        SampleSetError: an unreadable, constant or saturated set, or one of another resolution than the reference.
    """
    # Cheap checks first: a bad --ref or a resolution mismatch fails before the Inception.
    ref_mu, ref_sigma = load_statistics(cfg.ref, dim=POOL_DIM if extractor is None else None)   # a given
    # extractor (tests) may have other features than the Inception's 2048
    mismatch = resolution_mismatch(cfg.samples, cfg.ref)
    if mismatch:
        raise SampleSetError(mismatch)
    total = count_samples(cfg.samples)
    extractor = extractor if extractor is not None else build_inception(cfg.inception_weights, cfg.device)
    batches = refuse_constant_set(iter_sample_batches(cfg.samples, cfg.batch_size), str(cfg.samples))
    features = extract_features(extractor, batches, total=total, progress=cfg.progress)
    if not (np.all(np.isfinite(features.pool)) and np.all(np.isfinite(features.logits))):
        raise SampleSetError(f"{cfg.samples}: the Inception features hold NaN or inf (corrupt --inception-weights?)")
    metrics = metrics_from_features(features.pool, features.logits, ref_mu, ref_sigma, is_splits=cfg.is_splits)
    reference = (reference_features(cfg.ref, extractor, batch_size=cfg.batch_size, progress=cfg.progress)
                 if cfg.pr_kid else None)
    return {**metrics, **pr_kid_metrics(features.pool, reference, cfg.device)}


class CenterCroppedImages(ImageFolderDataset):
    """The trainer's ImageFolder (same file list, same ADM center crop), as uint8 (3, H, W) images."""

    def __getitem__(self, index: int) -> torch.Tensor:
        image, _ = self.read(index)   # unreadable files skipped with a warning, as in training
        return torch.from_numpy(np.array(image)).permute(2, 0, 1)   # a writable copy


def reference_statistics(cfg: RefStatsConfig, extractor=None) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
    """(mu, sigma, number of images, kept pool features (min(N, keep_features), 2048)) of an ImageFolder."""
    # The weights first: a missing file should fail before listing a million images.
    extractor = extractor if extractor is not None else build_inception(cfg.inception_weights, cfg.device)
    dataset = CenterCroppedImages(cfg.data, cfg.resolution)
    if cfg.max_images is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(cfg.max_images, len(dataset))))
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, num_workers=cfg.num_workers)
    features = extract_features(extractor, loader, total=len(dataset), progress=cfg.progress)
    mu, sigma = feature_statistics(features.pool)
    return mu, sigma, len(dataset), kept_features(features.pool, cfg.keep_features)


def kept_features(pool: np.ndarray, keep: int, seed: int = 0) -> np.ndarray:
    """A random subset of ``keep`` rows of ``pool`` (all of them if fewer), float32, in their original order."""
    if keep >= len(pool):
        return pool.astype(np.float32)
    rows = np.sort(np.random.default_rng(seed).choice(len(pool), size=keep, replace=False))
    return pool[rows].astype(np.float32)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--inception-weights", default=None,
                        help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth; default: look in the "
                             "torch hub cache (<TORCH_HOME or ~/.cache/torch>/hub/checkpoints/)")
    parser.add_argument("--batch-size", type=int, default=100, help="images per Inception call")
    cli.add_device(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def build_eval_parser() -> argparse.ArgumentParser:
    parser = cli.Parser("python -m full.evaluate", "FID and Inception Score of a sample set. "
                        "Reference statistics: `python -m full.evaluate ref-stats --help`.")
    parser.add_argument("--samples", required=True,
                        help="samples.npz (arr_0 uint8 N x H x W x C) or a folder of images")
    parser.add_argument("--ref", required=True,
                        help="reference statistics .npz: ours (ref-stats), JiT's jit_in256_stats.npz (mu, sigma), "
                             "the authors' JAX file (ref_mu, ref_sigma) or an ADM reference batch")
    parser.add_argument("--is-splits", type=int, default=IS_SPLITS, help="Inception Score splits (<= N)")
    parser.add_argument("--fid-only", action="store_true",
                        help="skip precision / recall and KID (default: computed when --ref holds reference "
                             "features or images)")
    parser.add_argument("--out", default=None, metavar="DIR", help=f"output folder: {METRICS_NAME}")
    cli.add_json(parser, "the metrics")
    _add_common(parser)
    return parser


def build_ref_stats_parser() -> argparse.ArgumentParser:
    parser = cli.Parser("python -m full.evaluate ref-stats",
                        "Inception mean and covariance (mu, sigma) of an ImageFolder (root/<class>/<image>), "
                        "after the trainer's ADM center crop to --resolution.")
    parser.add_argument("--data", required=True, help="ImageFolder root, e.g. ImageNet train")
    parser.add_argument("--resolution", type=int, required=True, help="center-crop side, e.g. 256 or 512")
    cli.add_out(parser, None, f"{REF_STATS_NAME} (mu, sigma, num, resolution), the --ref of FID")
    parser.add_argument("--num-workers", type=int, default=4, help="image-decoding worker processes")
    parser.add_argument("--max-images", type=int, default=None,
                        help="use only the first N images in folder order (a quick check; default all)")
    parser.add_argument("--keep-features", type=int, default=REF_FEATURES,
                        help="pool features of a random subset of this many images stored beside mu and sigma, "
                             "for precision / recall and KID (0: none)")
    parser.add_argument("--overwrite", action="store_true",
                        help=f"replace an existing {REF_STATS_NAME} in --out (default: refuse)")
    _add_common(parser)
    return parser


def _check_common(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.inception_weights is not None and not Path(args.inception_weights).is_file():
        parser.error(f"--inception-weights {args.inception_weights} is not a file")


def main_ref_stats(argv: list[str]) -> None:
    parser = build_ref_stats_parser()
    args = parser.parse_args(argv)
    _check_common(parser, args)
    if args.resolution < 1:
        parser.error(f"--resolution must be >= 1, got {args.resolution}")
    if args.num_workers < 0:
        parser.error(f"--num-workers must be >= 0, got {args.num_workers}")
    if args.max_images is not None and args.max_images < 2:
        parser.error(f"--max-images must be >= 2 (a covariance needs two images), got {args.max_images}")
    if args.keep_features < 0:
        parser.error(f"--keep-features must be >= 0, got {args.keep_features}")
    if not Path(args.data).is_dir():
        parser.error(f"--data {args.data} is not a folder")
    device = str(cli.resolve_device(parser, args.device))
    cli.check_out(parser, args.out)
    target = Path(args.out) / REF_STATS_NAME
    if target.exists() and not args.overwrite:   # checked before hours of Inception passes, not after
        parser.error(f"--out: {str(target)!r} exists; pass --overwrite to replace it, or use another --out")
    cfg = RefStatsConfig(data=args.data, resolution=args.resolution, out=str(target),
                         inception_weights=args.inception_weights, batch_size=args.batch_size,
                         num_workers=args.num_workers, max_images=args.max_images,
                         keep_features=args.keep_features, device=device, progress=not args.no_progress)
    try:
        mu, sigma, num, features = reference_statistics(cfg)
    except FileNotFoundError as error:   # missing Inception weights or an empty image folder
        sys.exit(f"error: {error}")
    except (InceptionWeightsError, UnreadableImageError) as error:
        parser.error(str(error))
    try:
        save_statistics(cfg.out, mu, sigma, num=np.array(num), resolution=np.array(cfg.resolution),
                        **({"features": features} if cfg.keep_features else {}))
    except OSError as error:
        sys.exit(f"error: writing --out {cfg.out} failed: {error}")
    print(f"wrote mu, sigma of {num} images ({cfg.resolution} px) to {cfg.out}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "ref-stats":
        return main_ref_stats(argv[1:])
    parser = build_eval_parser()
    args = parser.parse_args(argv)
    _check_common(parser, args)
    problem = check_samples_path(args.samples)
    if problem:
        parser.error(f"--samples: {problem}")
    if not Path(args.ref).is_file():
        parser.error(f"--ref {args.ref} is not a file (make one with `python -m full.evaluate ref-stats`)")
    device = str(cli.resolve_device(parser, args.device))
    if args.out is not None:
        cli.check_out(parser, args.out)
    try:
        load_statistics(args.ref, dim=POOL_DIM)
    except ValueError as error:
        parser.error(f"--ref: {error}")
    try:
        num = count_samples(args.samples)
        mismatch = resolution_mismatch(args.samples, args.ref)
    except ValueError as error:
        parser.error(f"--samples: {error}")
    if num < 2:   # before --is-splits: its default 10 would otherwise be the complaint
        parser.error(f"--samples holds {num} image(s); FID needs at least 2 samples")
    if mismatch:
        parser.error(f"--samples: {mismatch}")
    if not 1 <= args.is_splits <= num:
        parser.error(f"--is-splits must lie in [1, number of samples = {num}], got {args.is_splits}")
    if num < UNBIASED_FID_SAMPLES:
        print(f"warning: {num} samples: FID is biased upwards below {UNBIASED_FID_SAMPLES:,} samples (the paper's "
              f"FID-50K uses 50,000); compare only FIDs of equally many samples", file=sys.stderr)
    cfg = EvalConfig(samples=args.samples, ref=args.ref, inception_weights=args.inception_weights,
                     batch_size=args.batch_size, is_splits=args.is_splits, device=device,
                     progress=not args.no_progress, pr_kid=not args.fid_only)
    try:
        metrics = evaluate(cfg)
    except FileNotFoundError as error:   # the Inception weights are missing: the message says where to put them
        sys.exit(f"error: {error}")
    except InceptionWeightsError as error:
        parser.error(str(error))
    except SampleSetError as error:      # an unreadable, mixed-size or constant sample set
        parser.error(f"--samples: {error}")
    record = {**metrics, "samples": args.samples, "ref": args.ref, "reference": reference_record(args.ref)}
    line = f"samples {metrics['num']}  FID {metrics['fid']:.3f}  IS {metrics['is_mean']:.2f} ± {metrics['is_std']:.2f}"
    if metrics["precision"] is not None:
        line += f"  precision {metrics['precision']:.3f}  recall {metrics['recall']:.3f}"
    if metrics["kid_mean"] is not None:
        line += f"  KID {metrics['kid_mean']:.5f} ± {metrics['kid_std']:.5f}"
    print(json.dumps(record, indent=2) if args.json else line)
    if not args.fid_only and record["reference"]["pr_kid_from"] is None:
        print(f"note: --ref {args.ref} holds mu and sigma only: no precision / recall or KID (make reference "
              f"statistics with `python -m full.evaluate ref-stats`, which keeps features for them)", file=sys.stderr)
    if args.out is not None:
        try:
            write_json(Path(args.out) / METRICS_NAME, record)
        except OSError as error:   # a full disk: the printed line above still has the numbers
            sys.exit(f"error: writing --out {args.out} failed: {error}")


if __name__ == "__main__":
    main()
