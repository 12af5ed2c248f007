"""Tests of FID / IS evaluation (full/fid.py, full/evaluate.py) and the guidance search (full/guidance_search.py).

Oracles: scipy's matrix square root of S_1 S_2 in float64 (the usual FID formula, a different
route from our eigendecomposition), the closed form for commuting covariances, exact Inception
Scores of one-hot and uniform predictions, and -- for the command-line plumbing, run with a
randomly initialised Inception that never touches the network -- FID = 0 between an image set
and reference statistics of the same images, and the search table against sample + evaluate.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import scipy.linalg
import torch
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from hypothesis import example, given, strategies as st
from PIL import Image

from full import evaluate as E
from full import fid as F
from full import guidance_search as G
from full import sample as S
from full.checkpoint import save_checkpoint
from full.data import center_crop_arr
from full.model import build_model

SCIPY_RTOL = 1e-9       # float64 sqrtm vs eigh on well-conditioned covariances
SINGULAR_ATOL = 1e-6    # sqrt of eigenvalues that rounding leaves at ~1e-16 instead of 0


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- Fréchet distance

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


# ---------------------------------------------------------------------------- Inception Score

@pytest.mark.parametrize("classes", [1, 2, 7, 40])
def test_inception_score_closed_form(classes):
    """Confident predictions spread evenly over K classes give IS = K; identical predictions give 1."""
    labels = np.arange(4 * classes) % classes
    logits = np.zeros((len(labels), 1008))
    logits[np.arange(len(labels)), labels] = 60.0      # softmax mass off the label: ~1007 e^-60
    mean, std = F.inception_score(logits, splits=1)
    assert mean == pytest.approx(classes, rel=1e-9) and std == 0
    assert F.inception_score(np.zeros((10, 1008)), splits=2)[0] == pytest.approx(1.0, abs=1e-12)


# ---------------------------------------------------------------------------- Inception weights

@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    return F.save_random_inception_weights(tmp_path_factory.mktemp("inception") / "random.pth", seed=0)


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Any download attempt fails the test; the torch hub cache is an empty folder."""
    def refuse(*args, **kwargs):
        raise AssertionError("attempted a download")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def test_inception_builds_from_local_file_only(no_network, random_weights):
    extractor = F.build_inception(random_weights)
    features = F.extract_features(extractor, [torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)],
                                  progress=False)
    assert features.pool.shape == (2, 2048) and features.logits.shape == (2, 1008)
    assert np.all(np.isfinite(features.pool)) and features.pool.std() > 0
    with pytest.raises(FileNotFoundError) as missing:
        F.build_inception(None)                          # the (empty) torch hub cache
    assert F.INCEPTION_WEIGHTS_FILENAME in str(missing.value) and str(no_network) in str(missing.value)


def test_evaluate_cli_missing_weights_names_file_and_folder(no_network, tmp_path, capsys):
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    F.save_statistics(tmp_path / "ref.npz", np.zeros(2048), np.eye(2048))
    with pytest.raises(SystemExit) as exit_info:
        E.main(["--samples", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"), "--is-splits", "2"])
    assert F.INCEPTION_WEIGHTS_FILENAME in str(exit_info.value) and str(no_network) in str(exit_info.value)


@pytest.mark.parametrize("flags, message", [
    (["--samples", "{tmp}/missing.npz"], "--samples"),
    (["--is-splits", "5"], "--is-splits must lie in [1, number of samples = 4]"),
    (["--batch-size", "0"], "--batch-size must be"),
    (["--ref", "{tmp}/missing.npz"], "ref-stats"),
])
def test_evaluate_cli_rejects_bad_arguments(tmp_path, capsys, flags, message, random_weights):
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    F.save_statistics(tmp_path / "ref.npz", np.zeros(2048), np.eye(2048))
    argv = ["--samples", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"), "--is-splits", "2",
            "--inception-weights", str(random_weights)]
    with pytest.raises(SystemExit):
        E.main(argv + [flag.format(tmp=tmp_path) for flag in flags])   # argparse keeps the last value
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------- plumbing with a random Inception

@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """root/<class>/<image>.png: 2 classes x 3 non-square images of different sizes."""
    root = tmp_path_factory.mktemp("imagefolder")
    rng = np.random.default_rng(0)
    sizes = [(40, 28), (30, 50), (17, 16)]
    for name in ("cat", "dog"):
        (root / name).mkdir()
        for i, (height, width) in enumerate(sizes):
            array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            Image.fromarray(array).save(root / name / f"{i}.png")
    return root


def _crops(root, resolution):
    files = sorted(path for folder in sorted(root.iterdir()) for path in folder.iterdir())
    return np.stack([np.asarray(center_crop_arr(Image.open(path).convert("RGB"), resolution)) for path in files])


def test_ref_stats_then_evaluate_gives_zero_fid_on_the_same_images(image_folder, random_weights, tmp_path, capsys):
    common = ["--inception-weights", str(random_weights), "--batch-size", "4", "--device", "cpu", "--no-progress"]
    E.main(["ref-stats", "--data", str(image_folder), "--resolution", "16", "--out", str(tmp_path),
            "--num-workers", "0", *common])
    (tmp_path / E.REF_STATS_NAME).rename(tmp_path / "ref.npz")
    crops = _crops(image_folder, 16)                      # the trainer's center crop, folder order
    np.savez(tmp_path / "samples.npz", arr_0=crops)
    (tmp_path / "pngs").mkdir()
    for i, crop in enumerate(crops):
        Image.fromarray(crop).save(tmp_path / "pngs" / f"{i:06d}.png")
    np.savez(tmp_path / "other.npz", arr_0=np.ascontiguousarray(crops[:, ::-1]))   # flipped images
    results = {}
    for name in ("samples.npz", "pngs", "other.npz"):
        E.main(["--samples", str(tmp_path / name), "--ref", str(tmp_path / "ref.npz"), "--is-splits", "2",
                "--out", str(tmp_path / f"{name}.out"), *common])
        results[name] = json.loads((tmp_path / f"{name}.out" / E.METRICS_NAME).read_text())
    assert "FID" in capsys.readouterr().out
    E.main(["--samples", str(tmp_path / "pngs"), "--ref", str(tmp_path / "ref.npz"), "--is-splits", "2", "--json",
            *common])
    assert json.loads(capsys.readouterr().out)["fid"] == results["pngs"]["fid"]   # --json: stdout is the record
    with np.load(tmp_path / "ref.npz") as ref:
        scale = float(np.trace(ref["sigma"]))
        assert int(ref["num"]) == 6 and ref["mu"].shape == (2048,)
    assert abs(results["samples.npz"]["fid"]) < 1e-7 * scale
    assert results["pngs"]["fid"] == pytest.approx(results["samples.npz"]["fid"], abs=1e-9 * scale)
    assert results["pngs"]["is_mean"] == pytest.approx(results["samples.npz"]["is_mean"], rel=1e-9)
    assert results["other.npz"]["fid"] > 1e-3 * scale      # a different image set is far from zero (~1e-2)
    assert results["samples.npz"]["num"] == 6


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """The contract's checkpoint layout holding a randomised pMF-T/2 under EMA key "500"."""
    torch.manual_seed(0)
    model = build_model("pMF-T/2", num_classes=10, v_head=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=generator))
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    save_checkpoint(path, {"model": model.state_dict(), "ema": {"500": model.state_dict()},
                           "config": {"model": {"preset": "pMF-T/2", "num_classes": 10}}})
    return path


def test_guidance_search_rows_match_sample_then_evaluate(tiny_checkpoint, image_folder, random_weights, tmp_path,
                                                         capsys):
    common = ["--inception-weights", str(random_weights), "--device", "cpu", "--no-progress", "--batch-size", "4"]
    E.main(["ref-stats", "--data", str(image_folder), "--resolution", "16", "--out", str(tmp_path),
            "--num-workers", "0", *common])
    (tmp_path / E.REF_STATS_NAME).rename(tmp_path / "ref.npz")
    G.main(["--ckpt", str(tiny_checkpoint), "--ref", str(tmp_path / "ref.npz"), "--omegas", "1", "3",
            "--intervals", "0.1,0.7", "--emas", "500", "--num", "4", "--is-splits", "2",
            "--out", str(tmp_path / "search"), *common])
    printed = capsys.readouterr().out
    rows = json.loads((tmp_path / "search" / G.RESULT_NAME).read_text())["rows"]
    assert [(row["omega"], row["t_min"], row["t_max"], row["ema"]) for row in rows] == [
        (1.0, 0.1, 0.7, "500"), (3.0, 0.1, 0.7, "500")]
    assert printed.count("<- best FID") == 1 and "omega" in printed
    assert rows[0]["fid"] != rows[1]["fid"]               # guidance changes the samples

    S.main(["--ckpt", str(tiny_checkpoint), "--ema", "500", "--omega", "3", "--interval", "0.1,0.7",
            "--num", "4", "--out", str(tmp_path / "samples"), "--format", "npz", "--grid", "0", "--device", "cpu",
            "--no-progress"])
    metrics = E.evaluate(E.EvalConfig(samples=str(tmp_path / "samples" / "samples.npz"), ref=str(tmp_path / "ref.npz"),
                                      inception_weights=str(random_weights), is_splits=2, progress=False))
    assert rows[1]["fid"] == pytest.approx(metrics["fid"], rel=1e-6)
    assert rows[1]["is_mean"] == pytest.approx(metrics["is_mean"], rel=1e-6)
    assert not os.path.exists(tmp_path / "samples" / "images" / "000000.png")   # --format npz only


@pytest.mark.parametrize("flags, message", [
    (["--emas", "123"], "available (half-life kimg): ['500']"),
    (["--emas", "fast"], "--emas: each must be"),
    (["--omegas", "0.9"], "--omegas: each must be"),
    (["--intervals", "0.5,0.2"], "--intervals: each needs"),
    (["--num", "1"], "--num must be"),
])
def test_guidance_search_cli_rejects_bad_arguments(tiny_checkpoint, tmp_path, capsys, flags, message):
    F.save_statistics(tmp_path / "ref.npz", np.zeros(2048), np.eye(2048))
    with pytest.raises(SystemExit):
        G.main(["--ckpt", str(tiny_checkpoint), "--ref", str(tmp_path / "ref.npz"), "--omegas", "2", *flags])
    assert message in capsys.readouterr().err
