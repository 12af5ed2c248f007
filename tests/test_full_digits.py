"""Tests of the digits benchmark (full/digits/): data operators, classifier, metrics, sampling, the CLI
and its bad input (one error line, exit 2, before any training or classifier work; a damaged cache is
rebuilt rather than crashing the sweep)."""
from __future__ import annotations

import json
from pathlib import Path
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import pmf_ref as P
from full.digits.cli import main
from full.digits.classifier import CACHE_NAME, load_or_train_classifier, train_classifier
from full.digits.data import (HELDOUT_PER_CLASS, NUM_CLASSES, TRAIN_SIZE, DigitsDataset, load_digits_split,
                              off_subspace_rms, to_digits_coordinates, upsample)
from full.digits.experiments import EXPERIMENTS, experiment_arms
from full.digits.metrics import DigitsEvaluator
from full.digits.runs import arm_key, one_step_samples
from full.model import build_model, make_cond

resolutions = st.sampled_from([8, 16, 24, 32, 64])


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """One cached classifier for the whole module (training it is the slow part)."""
    folder = tmp_path_factory.mktemp("digits_classifier")
    load_or_train_classifier(folder)
    return folder


@pytest.fixture(scope="module")
def evaluator(classifier_dir):
    return DigitsEvaluator(load_or_train_classifier(classifier_dir))


# ---------------------------------------------------------------------------------------- data

def test_split_sizes_balanced_disjoint_and_in_range():
    data = load_digits_split()
    assert len(data.y_heldout) == HELDOUT_PER_CLASS * NUM_CLASSES
    assert torch.equal(torch.bincount(data.y_heldout), torch.full((NUM_CLASSES,), HELDOUT_PER_CLASS))
    assert len(data.y_train) + len(data.y_heldout) == 1797
    assert data.x_train.min() == -1.0 and data.x_train.max() == 1.0
    again = load_digits_split()
    assert torch.equal(again.x_heldout, data.x_heldout) and torch.equal(again.y_train, data.y_train)
    # sklearn's raw values 0..16 map to value / 8 - 1: every pixel is on that grid
    assert torch.equal((data.x_train + 1) * 8, ((data.x_train + 1) * 8).round())


@settings(max_examples=10)
@given(resolution=resolutions, seed=st.integers(0, 2 ** 16))
def test_upsample_matches_bilinear_interpolation(resolution, seed):
    x8 = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1
    expected = F.interpolate(x8, size=resolution, mode="bilinear", align_corners=False)
    torch.testing.assert_close(upsample(x8, resolution), expected, rtol=0, atol=1e-12)


@settings(max_examples=10)
@given(resolution=resolutions, seed=st.integers(0, 2 ** 16))
def test_digits_coordinates_round_trip_and_zero_off_subspace(resolution, seed):
    x8 = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 2 - 1
    image = upsample(x8, resolution)
    torch.testing.assert_close(to_digits_coordinates(image), x8, rtol=0, atol=1e-10)
    assert off_subspace_rms(image).max() < 1e-10


@pytest.mark.parametrize("resolution", [16, 64])
def test_off_subspace_rms_of_white_noise_closed_form(resolution):
    # E||(I - P) e||^2 = (D - 64) for e ~ N(0, I_D) and a rank-64 projector P, D = res^2.
    e = torch.randn(400, 1, resolution, resolution, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = (1 - 64 / resolution ** 2) ** 0.5
    assert off_subspace_rms(e).square().mean().sqrt().item() == pytest.approx(expected, rel=0.01)


def test_dataset_items_are_upsampled_training_digits():
    dataset = DigitsDataset(32)
    data = load_digits_split()
    image, label = dataset[5]
    assert image.shape == (1, 32, 32) and label == int(data.y_train[5])
    torch.testing.assert_close(image, F.interpolate(data.x_train[5:6], size=32, mode="bilinear")[0])


# ---------------------------------------------------------------------------------------- classifier, metrics

def test_classifier_training_is_deterministic():
    data = load_digits_split()
    first = train_classifier(data.x_train[:128], data.y_train[:128], epochs=1)
    second = train_classifier(data.x_train[:128], data.y_train[:128], epochs=1)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)


def test_classifier_cache_is_reused(classifier_dir, tmp_path):
    shutil.copy(classifier_dir / CACHE_NAME, tmp_path / CACHE_NAME)
    cached = torch.load(tmp_path / CACHE_NAME, weights_only=True)
    cached["state_dict"]["logits.bias"] += 123.0          # a marker that only the cached file carries
    torch.save(cached, tmp_path / CACHE_NAME)
    assert load_or_train_classifier(tmp_path).logits.bias.min() > 100.0


def test_metrics_floor_separates_real_from_corrupted_digits(evaluator):
    data = load_digits_split()
    floor = evaluator.floor(16)
    assert floor["accuracy"] > 0.95 and floor["off_subspace_rms"] < 1e-10
    real = upsample(data.x_heldout, 16)
    # wrong labels: same images and FD, accuracy near chance
    shuffled = evaluator.evaluate(real, data.y_heldout.roll(1))
    assert shuffled["fd"] == pytest.approx(floor["fd"], rel=1e-6) and shuffled["accuracy"] < 0.2
    # blank images are far from the data; noise leaves the subspace by its closed-form amount
    assert evaluator.evaluate(torch.zeros_like(real), data.y_heldout)["fd"] > 50 * floor["fd"]
    # (at half contrast, so that the [-1, 1] clip before scoring almost never touches the noisy pixels)
    noisy = evaluator.evaluate(0.5 * real + 0.1 * torch.randn(real.shape, generator=torch.Generator().manual_seed(0)),
                               data.y_heldout)
    assert noisy["off_subspace_rms"] == pytest.approx(0.1 * (1 - 64 / 256) ** 0.5, rel=0.05)


# ---------------------------------------------------------------------------------------- sampling

@pytest.mark.parametrize("prediction", ["x", "u"])
def test_one_step_samples_match_the_training_parametrisation(prediction):
    torch.manual_seed(0)
    model = build_model("pMF-T/4", num_classes=10, channels=1, resolution=16, patch=4, prediction=prediction).eval()
    with torch.no_grad():                 # the output layers start at zero; make the network non-trivial
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    images, labels = one_step_samples(model, per_class=2, omega=2.0, t_min=0.1, t_max=0.7)
    assert torch.equal(labels, torch.arange(20) % 10)
    from full.sample import sample_noise
    z_1 = sample_noise(torch.arange(20), (1, 16, 16), seed=1, noise_scale=model.noise_scale)
    ones, zeros = torch.ones(20), torch.zeros(20)
    with torch.no_grad():
        output = model.forward_u(z_1, zeros, ones, make_cond(labels, 2.0, 0.1, 0.7))
    # training reads the output as x_hat (x-pred) or as u with x_hat = z - max(t, t_eps) u (u-pred); at t = 1
    expected = output if prediction == "x" else P.x_from_average_velocity(z_1, output, ones)
    torch.testing.assert_close(images, expected, rtol=1e-5, atol=1e-5)


def test_experiment_arms_share_the_baseline_and_fix_the_token_grid():
    keys = {name: [arm_key(spec, _budget()) for _, spec in experiment_arms(name)] for name in EXPERIMENTS}
    baseline = keys["optimizer"][0]
    assert all(baseline in keys[name] for name in EXPERIMENTS if name != "snr")   # snr: a diagnostic of (a)
    for _, spec in experiment_arms("prediction") + experiment_arms("snr"):
        assert spec.resolution // spec.patch == 4
    assert len({key for group in keys.values() for key in group}) == 13   # 4 x-pred baselines are one arm


def _budget(steps: int = 10):
    from full.digits.runs import Budget
    return Budget(steps=steps, batch_size=8, lr=1e-3, seed=0, per_class=5, ema_kimg=2000.0)


def test_snr_arm_trains_at_its_noise_scale_and_leaves_the_data_alone(evaluator, tmp_path, monkeypatch):
    from full.checkpoint import load_model
    from full.digits import runs
    from full.step import TrainingStep

    label, spec = experiment_arms("snr")[0]
    assert spec.noise_scale == 4.0 and "noise scale 4" in label
    seen = {"datasets": [], "x_max": [], "e_std": []}
    real_train, real_forward = runs.train, TrainingStep.forward

    def spy_train(cfg, dataset, progress):
        seen["datasets"].append(dataset)
        return real_train(cfg, dataset=dataset, progress=progress)

    def spy_forward(self, x, y, randomness):
        seen["x_max"].append(x.abs().max().item())
        seen["e_std"].append(randomness.e.std().item())
        return real_forward(self, x, y, randomness)

    monkeypatch.setattr(runs, "train", spy_train)
    monkeypatch.setattr(TrainingStep, "forward", spy_forward)
    result = runs.run_arm(spec, _budget(steps=2), evaluator, out=tmp_path, sample_interval=(0.1, 0.7), progress=False)
    # the trainer saw the digits themselves: the dataset is the untouched 64 px split (|x| reaches 1)
    (dataset,) = seen["datasets"]
    assert torch.equal(dataset.images, DigitsDataset(64).images)
    # (2 steps, 3 forwards: the trainer checks the last state's next loss before it saves it)
    assert seen["x_max"] == [1.0, 1.0, 1.0]
    # ... and the loss saw e ~ N(0, 4^2): 8 x 64 x 64 draws put the std within 1% of 4 (1 without the scale)
    assert seen["e_std"] == pytest.approx([4.0, 4.0, 4.0], rel=0.01)
    # sampling starts from z_1 = 4 e too: the checkpoint rebuilds the network with its noise scale
    assert load_model(tmp_path / "runs" / result["key"] / "checkpoint.pt", "2000").noise_scale == 4.0
    assert "noisescale4" in result["key"] and "noisescale" not in arm_key(experiment_arms("sampler")[0][1], _budget())


# ---------------------------------------------------------------------------------------- command line

def test_cli_rejects_bad_arguments(capsys):
    for argv in (["sampler", "--steps", "0"], ["sampler", "--lr", "-1"], ["nope"], ["guidance", "--per-class", "1"]):
        with pytest.raises(SystemExit) as error:
            main(argv)
        assert error.value.code == 2
    assert "--per-class must be >= 2" in capsys.readouterr().err


def test_quick_mode_writes_every_experiment(classifier_dir, tmp_path, evaluator):
    shutil.copy(classifier_dir / CACHE_NAME, tmp_path / CACHE_NAME)
    summaries = main(["all", "--quick", "--out", str(tmp_path), "--no-progress", "--threads", "1"])
    for name in EXPERIMENTS:
        assert (tmp_path / f"{name}.png").stat().st_size > 0
        written = json.loads((tmp_path / f"{name}.json").read_text())
        assert written["rows"] == json.loads(json.dumps(summaries[name]["rows"]))
        arms = experiment_arms(name)
        assert len(written["rows"]) == sum(len(spec.omegas) for _, spec in arms)
        assert "held-out real digits (floor)" in (tmp_path / f"{name}.md").read_text()
        for key, value in evaluator.floor(16).items():
            # any resolution: the float32 pseudo-inverse round trip at 64 px moves the Frechet distance ~2e-6
            assert written["floor"][key] == pytest.approx(value, rel=1e-5, abs=1e-9)
    # the pMF baseline arm is trained once and shared by all four experiments
    assert len(list((tmp_path / "runs").iterdir())) == 13
    baseline = [json.loads((tmp_path / f"{name}.json").read_text())["rows"][0] for name in ("optimizer", "sampler")]
    assert baseline[0]["metrics"] == baseline[1]["metrics"]
    assert all(np.isfinite(row["metrics"]["fd"]) for row in summaries["prediction"]["rows"])


BAD_INPUTS = [   # (name, argv builder (tmp), text of the one error line)
    ("batch larger than the data", lambda t: ["sampler", "--batch-size", "2000", "--out", t], "exceeds the 1297 training"),
    ("zero steps", lambda t: ["sampler", "--steps", "0", "--out", t], "--steps must be >= 1"),
    ("negative lr", lambda t: ["sampler", "--lr", "-1", "--out", t], "--lr must be a finite number > 0"),
    ("infinite lr", lambda t: ["sampler", "--lr", "inf", "--out", t], "--lr must be a finite number > 0"),
    ("negative seed", lambda t: ["sampler", "--seed", "-1", "--out", t], "--seed must lie in [0, 2^31), got -1"),
    ("seed 2^40", lambda t: ["sampler", "--seed", str(2 ** 40), "--out", t], "--seed must lie in [0, 2^31)"),
    ("one sample per class", lambda t: ["guidance", "--per-class", "1", "--out", t], "--per-class must be >= 2"),
    ("unknown experiment", lambda t: ["nope", "--out", t], "invalid choice"),
    ("--out under a file", lambda t: ["sampler", "--out", _file(t) / "runs"], "is a file, not a folder"),
]


def _file(tmp_path):
    (tmp_path / "a_file").write_text("x")
    return tmp_path / "a_file"


@pytest.mark.parametrize("name, argv, message", BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_is_one_error_line_and_exit_2(name, argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main([str(arg) for arg in argv(tmp_path)])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert stop.value.code == 2 and len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "runs").exists() and not (tmp_path / "digits_classifier.pt").exists()


def test_report_only_without_cached_arms_is_one_error_line_and_exit_2(classifier_dir, tmp_path, capsys):
    shutil.copy(classifier_dir / CACHE_NAME, tmp_path / CACHE_NAME)
    with pytest.raises(SystemExit) as stop:
        main(["snr", "--report-only", "--out", str(tmp_path), "--threads", "1"])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert stop.value.code == 2 and len(errors) == 1 and "--report-only" in errors[0], errors
    assert not (tmp_path / "runs").exists() and not (tmp_path / "snr.json").exists()


def test_train_size_is_the_training_split():
    assert TRAIN_SIZE == len(load_digits_split().y_train) == 1297


def test_damaged_classifier_cache_is_rebuilt(tmp_path, monkeypatch, capsys):
    from full.digits import classifier as D

    (tmp_path / D.CACHE_NAME).write_bytes(b"half a file")
    trained = []
    monkeypatch.setattr(D, "train_classifier", lambda x, y: trained.append(1) or D.DigitsClassifier().eval())
    D.load_or_train_classifier(tmp_path)
    assert trained == [1] and "rebuilding the digits classifier cache" in capsys.readouterr().out
    D.load_or_train_classifier(tmp_path)                  # the rebuilt cache is read back, not retrained
    assert trained == [1]


def test_report_reads_null_metrics_of_strict_json_as_nan(tmp_path):
    from full.digits.report import markdown_table, save_figure
    from full.io import write_json

    row = {"label": "arm", "omega": 1.0, "weights": "ema", "train_seconds": 3.0, "final_raw_u": 2.0,
           "metrics": {"fd": float("nan"), "accuracy": 0.5, "off_subspace_rms": float("inf")}}
    write_json(tmp_path / "row.json", row)
    cached = json.loads((tmp_path / "row.json").read_text())
    assert cached["metrics"]["fd"] is None                      # what a cached arm result reads back
    floor = {"fd": 1.0, "accuracy": 0.9, "off_subspace_rms": 0.0}
    assert "| arm | 1 | nan | 50.0% | nan |" in markdown_table("x", [cached], floor, {})
    save_figure(tmp_path / "x.png", "x", [("arm", np.zeros((10, 1, 8, 8)).tolist())], [cached], floor)
    assert (tmp_path / "x.png").stat().st_size > 0


def test_precision_reaches_the_trainer_and_keeps_fp32_cache_keys():
    """--precision bf16 trains through full.train's bf16 policy in its own cache folder; an fp32 arm keeps the
    key it had before the field existed (the digest of the budget without it)."""
    import dataclasses
    import hashlib
    import json as json_

    from full.digits.runs import train_config

    spec = experiment_arms("sampler")[0][1]
    fp32, bf16 = _budget(), dataclasses.replace(_budget(), precision="bf16")
    old = {k: v for k, v in dataclasses.asdict(spec).items() if k != "omegas" and not (k == "noise_scale" and v == 1.0)}
    old.update({k: v for k, v in dataclasses.asdict(fp32).items() if k != "precision"})
    assert arm_key(spec, fp32).endswith(hashlib.sha1(json_.dumps(old, sort_keys=True).encode()).hexdigest()[:8])
    assert "-bf16-" in arm_key(spec, bf16) and arm_key(spec, bf16) != arm_key(spec, fp32)
    assert train_config(spec, bf16, Path("x")).precision == "bf16"
    assert train_config(spec, fp32, Path("x")).precision == "fp32"
