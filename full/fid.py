"""FID and Inception Score: Inception-v3 features, Gaussian statistics, the Fréchet distance.

The feature extractor is torch-fidelity's port of the TF-Inception graph (2015-12-05) that FID and
IS were defined with; its weights come only from a local file or the torch hub cache, never from
the network. The Fréchet distance is written here (and tested against a float64 scipy oracle);
the Inception Score is torch-fidelity's.

    FID = |mu_1 - mu_2|^2 + tr(S_1) + tr(S_2) - 2 tr((S_1 S_2)^(1/2))     (Heusel et al. 2017)
    IS  = exp(E_x KL(p(y|x) || p(y)))                                      (Salimans et al. 2016)

Images enter as uint8 tensors (B, 3, H, W) in [0, 255]; torch-fidelity resizes them to 299 x 299
with TF-1.x-compatible bilinear interpolation, as the reference implementations do.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np
import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric
from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
from torch_fidelity.metric_prc import KEY_METRIC_PRECISION, KEY_METRIC_RECALL, prc_features_to_metric
from tqdm import tqdm

from .io import atomic_write

# torch-fidelity's converted TF-Inception weights (the name its own download would cache under).
INCEPTION_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"
POOL_FEATURE = "2048"              # pool_3 features, the FID space
LOGITS_FEATURE = "logits_unbiased"  # 1008-way logits without bias, torch-fidelity's IS default
IS_SPLITS = 10                     # the Inception Score's customary number of splits
IS_SHUFFLE_SEED = 2020             # torch-fidelity's default shuffle seed before splitting
POOL_DIM = 2048                    # dimension of the pool features: reference statistics must match it
PRC_NEIGHBORHOOD = 3               # k of precision / recall (Kynkäänniemi et al. 2019; torch-fidelity, ADM: 3)
KID_SUBSETS = 100                  # torch-fidelity's KID defaults: 100 subsets of 1000 samples each
KID_SUBSET_SIZE = 1000


# --------------------------------------------------------------------------------------------
# Inception-v3 feature extractor
# --------------------------------------------------------------------------------------------

def default_inception_weights_path() -> Path:
    """Where the weights are looked for by default: ``<torch hub dir>/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILENAME


def missing_weights_message(path: Path) -> str:
    return (f"Inception weights not found at {path}. FID/IS need torch-fidelity's TF-Inception port "
            f"'{INCEPTION_WEIGHTS_FILENAME}': put it in {default_inception_weights_path().parent} "
            f"(the torch hub cache; TORCH_HOME moves it) or pass --inception-weights PATH. Nothing is "
            f"downloaded at run time; fetch it elsewhere from {URL_INCEPTION_V3} and copy it over.")


def resolve_inception_weights(path: str | os.PathLike | None) -> Path:
    """The weights file to use: ``path`` if given, else the torch hub cache; raises if absent.

    Raises:
        FileNotFoundError: naming the file and the folder to put it in.
    """
    resolved = Path(path) if path is not None else default_inception_weights_path()
    if not resolved.is_file():
        raise FileNotFoundError(missing_weights_message(resolved))
    return resolved


class InceptionWeightsError(ValueError):
    """A weights file that is not torch-fidelity's Inception state dict; the message names the file."""


def build_inception(weights_path: str | os.PathLike | None, device: str | torch.device = "cpu"
                    ) -> FeatureExtractorInceptionV3:
    """torch-fidelity's Inception-v3 returning (pool features (B, 2048), logits (B, 1008)).

    Always given a local file, so torch-fidelity never reaches its download branch. The file is
    first read here with ``weights_only=True`` and must be a dict of tensors: torch-fidelity itself
    loads it with ``weights_only=False``, which would run any code pickled into it.

    Raises:
        FileNotFoundError: no weights file (the message says where to put it).
        InceptionWeightsError: an empty, corrupt, unsafe or foreign file.
    """
    from .checkpoint import CheckpointError, read_checkpoint_file   # local: checkpoint imports nothing of fid

    weights = resolve_inception_weights(weights_path)
    try:
        state = read_checkpoint_file(weights)
    except CheckpointError as error:
        raise InceptionWeightsError(f"--inception-weights: {error}") from None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InceptionWeightsError(f"--inception-weights: {str(weights)!r} is not a state dict of tensors "
                                    f"(expected torch-fidelity's {INCEPTION_WEIGHTS_FILENAME})")
    del state
    try:
        extractor = FeatureExtractorInceptionV3("inception-v3-compat", [POOL_FEATURE, LOGITS_FEATURE],
                                                feature_extractor_weights_path=str(weights))
    except RuntimeError as error:   # strict load_state_dict: missing / unexpected keys or shapes
        raise InceptionWeightsError(f"--inception-weights: {str(weights)!r} does not fit torch-fidelity's Inception-v3 "
                                    f"({str(error).splitlines()[0][:200]}); expected {INCEPTION_WEIGHTS_FILENAME}") from None
    return extractor.to(device)


# --------------------------------------------------------------------------------------------
# Features and statistics
# --------------------------------------------------------------------------------------------

class InceptionFeatures(NamedTuple):
    pool: np.ndarray    # (N, 2048) float64, the FID features
    logits: np.ndarray  # (N, 1008) float64, the IS logits


def to_rgb_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) uint8 with C in {1, 3} -> (B, 3, H, W); grey images are repeated to RGB."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be uint8 (B, 1 or 3, H, W), got {images.dtype} {tuple(images.shape)}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


@torch.no_grad()
def extract_features(extractor: FeatureExtractorInceptionV3, batches: Iterable[torch.Tensor], *,
                     total: int | None = None, progress: bool = True) -> InceptionFeatures:
    """Run uint8 image batches (B, C, H, W) through the Inception; returns all features in float64."""
    device = next(extractor.parameters()).device
    pools, logits = [], []
    with tqdm(total=total, unit="img", desc="inception", disable=not progress) as bar:
        for images in batches:
            pool, logit = extractor(to_rgb_uint8(images).to(device))
            pools.append(pool.double().cpu().numpy())
            logits.append(logit.double().cpu().numpy())
            bar.update(images.shape[0])
    if not pools:
        raise ValueError("no images were given to the Inception network")
    return InceptionFeatures(np.concatenate(pools), np.concatenate(logits))


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance of features (N, D), N >= 2 -> (mu (D,), sigma (D, D)), float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D), got shape {features.shape}")
    return features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False))   # np.cov gives () for D = 1


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix by eigendecomposition."""
    eigenvalues, eigenvectors = np.linalg.eigh(matrix)
    # Rounding can make the smallest eigenvalues of a PSD matrix slightly negative.
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def _check_shapes(dim: int, **arrays: np.ndarray) -> None:
    """Raise ValueError unless every ``mu*`` is (dim,), every ``sigma*`` is (dim, dim), all finite."""
    for name, array in arrays.items():
        shape = (dim,) if name.startswith("mu") else (dim, dim)
        if array.shape != shape:
            raise ValueError(f"{name} has shape {array.shape}, expected {shape}")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{name} contains NaN or inf")


def frechet_distance(mu_1: np.ndarray, sigma_1: np.ndarray, mu_2: np.ndarray, sigma_2: np.ndarray) -> float:
    """Fréchet (2-Wasserstein squared) distance between N(mu_1, S_1) and N(mu_2, S_2), float64.

        d^2 = |mu_1 - mu_2|^2 + tr S_1 + tr S_2 - 2 tr (S_1 S_2)^(1/2)

    The trace term is computed without a non-symmetric matrix square root: with A = S_1^(1/2),
    S_1 S_2 = A (A S_2) has the eigenvalues of the symmetric PSD matrix A S_2 A, so
    tr (S_1 S_2)^(1/2) = sum_i sqrt(lambda_i(A S_2 A)).

    Args:
        mu_1, mu_2: (D,).  sigma_1, sigma_2: (D, D) symmetric positive semi-definite.
    Returns:
        the distance, a Python float >= 0 up to rounding.
    """
    mu_1, mu_2 = np.asarray(mu_1, np.float64), np.asarray(mu_2, np.float64)
    sigma_1, sigma_2 = np.asarray(sigma_1, np.float64), np.asarray(sigma_2, np.float64)
    _check_shapes(mu_1.shape[0] if mu_1.ndim == 1 else -1, mu_1=mu_1, sigma_1=sigma_1, mu_2=mu_2, sigma_2=sigma_2)
    root_1 = _psd_sqrt(sigma_1)
    middle = root_1 @ sigma_2 @ root_1
    middle = 0.5 * (middle + middle.T)  # symmetric by construction; remove rounding asymmetry
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(middle), 0.0, None)).sum()
    diff = mu_1 - mu_2
    return float(diff @ diff + np.trace(sigma_1) + np.trace(sigma_2) - 2.0 * trace_sqrt)


def frechet_distance_from_features(features: np.ndarray, mu_2: np.ndarray, sigma_2: np.ndarray) -> float:
    """:func:`frechet_distance` with (mu_1, S_1) the statistics of ``features``; cheaper when N <= D.

    With X = (F - mean F) / sqrt(N - 1), (N, D), the covariance is S_1 = X^T X, so S_1 S_2 =
    X^T (X S_2) has the nonzero eigenvalues of the N x N matrix X S_2 X^T and
    tr (S_1 S_2)^(1/2) = sum_i sqrt(lambda_i(X S_2 X^T)),  tr S_1 = |X|_F^2. For fewer samples
    than feature dimensions (quick checks, tests) this avoids two D x D eigendecompositions and
    the square roots of the D - N + 1 eigenvalues that rounding leaves near zero.

    Args:
        features: (N, D), N >= 2.  mu_2: (D,).  sigma_2: (D, D) symmetric PSD.
    """
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D), got shape {features.shape}")
    n, dim = features.shape
    if n - 1 >= dim:   # S_1 may be full rank: the D x D route is the cheaper one
        return frechet_distance(*feature_statistics(features), mu_2, sigma_2)
    mu_2, sigma_2 = np.asarray(mu_2, np.float64), np.asarray(sigma_2, np.float64)
    _check_shapes(dim, mu_2=mu_2, sigma_2=sigma_2)
    mu_1 = features.mean(axis=0)
    x = (features - mu_1) / np.sqrt(n - 1)
    middle = x @ sigma_2 @ x.T
    middle = 0.5 * (middle + middle.T)
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(middle), 0.0, None)).sum()
    diff = mu_1 - mu_2
    return float(diff @ diff + (x * x).sum() + np.trace(sigma_2) - 2.0 * trace_sqrt)


def inception_score(logits: np.ndarray, *, splits: int = IS_SPLITS) -> tuple[float, float]:
    """Inception Score (mean, std over ``splits`` chunks) of logits (N, 1008), N >= splits.

    torch-fidelity's implementation (samples shuffled with a fixed seed, then split).
    """
    logits = np.asarray(logits)
    if logits.ndim != 2 or not 1 <= splits <= logits.shape[0]:
        raise ValueError(f"need logits (N, K) with 1 <= splits <= N, got shape {logits.shape}, splits={splits}")
    score = isc_features_to_metric(torch.from_numpy(logits), splits=splits, shuffle=True,
                                   rng_seed=IS_SHUFFLE_SEED)
    return score[KEY_METRIC_ISC_MEAN], score[KEY_METRIC_ISC_STD]


# --------------------------------------------------------------------------------------------
# Statistics files (.npz with mu, sigma; the same keys as the ADM reference batches)
# --------------------------------------------------------------------------------------------

def save_statistics(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, **extra) -> None:
    """Write ``mu`` (D,) and ``sigma`` (D, D) (and any extra arrays) to an .npz, atomically."""
    atomic_write(Path(path), lambda file: np.savez(file, mu=mu, sigma=sigma, **extra))


def open_npz(path: str | os.PathLike):
    """``np.load`` of an .npz (no pickles) with a one-line ValueError naming a missing, garbage or truncated file."""
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        detail = ("it holds pickled Python objects, refused: loading them could run code" if "pickle" in str(error)
                  else f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no detail'}")
        raise ValueError(f"{str(path)!r} is not a readable .npz file ({detail})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{str(path)!r} is a single .npy array, expected an .npz archive")
    return data


def _read_array(data, key: str, path) -> np.ndarray:
    try:
        return data[key]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as error:
        raise ValueError(f"{str(path)!r}: entry {key!r} is unreadable ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else 'no detail'})") from None


STATISTICS_KEYS = (("mu", "sigma"), ("ref_mu", "ref_sigma"))
"""Key pairs of mean and covariance, in the order tried. ``mu``/``sigma``: ours (``full.evaluate ref-stats``),
ADM's reference batches (``VIRTUAL_imagenet256_labeled.npz``: also ``arr_0`` images, ``mu_s``/``sigma_s``),
JiT's ``fid_stats/jit_in256_stats.npz`` / ``jit_in512_stats.npz`` (read by JiT's torch-fidelity fork as
``fid_statistics_file``; the authors' torch evaluate.py uses them too). ``ref_mu``/``ref_sigma``: the
authors' JAX code (utils/fid_util.py writes ``imagenet_<size>_fid_stats.npz`` with these two keys)."""


def load_statistics(path: str | os.PathLike, *, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read the mean (D,) and covariance (D, D) from an .npz in any layout of :data:`STATISTICS_KEYS`.

    Args:
        dim: the feature dimension they must have (:data:`POOL_DIM` for the Inception pool features), or
            None for any D.
    Raises:
        ValueError: naming the file, for a garbage file, missing keys, wrong shapes or dimension, NaN / inf.
    """
    with open_npz(path) as data:
        keys = next((pair for pair in STATISTICS_KEYS if set(pair) <= set(data.files)), None)
        if keys is None:
            present = [name for pair in STATISTICS_KEYS for name in pair if name in data.files]
            missing = sorted({"mu", "sigma"} - set(data.files)) if "mu" in present or "sigma" in present or not present \
                else sorted({"ref_mu", "ref_sigma"} - set(data.files))
            raise ValueError(f"{str(path)!r} lacks {missing}; it holds {data.files} (expected mu and sigma, or "
                             f"the authors' ref_mu and ref_sigma)")
        mu, sigma = _read_array(data, keys[0], path), _read_array(data, keys[1], path)
    if not (np.issubdtype(mu.dtype, np.number) and np.issubdtype(sigma.dtype, np.number)):
        raise ValueError(f"{str(path)!r}: mu and sigma must be numbers, got {mu.dtype} and {sigma.dtype}")
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{str(path)!r}: expected mu (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise ValueError(f"{str(path)!r}: mu or sigma contains NaN or inf")
    if dim is not None and mu.shape[0] != dim:
        raise ValueError(f"{str(path)!r} holds statistics of {mu.shape[0]}-d features, but the Inception pool "
                         f"features FID compares are {dim}-d: not reference statistics of this FID")
    return mu.astype(np.float64), sigma.astype(np.float64)


def _member_shape(path: str | os.PathLike, key: str) -> tuple[int, ...] | None:
    """The shape of array ``key`` of an .npz, read from its header alone (None if absent or unreadable)."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as member:
            version = np.lib.format.read_magic(member)
            shape, _, _ = (np.lib.format.read_array_header_1_0(member) if version == (1, 0)
                           else np.lib.format.read_array_header_2_0(member))
        return tuple(shape)
    except (KeyError, OSError, ValueError, zipfile.BadZipFile):
        return None


class ReferenceInfo(NamedTuple):
    """What a reference-statistics file holds besides mu and sigma (recorded in ``metrics.json``)."""
    keys: tuple[str, str]        # the mean / covariance keys used ("mu", "sigma") or ("ref_mu", "ref_sigma")
    resolution: int | None       # image side of the reference images: ``resolution``, else arr_0's; None: unknown
    num: int | None              # number of reference images, when recorded
    features: int | None         # rows of stored pool features (precision / recall / KID), if any
    images: int | None           # rows of stored uint8 reference images ``arr_0`` (ADM batches), if any


def reference_info(path: str | os.PathLike) -> ReferenceInfo:
    """Describe a reference file without reading its large arrays (call :func:`load_statistics` first)."""
    with open_npz(path) as data:
        files = set(data.files)
        keys = next((pair for pair in STATISTICS_KEYS if set(pair) <= files), None)
        if keys is None:
            raise ValueError(f"{str(path)!r} holds neither mu/sigma nor ref_mu/ref_sigma; it holds {sorted(files)}")

        def scalar(name):
            if name not in files:
                return None
            value = _read_array(data, name, path)
            return int(value) if value.ndim == 0 and np.issubdtype(value.dtype, np.integer) else None
        resolution, num = scalar("resolution"), scalar("num")
    features_shape = _member_shape(path, "features") if "features" in files else None
    images_shape = _member_shape(path, "arr_0") if "arr_0" in files else None
    if resolution is None and images_shape is not None and len(images_shape) == 4:
        resolution = int(images_shape[1])
    return ReferenceInfo(keys, resolution, num, features_shape[0] if features_shape else None,
                         images_shape[0] if images_shape else None)


def load_reference_features(path: str | os.PathLike, *, dim: int = POOL_DIM) -> np.ndarray:
    """The stored pool features (N, dim) of a reference file (``features``, written by ``ref-stats``)."""
    with open_npz(path) as data:
        features = _read_array(data, "features", path)
    if features.ndim != 2 or features.shape[1] != dim or features.shape[0] < PRC_NEIGHBORHOOD + 1:
        raise ValueError(f"{str(path)!r}: 'features' must be (N > {PRC_NEIGHBORHOOD}, {dim}), got {features.shape}")
    if not np.all(np.isfinite(features)):
        raise ValueError(f"{str(path)!r}: 'features' contains NaN or inf")
    return features


def load_reference_images(path: str | os.PathLike) -> np.ndarray:
    """The uint8 reference images ``arr_0`` (N, H, W, C) of an ADM reference batch."""
    with open_npz(path) as data:
        images = _read_array(data, "arr_0", path)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
        raise ValueError(f"{str(path)!r}: arr_0 must be uint8 (N, H, W, 1 or 3), got {images.dtype} {images.shape}")
    return images


# --------------------------------------------------------------------------------------------
# Precision / recall and KID (torch-fidelity's implementations, on the FID features)
# --------------------------------------------------------------------------------------------

def precision_recall(features: np.ndarray, reference: np.ndarray, *, neighborhood: int = PRC_NEIGHBORHOOD,
                     device: str | torch.device = "cpu") -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of samples against reference features.

    Precision: the share of samples inside the union of the reference points' k-NN balls; recall: the
    share of reference points inside the samples' k-NN balls (k = ``neighborhood``). torch-fidelity's
    implementation, on the Inception pool features (as the ADM evaluation suite; torch-fidelity's own
    default for this metric is VGG16 features).

    Args:
        features: (N, D) samples, N > k.  reference: (M, D), M > k.
    Returns:
        (precision, recall), each in [0, 1].
    """
    if len(features) <= neighborhood or len(reference) <= neighborhood:
        raise ValueError(f"precision / recall need more than {neighborhood} samples and reference points, "
                         f"got {len(features)} and {len(reference)}")
    scores = prc_features_to_metric(torch.as_tensor(features, dtype=torch.float32, device=device),
                                    torch.as_tensor(reference, dtype=torch.float32, device=device),
                                    prc_neighborhood=neighborhood, prc_batch_size=10000, save_cpu_ram=True,
                                    verbose=False)
    return float(scores[KEY_METRIC_PRECISION]), float(scores[KEY_METRIC_RECALL])


def kernel_inception_distance(features: np.ndarray, reference: np.ndarray, *, subsets: int = KID_SUBSETS,
                              subset_size: int = KID_SUBSET_SIZE, seed: int = IS_SHUFFLE_SEED) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): the unbiased MMD^2 with the cubic polynomial kernel
    ``k(a, b) = (a.b / D + 1)^3``, mean and std over ``subsets`` random subsets (torch-fidelity's).

    The subset size is capped at the smaller set (torch-fidelity refuses otherwise), >= 2.
    Returns:
        (kid_mean, kid_std).
    """
    size = min(subset_size, len(features), len(reference))
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples and 2 reference points, got {len(features)} and {len(reference)}")
    scores = kid_features_to_metric(torch.as_tensor(features, dtype=torch.float64),
                                    torch.as_tensor(reference, dtype=torch.float64),
                                    kid_subsets=subsets, kid_subset_size=size, rng_seed=seed, verbose=False)
    return float(scores[KEY_METRIC_KID_MEAN]), float(scores[KEY_METRIC_KID_STD])
