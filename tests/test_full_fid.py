"""Fréchet distance and Inception Score (full/fid.py) against independent references: scipy's matrix
square root of S_1 S_2 in float64 (the usual FID formula, a different route from our eigendecomposition),
the closed form for commuting covariances, exact Inception Scores of one-hot and uniform predictions;
and the Inception network builds from a local file only (never a download).
"""
from __future__ import annotations
import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import example, given, strategies as st
from full import fid as F
SCIPY_RTOL = 1e-9       # float64 sqrtm vs eigh on well-conditioned covariances
SINGULAR_ATOL = 1e-6    # sqrt of eigenvalues that rounding leaves at ~1e-16 instead of 0

pytestmark = pytest.mark.usefixtures("one_thread")


def _scipy_frechet(mu_1, sigma_1, mu_2, sigma_2) -> float:
    """The textbook formula with scipy's principal square root of the non-symmetric S_1 S_2."""
    root = scipy.linalg.sqrtm(sigma_1 @ sigma_2)
    diff = mu_1 - mu_2
    return float(diff @ diff + np.trace(sigma_1) + np.trace(sigma_2) - 2 * np.trace(root.real))


def _gaussian(rng: np.random.Generator, dim: int, samples: int):
    """mu (dim,) and a full-rank covariance built as A A^T / samples + I / dim."""
    a = rng.standard_normal((dim, samples))
    return rng.standard_normal(dim), a @ a.T / samples + np.eye(dim) / dim


@given(dim=st.integers(1, 48), seed=st.integers(0, 2 ** 32 - 1))
@example(dim=1, seed=0)
def test_frechet_distance_matches_scipy_oracle(dim, seed):
    rng = np.random.default_rng(seed)
    (mu_1, sigma_1), (mu_2, sigma_2) = _gaussian(rng, dim, 2 * dim), _gaussian(rng, dim, dim + 1)
    expected = _scipy_frechet(mu_1, sigma_1, mu_2, sigma_2)
    scale = np.trace(sigma_1) + np.trace(sigma_2) + float((mu_1 - mu_2) @ (mu_1 - mu_2))
    assert abs(F.frechet_distance(mu_1, sigma_1, mu_2, sigma_2) - expected) <= SCIPY_RTOL * scale
    assert abs(F.frechet_distance(mu_2, sigma_2, mu_1, sigma_1) - expected) <= SCIPY_RTOL * scale   # symmetric


@given(dim=st.integers(1, 64), zeros=st.integers(0, 8), seed=st.integers(0, 2 ** 32 - 1))
def test_frechet_distance_closed_form_commuting_covariances(dim, zeros, seed):
    """S_i = Q diag(d_i) Q^T:  d^2 = |mu_1 - mu_2|^2 + sum_k (sqrt(d_1k) - sqrt(d_2k))^2, zeros allowed."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
    d_1, d_2 = rng.uniform(0, 3, dim), rng.uniform(0, 3, dim)
    d_1[: min(zeros, dim)] = 0.0                       # singular covariances, as with N < 2048 samples
    mu_1, mu_2 = rng.standard_normal(dim), rng.standard_normal(dim)
    expected = float((mu_1 - mu_2) @ (mu_1 - mu_2) + ((np.sqrt(d_1) - np.sqrt(d_2)) ** 2).sum())
    actual = F.frechet_distance(mu_1, (q * d_1) @ q.T, mu_2, (q * d_2) @ q.T)
    assert actual == pytest.approx(expected, rel=1e-9, abs=SINGULAR_ATOL)
    sigma = (q * d_1) @ q.T
    assert abs(F.frechet_distance(mu_1, sigma, mu_1, sigma)) <= SINGULAR_ATOL


def test_frechet_distance_of_sample_statistics_matches_scipy():
    """Covariances of features as FID uses them (np.cov), N > D and N < D (rank-deficient)."""
    rng = np.random.default_rng(0)
    for samples in (200, 20):
        mu_1, sigma_1 = F.feature_statistics(rng.standard_normal((samples, 32)))
        mu_2, sigma_2 = F.feature_statistics(rng.standard_normal((samples, 32)) * 1.5 + 0.3)
        expected = _scipy_frechet(mu_1, sigma_1, mu_2, sigma_2)
        assert F.frechet_distance(mu_1, sigma_1, mu_2, sigma_2) == pytest.approx(expected, rel=1e-6)


@given(samples=st.integers(2, 40), dim=st.integers(1, 30), seed=st.integers(0, 2 ** 32 - 1))
@example(samples=2, dim=30, seed=0)
@example(samples=31, dim=30, seed=0)   # N - 1 >= D: the D x D route
def test_frechet_distance_from_features_matches_statistics_route(samples, dim, seed):
    """The N x N route (X S_2 X^T) equals the D x D route on the features' own (mu, S)."""
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((samples, dim)) * rng.uniform(0.1, 2.0, dim)
    mu_2, sigma_2 = _gaussian(rng, dim, dim + 3)
    expected = F.frechet_distance(*F.feature_statistics(features), mu_2, sigma_2)
    scale = np.trace(sigma_2) + float(np.var(features, axis=0).sum()) + 1.0
    # The D x D route takes square roots of the D - N + 1 zero eigenvalues: error ~ D sqrt(eps).
    assert F.frechet_distance_from_features(features, mu_2, sigma_2) == pytest.approx(
        expected, abs=dim * SINGULAR_ATOL * scale)
    mu_1, sigma_1 = F.feature_statistics(features)
    assert abs(F.frechet_distance_from_features(features, mu_1, sigma_1)) <= dim * SINGULAR_ATOL * scale


@pytest.mark.parametrize("bad", ["mu_shape", "sigma_shape", "nan"])
def test_frechet_distance_rejects_bad_input(bad):
    mu, sigma = np.zeros(3), np.eye(3)
    args = {"mu_shape": (np.zeros(4), sigma), "sigma_shape": (mu, np.eye(2)),
            "nan": (mu, np.full((3, 3), np.nan))}[bad]
    with pytest.raises(ValueError):
        F.frechet_distance(mu, sigma, *args)


@pytest.mark.parametrize("classes", [1, 2, 7, 40])
def test_inception_score_closed_form(classes):
    """Confident predictions spread evenly over K classes give IS = K; identical predictions give 1."""
    labels = np.arange(4 * classes) % classes
    logits = np.zeros((len(labels), 1008))
    logits[np.arange(len(labels)), labels] = 60.0      # softmax mass off the label: ~1007 e^-60
    mean, std = F.inception_score(logits, splits=1)
    assert mean == pytest.approx(classes, rel=1e-9) and std == 0
    assert F.inception_score(np.zeros((10, 1008)), splits=2)[0] == pytest.approx(1.0, abs=1e-12)


def test_inception_builds_from_local_file_only(no_network, random_weights):
    extractor = F.build_inception(random_weights)
    features = F.extract_features(extractor, [torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)],
                                  progress=False)
    assert features.pool.shape == (2, 2048) and features.logits.shape == (2, 1008)
    assert np.all(np.isfinite(features.pool)) and features.pool.std() > 0
    with pytest.raises(FileNotFoundError) as missing:
        F.build_inception(None)                          # the (empty) torch hub cache
    assert F.INCEPTION_WEIGHTS_FILENAME in str(missing.value) and str(no_network) in str(missing.value)




# ---------------------------------------------------------------------------- precision / recall, KID

def _brute_precision_recall(fake, real, k=3):
    """Kynkäänniemi et al. 2019 written out in float64: radius = distance to the k-th nearest other point."""
    def radii(points):
        distances = np.linalg.norm(points[:, None] - points[None], axis=-1)
        return np.sort(distances, axis=1)[:, k]            # column 0 is the point itself
    cross = np.linalg.norm(fake[:, None] - real[None], axis=-1)   # (N, M)
    precision = np.mean((cross <= radii(real)[None, :]).any(axis=1))
    recall = np.mean((cross.T <= radii(fake)[None, :]).any(axis=1))
    return precision, recall


@pytest.mark.parametrize("seed, shift", [(0, 0.0), (1, 0.7), (2, 3.0)])
def test_precision_recall_matches_brute_force(seed, shift):
    rng = np.random.default_rng(seed)
    fake = rng.normal(size=(40, 6)) + shift
    real = rng.normal(size=(50, 6)) * np.linspace(0.5, 1.5, 6)
    precision, recall = F.precision_recall(fake, real)
    expected = _brute_precision_recall(fake.astype(np.float32).astype(np.float64),
                                       real.astype(np.float32).astype(np.float64))
    assert (precision, recall) == pytest.approx(expected, abs=1e-6)


def test_kid_matches_the_unbiased_mmd_with_the_cubic_kernel():
    """One subset holding every point (a permutation): KID is the unbiased MMD^2, written out here."""
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(30, 5)), rng.normal(size=(30, 5)) + 0.5
    kernel = lambda a, b: (a @ b.T / a.shape[1] + 1) ** 3                   # noqa: E731
    m = len(x)
    k_xx, k_yy, k_xy = kernel(x, x), kernel(y, y), kernel(x, y)
    expected = ((k_xx.sum() - np.trace(k_xx)) / (m * (m - 1)) + (k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
                - 2 * k_xy.mean())
    mean, std = F.kernel_inception_distance(x, y, subsets=1, subset_size=m)
    assert mean == pytest.approx(expected, rel=1e-9) and std == 0.0
    assert F.kernel_inception_distance(x, y, subsets=4, subset_size=1000)[0] == pytest.approx(expected, rel=1e-9)


def test_pr_and_kid_refuse_too_few_points():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="more than 3"):
        F.precision_recall(rng.normal(size=(3, 4)), rng.normal(size=(10, 4)))
    with pytest.raises(ValueError, match="at least 2"):
        F.kernel_inception_distance(rng.normal(size=(1, 4)), rng.normal(size=(10, 4)))


# ---------------------------------------------------------------------------- reference files as published

@pytest.mark.parametrize("keys", [("mu", "sigma"), ("ref_mu", "ref_sigma")])   # ours / JiT / ADM; the authors' JAX
def test_load_statistics_reads_every_published_layout(tmp_path, keys):
    rng = np.random.default_rng(0)
    mu, root = rng.normal(size=6), rng.normal(size=(6, 6))
    np.savez(tmp_path / "ref.npz", **{keys[0]: mu.astype(np.float32), keys[1]: (root @ root.T).astype(np.float32)})
    loaded_mu, loaded_sigma = F.load_statistics(tmp_path / "ref.npz")
    assert np.array_equal(loaded_mu, mu.astype(np.float32)) and loaded_sigma.dtype == np.float64
    assert F.reference_info(tmp_path / "ref.npz").keys == keys


def test_load_statistics_refuses_another_dimension(tmp_path):
    np.savez(tmp_path / "ref.npz", mu=np.zeros(64), sigma=np.eye(64))
    F.load_statistics(tmp_path / "ref.npz")                                # any D without dim=
    with pytest.raises(ValueError, match="64-d features.*2048-d"):
        F.load_statistics(tmp_path / "ref.npz", dim=F.POOL_DIM)


def test_reference_info_reads_resolution_without_loading_images(tmp_path):
    np.savez(tmp_path / "adm.npz", mu=np.zeros(3), sigma=np.eye(3), arr_0=np.zeros((5, 12, 12, 3), np.uint8))
    np.savez(tmp_path / "ours.npz", mu=np.zeros(3), sigma=np.eye(3), resolution=np.array(16), num=np.array(7),
             features=np.zeros((9, 3), np.float32))
    np.savez(tmp_path / "jit.npz", mu=np.zeros(3), sigma=np.eye(3))
    assert F.reference_info(tmp_path / "adm.npz")[1:] == (12, None, None, 5)
    assert F.reference_info(tmp_path / "ours.npz")[1:] == (16, 7, 9, None)
    assert F.reference_info(tmp_path / "jit.npz")[1:] == (None, None, None, None)
