"""The ImageNet trainer on CPU with tiny presets: learning, exact resume, atomic checkpoints, CLI errors.

``python -m full.train`` under bad input and faults: every user error is one line and exit 2, a diverged
run exits 3 without touching its last checkpoint, an interrupted run resumes to the uninterrupted result.

Tiny budgets (pMF-T/2, 16 px, batch 4, a few steps) so the whole module takes seconds per test on 2 cores.
Oracles: the uninterrupted run (bit-exact resume), the checkpoint's recorded step against the log, and a
planted pickle whose payload is shown to run under ``weights_only=False``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.utils._python_dispatch

import pmf_ref as P
from full import checkpoint as checkpoint_lib
from full.checkpoint import load_checkpoint, load_model, read_checkpoint_file, save_checkpoint
from full.data import SyntheticDataset
from full.model import build_model
from full.step import StepRandomness, TrainingStep
from full.train import DivergenceError, TrainConfig, UsageError, main, train


pytestmark = pytest.mark.usefixtures("one_thread")


LOGGED = ("loss", "loss_u", "loss_v", "raw_u", "raw_v", "grad_norm")


def _config(tmp_path, **overrides) -> TrainConfig:
    settings = dict(preset="pMF-T/2", num_classes=10, batch_size=8, steps=4, perceptual="none", out=str(tmp_path),
                    ckpt_every=1000, log_every=1, ema_half_lives_kimg=(0.5, 1.0), device="cpu", num_workers=0)
    return TrainConfig(**{**settings, **overrides})


def _dataset(n: int = 16) -> SyntheticDataset:
    return SyntheticDataset(n, 16, num_classes=10, seed=1)


def _fixed_raw_loss(model, dataset, seed: int = 123) -> float:
    """Mean of raw_u + raw_v over the whole set at fixed randomness (an evaluation, no guidance)."""
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    y = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    generator = torch.Generator().manual_seed(seed)
    r, t = P.sample_time_pair(len(x), generator=generator)
    e = torch.randn(x.shape, generator=generator)
    ones, zeros = torch.ones_like(t), torch.zeros_like(t)
    no_guidance = StepRandomness(e, r, t, ones, zeros, ones, torch.zeros_like(t, dtype=torch.bool),
                                 torch.zeros(len(x), 4, dtype=torch.long))
    terms = TrainingStep.from_preset(model, "pMF-T/2")(x, y, no_guidance)
    return (terms["raw_u"] + terms["raw_v"]).mean().item()


def test_loss_decreases_on_synthetic_set(tmp_path):
    dataset = _dataset(16)
    torch.manual_seed(0)
    before = _fixed_raw_loss(build_model("pMF-T/2", num_classes=10), dataset)
    result = train(_config(tmp_path, steps=24, lr=3e-3), dataset, progress=False)
    after = _fixed_raw_loss(result.model, dataset)
    assert after < 0.9 * before, (before, after)
    # The logged history is finite and has every term.
    assert all(torch.isfinite(torch.tensor([record[name] for name in LOGGED])).all() for record in result.history)


def test_resume_reproduces_uninterrupted_run_bit_for_bit(tmp_path):
    dataset = _dataset(12)          # 12 images, global batch 8: the resume crosses an epoch boundary
    straight = train(_config(tmp_path / "straight", steps=4), dataset, progress=False)
    first = train(_config(tmp_path / "split", steps=2), dataset, progress=False)
    resumed = train(_config(tmp_path / "split", steps=4, resume=str(first.checkpoint)), dataset, progress=False)
    history = first.history + resumed.history
    assert [record["step"] for record in history] == [1, 2, 3, 4]
    for name in LOGGED:
        assert [record[name] for record in history] == [record[name] for record in straight.history], name
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    for half_life, average in straight.emas.items():
        for key, value in average.state_dict().items():
            assert torch.equal(value, resumed.emas[half_life].state_dict()[key]), (half_life, key)


def test_gradient_accumulation_matches_full_batch(tmp_path):
    """accum_steps=2 (two micro-batches of 4, rows sliced from the same global randomness) == one batch of 8."""
    dataset = _dataset(16)
    # Adam, not Muon: bf16 Newton-Schulz would magnify float summation-order differences (see tests/test_full_distributed.py).
    whole = train(_config(tmp_path / "whole", steps=2, optimizer="adam"), dataset, progress=False)
    accumulated = train(_config(tmp_path / "accum", steps=2, accum_steps=2, optimizer="adam"), dataset,
                        progress=False)
    for key, value in whole.model.state_dict().items():
        torch.testing.assert_close(accumulated.model.state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=key)
    torch.testing.assert_close(torch.tensor([r["raw_u"] for r in accumulated.history]),
                               torch.tensor([r["raw_u"] for r in whole.history]), rtol=1e-5, atol=0)


def test_checkpoint_kill_during_save_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1, "weights": torch.arange(5.0)})

    def torch_save_dies_midway(state, file):
        file.write(b"partial bytes of a checkpoint")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(checkpoint_lib.torch, "save", torch_save_dies_midway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"step": 2, "weights": torch.zeros(5)})
    monkeypatch.undo()
    previous = read_checkpoint_file(path)
    assert previous["step"] == 1 and torch.equal(previous["weights"], torch.arange(5.0))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]          # no temp file left behind


def test_checkpoint_rename_failure_keeps_previous(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1})
    monkeypatch.setattr(checkpoint_lib.os, "replace", lambda *args: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert read_checkpoint_file(path)["step"] == 1 and sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]


def test_load_model_selects_ema_and_lists_missing(tmp_path):
    result = train(_config(tmp_path, steps=2, ckpt_every=2), _dataset(8), progress=False)
    checkpoint = load_checkpoint(result.checkpoint)
    assert set(checkpoint) >= {"model", "ema", "optimizer", "step", "images_seen", "rng", "config"}
    assert sorted(checkpoint["ema"]) == ["0.5", "1"] and checkpoint["step"] == 2 and checkpoint["images_seen"] == 16
    model = load_model(result.checkpoint, ema="1")
    assert not model.training and model.v_head is None
    for key, value in model.state_dict().items():
        assert torch.equal(value, result.emas["1"].state_dict()[key]), key
    with pytest.raises(KeyError, match=r"available EMAs.*'0.5', '1'"):
        load_model(result.checkpoint, ema="2000")


def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(0)
    model = build_model("pMF-T/2", num_classes=10)
    with torch.no_grad():                    # the heads start at zero: give every weight a value
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    e = torch.randn(4, 3, 16, 16)
    t = torch.tensor([0.2, 0.5, 0.7, 0.9])
    y, omega = torch.tensor([0, 1, 2, 3]), torch.tensor([1.0, 2.0, 4.0, 8.0])
    fp32 = torch.cat(TrainingStep.from_preset(model, "pMF-T/2").guidance_velocities(e, t, omega, y))
    bf16 = torch.cat(TrainingStep.from_preset(model, "pMF-T/2", autocast_dtype=torch.bfloat16)
                     .guidance_velocities(e, t, omega, y))
    fp32, bf16 = (v * torch.cat([t, t])[:, None, None, None] for v in (fp32, bf16))   # t v = z - x_hat
    assert bf16.dtype == torch.float32
    assert not torch.equal(fp32, bf16)                                # autocast really ran
    torch.testing.assert_close(bf16, fp32, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("argv, message", [
    (["--preset", "pMF-Q/9", "--data", "synthetic"], "--preset"),
    (["--preset", "pMF-T/4", "--data", "synthetic", "--steps", "0"], "--steps must be >= 1"),
    (["--preset", "pMF-T/4", "--data", "/no/such/folder"], "--data"),
    (["--preset", "pMF-T/4", "--data", "synthetic", "--batch-size", "3"], "divisible by the number of processes"),
    (["--preset", "pMF-T/4", "--data", "synthetic", "--ema-kimg", "500,x"], "--ema-kimg"),
    (["--preset", "pMF-T/4", "--data", "synthetic", "--batch-size", "6", "--accum-steps", "2"], "--accum-steps"),
])
def test_cli_bad_input_one_line_error(argv, message, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and message in error_lines[0], error_lines


def test_empty_data_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "class_a").mkdir()
    with pytest.raises(SystemExit):
        main(["--preset", "pMF-T/2", "--data", str(tmp_path), "--steps", "1", "--batch-size", "2",
              "--device", "cpu", "--perceptual", "none", "--out", str(tmp_path / "out")])
    assert "holds no images" in capsys.readouterr().err


# ---------------------------------------------------------------------------- watching a run (full.monitor)

class _TinyFeatures(torch.nn.Module):
    """Stand-in for the Inception network: fixed random projections, uint8 (B, 3, H, W) -> (pool, logits)."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.pool = torch.nn.Parameter(torch.randn(3 * 16 * 16, 8, generator=generator) / 16)
        self.logits = torch.nn.Parameter(torch.randn(8, 5, generator=generator))

    def forward(self, images):
        pool = torch.tanh((images.float() / 255 - 0.5).flatten(1) @ self.pool)
        return pool, pool @ self.logits


@pytest.fixture
def tiny_fid(monkeypatch, tmp_path):
    """full.train's FID with the stand-in network (the real Inception path: tests/test_full_monitor.py)."""
    from full import fid as fid_lib
    from full import monitor

    extractor = _TinyFeatures()
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    mu, sigma = fid_lib.feature_statistics(fid_lib.extract_features(extractor, [images], progress=False).pool)
    reference = monitor.FIDReference(extractor, mu, sigma)
    monkeypatch.setattr("full.train.prepare_fid", lambda ref, weights, device, **_: reference)
    (tmp_path / "ref.npz").write_bytes(b"")
    return reference, str(tmp_path / "ref.npz")


def _watched(tmp_path, ref, **overrides) -> TrainConfig:
    return _config(tmp_path / "run", **{**dict(sample_every=2, fid_every=2, fid_num=4, fid_ref=ref, tensorboard=True,
                                              keep_last=2, ckpt_every=1), **overrides})


def test_watched_run_writes_grids_fid_tensorboard_and_numbered_checkpoints(tmp_path, tiny_fid, capsys):
    import json

    from tensorboard.backend.event_processing import event_accumulator

    from full import monitor

    reference, ref = tiny_fid
    result = train(_watched(tmp_path, ref), _dataset(), progress=False)
    printed = [line for line in capsys.readouterr().err.splitlines() if "FID" in line]
    assert [line.split(":")[0] for line in printed] == ["step 2", "step 4"]      # FID printed when computed
    run = tmp_path / "run"
    names = sorted(path.name for path in (run / monitor.SAMPLES_DIR).iterdir())
    assert names == [f"step00000000{step}-{name}.png" for step in (2, 4) for name in ("ema0.5", "ema1", "raw")]
    fid = [json.loads(line) for line in (run / monitor.FID_LOG).read_text().splitlines()]
    assert [(row["step"], row["ema"], row["num"]) for row in fid] == [(2, "1", 4), (4, "1", 4)]
    # The last evaluation is that of the returned EMA, recomputed.
    omega, t_min, t_max = monitor.sampling_settings("pMF-T/2")
    again = monitor.in_training_fid(result.emas["1"], reference, num=4, omega=omega, t_min=t_min, t_max=t_max)
    assert fid[-1]["fid"] == pytest.approx(again["fid"], rel=1e-9) and fid[-1]["omega"] == omega
    logged = {row["step"]: row for row in map(json.loads, (run / "log.jsonl").read_text().splitlines())}
    assert [logged[step]["fid"] for step in (2, 4)] == [row["fid"] for row in fid] and "fid" not in logged[1]

    events = event_accumulator.EventAccumulator(str(run / monitor.TENSORBOARD_DIR),
                                                size_guidance={event_accumulator.IMAGES: 0})
    events.Reload()
    assert [event.step for event in events.Scalars("train/raw_u")] == [1, 2, 3, 4]
    assert [event.value for event in events.Scalars("train/raw_u")] == pytest.approx(
        [record["raw_u"] for record in result.history], rel=1e-6)
    assert [event.step for event in events.Scalars("train/fid")] == [2, 4]
    assert {"train/lr", "train/grad_norm", "train/images_per_s"} <= set(events.Tags()["scalars"])
    assert set(events.Tags()["images"]) == {"samples/ema0.5", "samples/ema1", "samples/raw"}

    assert [path.name for _, path in checkpoint_lib.numbered_checkpoints(run)] == [
        "checkpoint-000000003.pt", "checkpoint-000000004.pt"]
    assert (run / "checkpoint.pt").resolve() == (run / "checkpoint-000000004.pt").resolve()
    assert result.checkpoint == run / "checkpoint-000000004.pt"
    assert checkpoint_lib.latest_checkpoint(run) == run / "checkpoint-000000004.pt"


def test_resume_from_run_folder_picks_latest_readable_and_matches_uninterrupted(tmp_path):
    straight = train(_config(tmp_path / "straight", steps=4, keep_last=3, ckpt_every=1), _dataset(), progress=False)
    run = tmp_path / "run"
    train(_config(run, steps=3, keep_last=3, ckpt_every=1), _dataset(), progress=False)
    (run / "checkpoint-000000003.pt").write_bytes(b"truncated")           # a damaged newest snapshot
    assert checkpoint_lib.latest_checkpoint(run) == run / "checkpoint-000000002.pt"
    resumed = train(_config(run, steps=4, keep_last=3, ckpt_every=1, resume=str(run)), _dataset(), progress=False)
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    assert [step for step, _ in checkpoint_lib.numbered_checkpoints(run)] == [2, 3, 4]
    with pytest.raises(checkpoint_lib.CheckpointError, match="no readable checkpoint"):
        checkpoint_lib.latest_checkpoint(tmp_path)


def test_keep_latest_deletes_older_and_abandoned_snapshots(tmp_path):
    for step in (1, 2, 3, 5, 6):
        (tmp_path / checkpoint_lib.numbered_checkpoint_name(step)).write_bytes(b"x")
    deleted = checkpoint_lib.keep_latest(tmp_path, tmp_path / checkpoint_lib.numbered_checkpoint_name(3), keep_last=2)
    # 5 and 6 belong to a trajectory left by resuming from 2: they are trained again.
    assert sorted(path.name for path in deleted) == ["checkpoint-000000001.pt", "checkpoint-000000005.pt",
                                                     "checkpoint-000000006.pt"]
    assert [step for step, _ in checkpoint_lib.numbered_checkpoints(tmp_path)] == [2, 3]
    assert os.readlink(tmp_path / "checkpoint.pt") == "checkpoint-000000003.pt"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint-000000002.pt",
                                                                "checkpoint-000000003.pt", "checkpoint.pt"]


def test_resume_in_place_cuts_fid_log_and_overwrite_clears_monitor_files(tmp_path, tiny_fid):
    import json

    from full import monitor

    _, ref = tiny_fid
    run = tmp_path / "run"
    train(_watched(tmp_path, ref, steps=4, keep_last=4), _dataset(), progress=False)
    train(_watched(tmp_path, ref, steps=4, keep_last=4, resume=str(run / "checkpoint-000000002.pt")), _dataset(),
          progress=False)
    steps = [json.loads(line)["step"] for line in (run / monitor.FID_LOG).read_text().splitlines()]
    assert steps == [2, 4]                                # step 4 evaluated again, logged once
    train(_config(run, steps=1, overwrite=True), _dataset(), progress=False)
    left = sorted(str(path.relative_to(run)) for path in run.rglob("*") if path.is_file())
    assert left == [".lock", "checkpoint.pt", "config.json", "log.jsonl"], left


def test_compile_flag_compiles_the_objective_and_trains_the_same(tmp_path, monkeypatch):
    compiled = []

    def recording_compile(module, *args, **kwargs):
        compiled.append(module)
        return module

    monkeypatch.setattr(torch, "compile", recording_compile)
    eager = train(_config(tmp_path / "eager", steps=2), _dataset(), progress=False)
    assert not compiled
    with_flag = train(_config(tmp_path / "compiled", steps=2, compile=True), _dataset(), progress=False)
    assert len(compiled) == 1 and isinstance(compiled[0], TrainingStep)
    assert [r["loss"] for r in with_flag.history] == [r["loss"] for r in eager.history]


@pytest.mark.parametrize("extra, message", [
    (["--fid-every", "2"], "--fid-every needs --ref"),
    (["--fid-every", "2", "--ref", "/no/such/ref.npz"], "--ref"),
    (["--keep-last", "-1"], "--keep-last"),
    (["--sample-omega", "0.5"], "--sample-omega"),
    (["--sample-t-max", "1.5"], "--sample-t-max"),
    (["--inception-weights", "/no/such.pth"], "--inception-weights"),
])
def test_cli_watch_flags_bad_input_one_line_error(extra, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        main(["--preset", "pMF-T/2", "--data", "synthetic", "--out", str(tmp_path / "out"), *extra])
    assert raised.value.code == 2
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and message in error_lines[0], error_lines


def test_cli_missing_inception_weights_refused_at_start(tmp_path, monkeypatch, capsys):
    from full import fid as fid_lib

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_hub"))
    fid_lib.save_statistics(tmp_path / "ref.npz", torch.zeros(3).numpy(), torch.eye(3).numpy())
    with pytest.raises(SystemExit) as raised:
        main(["--preset", "pMF-T/2", "--num-classes", "10", "--data", "synthetic", "--steps", "2", "--batch-size", "2",
              "--perceptual", "none", "--device", "cpu", "--num-workers", "0", "--out", str(tmp_path / "out"),
              "--fid-every", "1", "--ref", str(tmp_path / "ref.npz")])
    assert raised.value.code == 2
    assert fid_lib.INCEPTION_WEIGHTS_FILENAME in capsys.readouterr().err
    assert not (tmp_path / "out" / "log.jsonl").exists()                 # nothing was trained


def test_cli_resume_from_a_folder_without_checkpoints(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as raised:
        main(["--resume", str(tmp_path / "empty"), "--out", str(tmp_path / "empty")])
    assert raised.value.code == 2 and "no readable checkpoint" in capsys.readouterr().err


TINY = ["--preset", "pMF-T/2", "--data", "synthetic", "--batch-size", "4", "--perceptual", "none", "--device", "cpu",
        "--ema-kimg", "1", "--log-every", "1", "--num-classes", "10"]
REPO = Path(__file__).resolve().parents[1]


def run_cli(argv, capsys, stderr: list | None = None) -> tuple[int, list[str]]:
    """(exit code, stderr lines that say error:) of ``main(argv)``; 0 when it returns. Appends stderr to ``stderr``."""
    try:
        main([str(arg) for arg in argv])
        code = 0
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    if stderr is not None:
        stderr.append(err)
    return code, [line for line in err.splitlines() if "error:" in line]


def _steps(log: Path) -> list[int]:
    return [json.loads(line)["step"] for line in log.read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A 2-step CLI run: its folder holds checkpoint.pt (step 2) and log.jsonl."""
    out = tmp_path_factory.mktemp("finished")
    main([*TINY, "--steps", "2", "--out", str(out)])
    return out


def _planted(path: Path, marker: Path) -> Path:
    from test_full_checkpoint import plant_pickle   # the payload's helper lives with the checkpoint tests
    plant_pickle(path, marker)
    return path


def _bad_resume_file(kind: str, tmp_path: Path, finished_run: Path) -> Path:
    path = tmp_path / f"{kind}.pt"
    good = (finished_run / "checkpoint.pt").read_bytes()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good[: len(good) // 3])
    elif kind == "garbage":
        path.write_bytes(b"\x00\x01garbage" * 300)
    elif kind == "foreign":
        torch.save({"weight": torch.zeros(2)}, path)
    elif kind == "sampling-only":
        state = read_checkpoint_file(finished_run / "checkpoint.pt")
        save_checkpoint(path, {"model": state["model"], "config": state["config"]})
    elif kind == "pickle":
        _planted(path, tmp_path / "payload-ran")
    return path


# ---------------------------------------------------------------------------- the bad-input table

BAD_INPUTS = [   # (name, argv builder, exit code, text the one error line must contain)
    ("unknown preset", lambda t, f: [*TINY, "--preset", "pMF-Q/9"], 2, "--preset"),
    ("zero steps", lambda t, f: [*TINY, "--steps", "0"], 2, "--steps must be >= 1"),
    ("negative lr", lambda t, f: [*TINY, "--lr", "-1"], 2, "--lr must be > 0"),
    ("missing data folder", lambda t, f: [*TINY, "--data", t / "absent"], 2, "--data"),
    ("no --data, no --resume", lambda t, f: ["--preset", "pMF-T/2"], 2, "--data is required"),
    ("empty data folder", lambda t, f: [*TINY, "--data", _empty_classes(t), "--out", t / "o"], 2, "holds no images"),
    ("batch larger than the data", lambda t, f: [*TINY, "--batch-size", "2000", "--out", t / "o"], 2,
     "fewer than one global batch"),
    ("--out under a file", lambda t, f: [*TINY, "--out", _file(t) / "run"], 2, "is a file, not a folder"),
    ("--out holds a run", lambda t, f: [*TINY, "--steps", "4", "--out", f], 2, "already holds checkpoint.pt"),
    ("missing --resume file", lambda t, f: ["--resume", t / "absent.pt"], 2, "--resume"),
    ("--steps at the checkpoint's step", lambda t, f: ["--resume", f / "checkpoint.pt", "--steps", "2"], 2,
     "not beyond the checkpoint's step 2"),
    ("--seed changed on resume", lambda t, f: ["--resume", f / "checkpoint.pt", "--steps", "3", "--seed", "7"], 2,
     "--seed cannot change on resume"),
    ("--ema-kimg changed on resume", lambda t, f: ["--resume", f / "checkpoint.pt", "--steps", "3", "--ema-kimg", "2"],
     2, "--ema-kimg cannot change on resume"),
    ("--no-guidance on resume", lambda t, f: ["--resume", f / "checkpoint.pt", "--steps", "3", "--no-guidance"], 2,
     "--no-guidance cannot change on resume"),
    ("resume into another run's folder", lambda t, f: ["--resume", _copy(f, t), "--steps", "3", "--out", f], 2,
     "of another run than --resume"),
    *[(f"{kind} --resume file", (lambda kind: lambda t, f: ["--resume", _bad_resume_file(kind, t, f), "--out",
                                                             t / "o"])(kind), 2, message)
      for kind, message in [("empty", "is empty (0 bytes)"), ("truncated", "truncated or corrupt"),
                            ("garbage", "not a torch file"), ("foreign", "not a full.train checkpoint"),
                            ("sampling-only", "cannot be used to resume"), ("pickle", "refused: it holds Python")]],
]


def _empty_classes(tmp_path: Path) -> Path:
    (tmp_path / "data" / "class_a").mkdir(parents=True)
    return tmp_path / "data"


def _file(tmp_path: Path) -> Path:
    (tmp_path / "a_file").write_text("x")
    return tmp_path / "a_file"


def _copy(finished_run: Path, tmp_path: Path) -> Path:
    (tmp_path / "copy.pt").write_bytes((finished_run / "checkpoint.pt").read_bytes())
    return tmp_path / "copy.pt"


@pytest.mark.parametrize("name, argv, code, message", BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_is_one_error_line_and_an_exit_code(name, argv, code, message, tmp_path, finished_run, capsys):
    before = {path.name: path.stat().st_mtime_ns for path in finished_run.iterdir()}
    exit_code, errors = run_cli(argv(tmp_path, finished_run), capsys)
    assert exit_code == code and len(errors) == 1 and message in errors[0], (exit_code, errors)
    assert {path.name: path.stat().st_mtime_ns for path in finished_run.iterdir()} == before   # nothing touched
    assert not (tmp_path / "payload-ran").exists()


# ---------------------------------------------------------------------------- divergence

class _TurnsNaN(torch.utils.data.Dataset):
    """Synthetic images that become NaN from the ``bad_from``-th item fetched on."""

    def __init__(self, bad_from: int):
        self.data, self.fetched, self.bad_from = SyntheticDataset(16, 16, num_classes=10, seed=1), 0, bad_from

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        self.fetched += 1
        x, y = self.data[index]
        return (torch.full_like(x, float("nan")) if self.fetched > self.bad_from else x), y


def _cli_config(out, **overrides) -> TrainConfig:
    settings = dict(preset="pMF-T/2", num_classes=10, batch_size=4, steps=6, perceptual="none", out=str(out),
                    ckpt_every=2, log_every=1, ema_half_lives_kimg=(1.0,), device="cpu", num_workers=0)
    return TrainConfig(**{**settings, **overrides})


def test_divergence_stops_before_the_step_and_keeps_the_last_checkpoint(tmp_path):
    with pytest.raises(DivergenceError, match=r"step 4 is non-finite .*last checkpoint: .*checkpoint.pt \(step 2\)"):
        train(_cli_config(tmp_path), _TurnsNaN(bad_from=3 * 4), progress=False)
    state = read_checkpoint_file(tmp_path / "checkpoint.pt")
    assert state["step"] == 2
    assert all(torch.isfinite(tensor).all() for tensor in state["model"].values())
    assert _steps(tmp_path / "log.jsonl") == [1, 2, 3]                      # the bad step is not logged


def test_divergence_between_check_points_is_found_at_the_next_and_nothing_after_it_is_saved(tmp_path):
    """Log every 3rd step, checkpoint every 2nd: step 4 (NaN) is no check point, so its update is applied in
    memory; the forward of step 5 clears the pending checkpoint of step 4, reads the window (steps 4, 5) and
    stops at step 4 before saving. The named checkpoint (step 2) is the last good one."""
    with pytest.raises(DivergenceError, match=r"step 4 is non-finite .*last checkpoint: .*checkpoint.pt \(step 2\)"):
        train(_cli_config(tmp_path, log_every=3), _TurnsNaN(bad_from=3 * 4), progress=False)
    state = read_checkpoint_file(tmp_path / "checkpoint.pt")
    assert state["step"] == 2
    assert all(torch.isfinite(tensor).all() for tensor in state["model"].values())
    assert _steps(tmp_path / "log.jsonl") == [3]


def test_divergence_through_the_cli_exits_3_and_saves_no_diverged_state(tmp_path, capsys):
    """An absurd learning rate: step 1 is finite, its update blows the weights up, step 2 is NaN. The state
    after step 1 is the diverged one: it is never saved (a save waits for the next step's guard)."""
    code, errors = run_cli([*TINY, "--lr", "1e30", "--steps", "4", "--ckpt-every", "1", "--out", tmp_path], capsys)
    assert code == 3 and len(errors) == 1 and "step 2 is non-finite" in errors[0], errors
    assert "last checkpoint: none yet" in errors[0]
    assert not (tmp_path / "checkpoint.pt").exists()


# ---------------------------------------------------------------------------- resume tells the truth

def test_resume_takes_unspecified_flags_from_the_checkpoint_and_applies_lr(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli([*TINY, "--steps", "2", "--seed", "5", "--out", out], capsys)[0] == 0
    # Neither --preset (default pMF-B/16) nor --data nor --seed: all three come from the checkpoint.
    assert run_cli(["--resume", out / "checkpoint.pt", "--steps", "3", "--lr", "5e-4"], capsys)[0] == 0
    state = read_checkpoint_file(out / "checkpoint.pt")
    assert state["step"] == 3 and state["config"]["train"]["seed"] == 5
    assert state["config"]["train"]["preset"] == "pMF-T/2" and state["config"]["train"]["lr"] == 5e-4
    assert state["lr_history"] == [[0, 1e-3], [2, 5e-4]]
    assert all(group["lr"] == 5e-4 for optimizer in state["optimizer"].values() for group in optimizer["param_groups"])
    assert _steps(out / "log.jsonl") == [1, 2, 3]


def test_overwrite_starts_a_new_run_in_place(tmp_path, capsys):
    assert run_cli([*TINY, "--steps", "2", "--out", tmp_path], capsys)[0] == 0
    assert run_cli([*TINY, "--steps", "1", "--out", tmp_path, "--overwrite"], capsys)[0] == 0
    assert _steps(tmp_path / "log.jsonl") == [1] and read_checkpoint_file(tmp_path / "checkpoint.pt")["step"] == 1


def test_resume_refuses_a_changed_recipe_in_process(tmp_path):
    first = train(_cli_config(tmp_path, steps=2), SyntheticDataset(16, 16, num_classes=10, seed=1), progress=False)
    with pytest.raises(UsageError, match="time_sampler='full' but this run asks for 'diagonal'"):
        train(_cli_config(tmp_path, steps=4, resume=str(first.checkpoint), time_sampler="diagonal"),
              SyntheticDataset(16, 16, num_classes=10, seed=1), progress=False)


# ---------------------------------------------------------------------------- interrupts and kills

class _SignalsAt(torch.utils.data.Dataset):
    """Synthetic data that sends ``signum`` to this process while the ``at``-th item is fetched."""

    def __init__(self, signum: int, at: int):
        self.data, self.fetched, self.signum, self.at = SyntheticDataset(16, 16, num_classes=10, seed=1), 0, signum, at

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        self.fetched += 1
        if self.fetched == self.at:
            os.kill(os.getpid(), self.signum)
        return self.data[index]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """3 uninterrupted steps: what every interrupted-and-resumed run below must reproduce bit for bit."""
    return train(_cli_config(tmp_path_factory.mktemp("straight"), steps=3),
                 SyntheticDataset(16, 16, num_classes=10, seed=1), progress=False)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_at_the_step_boundary_and_resume_matches_the_straight_run(signum, tmp_path, straight_run):
    stopped = train(_cli_config(tmp_path, steps=3, ckpt_every=100), _SignalsAt(signum, at=4 + 2), progress=False)
    assert stopped.stopped_by == signum                                         # sent while fetching step 2
    assert read_checkpoint_file(tmp_path / "checkpoint.pt")["step"] == 2 == stopped.history[-1]["step"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL                    # handlers restored
    resumed = train(_cli_config(tmp_path, steps=3, resume=str(tmp_path / "checkpoint.pt")),
                    SyntheticDataset(16, 16, num_classes=10, seed=1), progress=False)
    assert _steps(tmp_path / "log.jsonl") == [1, 2, 3]
    for key, value in straight_run.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_no_space_left_keeps_the_previous_checkpoint_and_exits_1(tmp_path, capsys, monkeypatch):
    real_save, calls = torch.save, []

    def save_until_the_disk_is_full(state, file):
        calls.append(1)
        if len(calls) > 1:
            file.write(b"the first bytes")
            raise OSError(28, "No space left on device")
        real_save(state, file)

    monkeypatch.setattr(checkpoint_lib.torch, "save", save_until_the_disk_is_full)
    code, errors = run_cli([*TINY, "--steps", "2", "--ckpt-every", "1", "--out", tmp_path], capsys)
    monkeypatch.undo()
    assert code == 1 and len(errors) == 1 and "no space left on device (the previous checkpoint is kept)" in errors[0]
    assert read_checkpoint_file(tmp_path / "checkpoint.pt")["step"] == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == [".lock", "checkpoint.pt", "config.json", "log.jsonl"]


KILLED_DURING_SAVE = textwrap.dedent("""
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    from full import checkpoint
    real_save, calls = torch.save, []
    def save_then_die(state, file):
        calls.append(1)
        if len(calls) == 2:                   # the second checkpoint: half written, then SIGKILL
            file.write(b"half of a checkpoint")
            file.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        real_save(state, file)
    checkpoint.torch.save = save_then_die
    from full.train import main
    main(sys.argv[1:])
""")


def test_kill_during_save_then_resume_loses_nothing(tmp_path, capsys):
    out = tmp_path / "killed"
    argv = [*TINY, "--steps", "3", "--ckpt-every", "1", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    child = subprocess.run([sys.executable, "-c", KILLED_DURING_SAVE, *argv], cwd=REPO, env=env,
                           capture_output=True, text=True)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert read_checkpoint_file(out / "checkpoint.pt")["step"] == 1           # the first checkpoint is whole
    assert [path.name for path in out.iterdir() if path.name.startswith(".tmp-")]   # the kill left a temp file
    assert _steps(out / "log.jsonl") == [1, 2]                                # logged past the checkpoint
    stderr = []
    code, _ = run_cli(["--resume", out / "checkpoint.pt"], capsys, stderr)    # everything from the checkpoint
    assert code == 0 and "removed 1 temp file(s)" in stderr[0] and "dropped 1 line(s)" in stderr[0]
    assert not [path.name for path in out.iterdir() if path.name.startswith(".tmp-")]
    assert _steps(out / "log.jsonl") == [1, 2, 3]                             # each step exactly once
    straight = tmp_path / "straight"
    assert run_cli([*TINY, "--steps", "3", "--ckpt-every", "1", "--out", straight], capsys)[0] == 0
    resumed, reference = (read_checkpoint_file(path / "checkpoint.pt") for path in (out, straight))
    for key, value in reference["model"].items():
        assert torch.equal(value, resumed["model"][key]), key


def test_sigterm_from_outside_saves_and_exits_143(tmp_path):
    """A real SIGTERM, as a scheduler sends it, to a CLI run: it checkpoints and exits 128 + 15."""
    out = tmp_path / "preempted"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-m", "full.train", *TINY, "--steps", "100000", "--ckpt-every",
                              "100000", "--out", str(out)], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    log = out / "log.jsonl"
    while not (log.exists() and log.read_text().count("\n") >= 1):           # it is training
        assert child.poll() is None, child.stderr.read()[-2000:]
        time.sleep(0.2)
    child.send_signal(signal.SIGTERM)
    _, stderr = child.communicate(timeout=300)
    assert child.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr
    state = read_checkpoint_file(out / "checkpoint.pt")
    assert state["step"] == _steps(log)[-1] and _steps(log) == list(range(1, state["step"] + 1))


def test_unreadable_image_in_data_is_skipped_with_a_warning_naming_it(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    (tmp_path / "data" / "cat").mkdir(parents=True)
    for index in range(3):
        Image.fromarray(np.full((20, 24, 3), 60 * index, np.uint8)).save(tmp_path / "data" / "cat" / f"{index}.png")
    (tmp_path / "data" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n then nothing")
    argv = [*TINY, "--data", tmp_path / "data", "--batch-size", "2", "--steps", "2", "--out", tmp_path / "run"]
    with pytest.warns(UserWarning, match="broken.png"):                      # 4 images, 2 x 2: every file is read
        assert run_cli(argv, capsys)[0] == 0
    assert _steps(tmp_path / "run" / "log.jsonl") == [1, 2]


# ---------------------------------------------------------------------------- issue 24: nothing lost, divergence caught

def test_resume_run_folder_takes_the_newest_step_not_the_newest_name(tmp_path, capsys):
    """--keep-last 2 to step 4, then checkpoint.pt alone to step 6: the folder resumes at 6, not at snapshot 4."""
    out = tmp_path / "run"
    assert run_cli([*TINY, "--steps", "4", "--ckpt-every", "2", "--keep-last", "2", "--out", out], capsys)[0] == 0
    assert run_cli(["--resume", out / "checkpoint.pt", "--keep-last", "0", "--steps", "6"], capsys)[0] == 0
    assert read_checkpoint_file(out / "checkpoint.pt")["step"] == 6
    assert checkpoint_lib.latest_checkpoint(out) == out / "checkpoint.pt"
    stderr = []
    assert run_cli(["--resume", out, "--steps", "7"], capsys, stderr)[0] == 0
    assert f"resumed from {out / 'checkpoint.pt'} (step 6, images seen 24)" in stderr[0]
    assert _steps(out / "log.jsonl") == [1, 2, 3, 4, 5, 6, 7]


def test_second_run_into_a_locked_folder_is_refused_and_a_killed_run_leaves_no_lock(tmp_path, capsys):
    from full.runlog import RunLock

    out = tmp_path / "run"
    with RunLock(out):
        code, errors = run_cli([*TINY, "--steps", "1", "--out", out], capsys)
    assert code == 2 and len(errors) == 1 and "in use by another full.train run" in errors[0], errors
    assert not (out / "log.jsonl").exists()
    killed = ("import os, signal, sys; from full.runlog import RunLock; lock = RunLock(sys.argv[1]).__enter__(); "
              "os.kill(os.getpid(), signal.SIGKILL)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    assert subprocess.run([sys.executable, "-c", killed, str(out)], env=env).returncode == -signal.SIGKILL
    assert run_cli([*TINY, "--steps", "1", "--out", out], capsys)[0] == 0      # the kernel dropped the lock


def test_lr_explosion_is_stopped_before_it_is_saved_and_names_a_good_checkpoint(tmp_path):
    """Good to step 2, then --lr 100 with a checkpoint every step: the update of step 3 explodes the weights
    (raw_u 1e8x at step 4); neither it nor anything after is saved, and the named checkpoint is step 2."""
    train(_cli_config(tmp_path, steps=2), _dataset(), progress=False)
    before = read_checkpoint_file(tmp_path / "checkpoint.pt")
    with pytest.raises(DivergenceError, match=r"step 4 is exploded .*raw_u.*last checkpoint: .*checkpoint.pt \(step 2\)"):
        train(_cli_config(tmp_path, steps=10, ckpt_every=1, lr=100.0, resume=str(tmp_path / "checkpoint.pt")),
              _dataset(), progress=False)
    after = read_checkpoint_file(tmp_path / "checkpoint.pt")
    assert after["step"] == 2
    assert all(torch.equal(after["model"][key], value) for key, value in before["model"].items())
    assert _steps(tmp_path / "log.jsonl") == [1, 2, 3]


@pytest.mark.parametrize("content", [b"\x00garbage" * 40, "foreign"])
def test_damaged_or_foreign_grid_inputs_on_resume_is_one_error_line(content, tmp_path, finished_run, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("checkpoint.pt", "log.jsonl"):
        (run / name).write_bytes((finished_run / name).read_bytes())
    if content == "foreign":
        torch.save({"weights": torch.zeros(3)}, run / "grid_inputs.pt")
    else:
        (run / "grid_inputs.pt").write_bytes(content)
    code, errors = run_cli(["--resume", run, "--steps", "3", "--sample-every", "1"], capsys)
    assert code == 2 and len(errors) == 1 and "--sample-every" in errors[0] and "grid_inputs.pt" in errors[0], errors


def test_full_disk_while_logging_names_the_log_and_leaves_no_empty_log(tmp_path, capsys, monkeypatch):
    import full.runlog as runlog

    real_open = open

    def full_disk_open(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        if str(path).endswith("log.jsonl") and "a" in mode:
            handle.close()
            raise OSError(28, "No space left on device")
        return handle

    monkeypatch.setattr(runlog, "open", full_disk_open, raising=False)
    code, errors = run_cli([*TINY, "--steps", "2", "--out", tmp_path], capsys)
    monkeypatch.undo()
    assert code == 1 and len(errors) == 1 and "log.jsonl" in errors[0] and "No space left" in errors[0], errors
    assert not (tmp_path / "log.jsonl").exists()                   # no 0-byte log to block the next start
    assert run_cli([*TINY, "--steps", "1", "--out", tmp_path], capsys)[0] == 0


def test_a_second_signal_during_the_checkpoint_write_waits_for_the_write(tmp_path):
    written, handler = [], signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with checkpoint_lib.StopOnSignal(announce=False) as stop:
            os.kill(os.getpid(), signal.SIGINT)                     # the first: stop after this step
            assert stop.signum == signal.SIGINT
            with stop.writing():
                os.kill(os.getpid(), signal.SIGINT)                 # the second, in the middle of the write
                save_checkpoint(tmp_path / "c.pt", {"step": 1})
                written.append(True)
    assert written and read_checkpoint_file(tmp_path / "c.pt") == {"step": 1}
    assert signal.getsignal(signal.SIGINT) is handler


# ---------------------------------------------------------------------------- issue 25: cluster habits, readable logs

def test_moved_run_folder_resumes_in_place(tmp_path, capsys):
    first, moved = tmp_path / "a", tmp_path / "b"
    assert run_cli([*TINY, "--steps", "2", "--out", first], capsys)[0] == 0
    assert read_checkpoint_file(first / "checkpoint.pt")["config"]["train"]["out"] == "."
    first.rename(moved)
    assert run_cli(["--resume", moved, "--steps", "3"], capsys)[0] == 0
    assert not first.exists() and _steps(moved / "log.jsonl") == [1, 2, 3]


def test_resume_auto_makes_one_command_start_and_continue(tmp_path, capsys):
    command = [*TINY, "--out", tmp_path / "run", "--resume", "auto", "--ckpt-every", "1"]
    stderr = []
    assert run_cli([*command, "--steps", "1"], capsys, stderr)[0] == 0       # nothing there: starts
    assert "resumed from" not in stderr[0] and f"saved {tmp_path / 'run' / 'checkpoint.pt'} (step 1)" in stderr[0]
    assert run_cli([*command, "--steps", "2"], capsys, stderr)[0] == 0       # a requeue: continues
    assert "resumed from" in stderr[1] and "(step 1, images seen 4)" in stderr[1]
    assert _steps(tmp_path / "run" / "log.jsonl") == [1, 2]


def test_log_records_window_means_time_and_memory_and_config_json(tmp_path, capsys):
    stderr = []
    out = tmp_path / "run"
    assert run_cli([*TINY, "--steps", "4", "--log-every", "2", "--ema-kimg", "1", "2", "--out", out], capsys,
                   stderr)[0] == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [2, 4]
    for record in records:
        assert record["window_steps"] == 2 and record["sec_per_kimg"] > 0 and record["peak_host_gib"] > 0
        assert record["time"].endswith("+00:00") and "peak_gpu_gib" in record
    for name in ("parameters:", "processes:", "batch:", "precision:", "jvp:", "data:", "EMAs:"):
        assert name in stderr[0], name
    assert "all equal for this whole run" in stderr[0]
    config = json.loads((out / "config.json").read_text())
    assert config["out"] == "." and config["preset"] == "pMF-T/2" and config["steps"] == 4
    assert run_cli(["--resume", out, "--steps", "5", "--lr", "5e-4"], capsys, stderr)[0] == 0
    assert "changed on resume (allowed): steps 4 -> 5, lr 0.001 -> 0.0005" in stderr[1]
    assert json.loads((out / "config.json").read_text())["lr"] == 5e-4


def test_window_means_match_the_per_step_history(tmp_path):
    result = train(_cli_config(tmp_path, steps=4, log_every=2), _dataset(), progress=False)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    for record, pair in zip(records, (result.history[:2], result.history[2:])):
        assert record["raw_u"] == pytest.approx(sum(step["raw_u"] for step in pair) / 2, rel=1e-12)


def test_plain_progress_lines_when_not_a_terminal_and_none_with_no_progress(tmp_path, capsys):
    main([*map(str, TINY), "--steps", "2", "--out", str(tmp_path / "a")])    # capsys is not a terminal
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [["step", "1/2"], ["step", "2/2"]], lines
    main([*map(str, TINY), "--steps", "2", "--out", str(tmp_path / "b"), "--no-progress"])
    assert capsys.readouterr().out == ""


def test_num_classes_defaults_to_the_folders_classes_and_a_resume_must_agree(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    for label in ("ant", "bee", "cat"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for index in range(2):
            Image.fromarray(np.full((16, 16, 3), 40 * index, np.uint8)).save(tmp_path / "data" / label / f"{index}.png")
    settings = dict(preset="pMF-T/2", batch_size=2, steps=1, perceptual="none", ema_half_lives_kimg=(1.0,),
                    device="cpu", num_workers=0, data=str(tmp_path / "data"))
    first = train(TrainConfig(**settings, out=str(tmp_path / "run")), progress=False)
    assert first.model.num_classes == 3
    assert read_checkpoint_file(first.checkpoint)["config"]["train"]["num_classes"] == 3
    with pytest.raises(UsageError, match="--num-classes cannot change on resume"):
        train(TrainConfig(**{**settings, "steps": 2}, num_classes=5, out=str(tmp_path / "run"),
                          resume=str(first.checkpoint)), progress=False)


# ---------------------------------------------------------------------------- precision, memory, first weights

def test_precision_is_checked_resolved_and_bf16_autocasts_the_step(tmp_path):
    with pytest.raises(UsageError, match="--precision must be one of fp32, tf32, bf16, got 'fp64'"):
        train(_cli_config(tmp_path / "bad", precision="fp64"), _dataset(), progress=False)
    fp32 = train(_cli_config(tmp_path / "fp32", steps=2), _dataset(), progress=False)
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["precision"] == "fp32"   # the CPU default
    bf16 = train(_cli_config(tmp_path / "bf16", steps=2, precision="bf16"), _dataset(), progress=False)
    # Step 1 runs zero-initialised output layers (exact in any precision); step 2 does not.
    assert bf16.history[1]["raw_u"] != fp32.history[1]["raw_u"]                 # autocast really ran ...
    assert bf16.history[1]["raw_u"] == pytest.approx(fp32.history[1]["raw_u"], rel=0.05)   # ... on the same step


def test_activation_checkpointing_trains_the_same_steps(tmp_path):
    plain = train(_cli_config(tmp_path / "plain", steps=2), _dataset(), progress=False)
    recomputed = train(_cli_config(tmp_path / "ac", steps=2, activation_checkpointing=True), _dataset(), progress=False)
    assert recomputed.model.activation_checkpointing and not plain.model.activation_checkpointing
    for name in ("loss", "raw_u", "raw_v", "grad_norm"):
        assert [r[name] for r in recomputed.history] == pytest.approx([r[name] for r in plain.history], rel=1e-5)


def test_init_official_fine_tunes_from_a_file_in_the_authors_layout(tmp_path, capsys):
    """A 12-class released-layout file (no v-head) starts a 3-class run: u-head and trunk as in the file, the
    v-head a copy of the u-head, the first 3 label rows and the null row (lr ~0: the weights after step 1)."""
    from full.official import to_official_state_dict

    torch.manual_seed(7)
    source = build_model("pMF-T/2", v_head=False, num_classes=12)
    with torch.no_grad():
        for parameter in source.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    torch.save(to_official_state_dict(source), tmp_path / "pMF-T-2.pt")
    result = train(_cli_config(tmp_path / "run", steps=1, lr=1e-12, num_classes=3,
                               init_official=str(tmp_path / "pMF-T-2.pt")),
                   SyntheticDataset(16, 16, num_classes=3, seed=1), progress=False)
    assert "the authors'" in capsys.readouterr().err
    trained, released = result.model.state_dict(), source.state_dict()
    table = [name for name in released if released[name].shape[0] == 13][0]          # the label table (12 + null)
    torch.testing.assert_close(trained[table], released[table][[0, 1, 2, 12]], atol=1e-6, rtol=0)
    for name, value in released.items():
        if name != table:
            torch.testing.assert_close(trained[name], value, atol=1e-6, rtol=0, msg=name)
    v_head = [name for name in trained if name.startswith("v_head.")]
    assert v_head and all(torch.allclose(trained[name], released["u_head." + name[len("v_head."):]], atol=1e-6)
                          for name in v_head)
    code, errors = run_cli([*TINY, "--init-official", tmp_path / "absent.pt", "--out", tmp_path / "o"], capsys)
    assert code == 2 and len(errors) == 1 and "--init-official" in errors[0]


def test_in_training_fid_refuses_a_reference_of_another_resolution_at_start(tmp_path, random_weights, capsys):
    """pMF-T/2 makes 16 px samples; statistics recorded at 64 px are refused before any step."""
    import numpy as np

    np.savez(tmp_path / "ref64.npz", mu=np.zeros(2048), sigma=np.eye(2048), resolution=np.array(64))
    code, errors = run_cli([*TINY, "--steps", "2", "--num-workers", "0", "--out", tmp_path / "out", "--fid-every", "1",
                            "--ref", tmp_path / "ref64.npz", "--inception-weights", random_weights], capsys)
    assert code == 2 and len(errors) == 1 and "64 px images but the model makes 16 px" in errors[0], errors
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


# ---------------------------------------------------------------------------- issue 23: no host sync in a step

class _HostReads(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the reads of a tensor's value to the host made from the project's own code (full/, pmf_ref/),
    per iteration of the training loop: ``aten._local_scalar_dense`` / ``aten.item`` (``.item()``, ``float(t)``,
    ``bool(t)``) and ``aten.nonzero`` (a data-dependent shape). On a GPU each one drains the launch queue.

    Reads inside torch's own optimisers are not counted: on CUDA torch.optim keeps its step counters on the
    CPU (``capturable=False``), so its ``.item()`` calls read host memory and are no device syncs. Nor is the
    DataLoader's draw of its base seed (a CPU tensor, once per epoch)."""

    READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default, torch.ops.aten.nonzero.default)

    def __init__(self, iterations: list):
        super().__init__()
        self.iterations = iterations

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READS and _from_our_code(traceback.extract_stack()):
            self.iterations[-1]["reads"] += 1
        return func(*args, **(kwargs or {}))


def _from_our_code(frames) -> bool:
    """The innermost frame that is ours, torch.optim's or torch's DataLoader's is ours."""
    for frame in reversed(frames):
        path = Path(frame.filename).resolve()
        if "torch" in path.parts and ("optim" in path.parts or path.match("utils/data/*.py")):
            return False
        if path.is_relative_to(REPO / "full") or path.is_relative_to(REPO / "pmf_ref"):
            return True
    return False


def test_a_step_reads_nothing_to_the_host_but_a_check_point_once(tmp_path, monkeypatch):
    """pMF-T/4 on synthetic data, log every 3rd of 6 steps: the loop's iterations 1, 2, 4, 5 (forwards of
    steps 1, 2, 4, 5) read no tensor value to the host; a check point (the forwards of the log steps 3 and 6
    and the last, extra forward that clears the final checkpoint) reads the window once."""
    import full.runlog as runlog
    import full.train as train_module

    iterations = [{"reads": 0, "tolist": 0, "to_host": 0}]        # [0]: the set-up
    real_batches, real_tolist, real_to_host = train_module.infinite_batches, torch.Tensor.tolist, \
        getattr(runlog, "to_host", None)

    def counted_batches(*args, **kwargs):
        batches = real_batches(*args, **kwargs)
        while True:                            # a new iteration begins when the loop asks for its batch
            iterations.append({"reads": 0, "tolist": 0, "to_host": 0})
            yield next(batches)

    def counted_tolist(tensor):
        if _from_our_code(traceback.extract_stack()[:-1]):
            iterations[-1]["tolist"] += 1
        return real_tolist(tensor)

    def counted_to_host(tensor):
        iterations[-1]["to_host"] += 1
        return real_to_host(tensor)

    monkeypatch.setattr(train_module, "infinite_batches", counted_batches)
    monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
    monkeypatch.setattr(runlog, "to_host", counted_to_host, raising=False)
    cfg = TrainConfig(preset="pMF-T/4", data="synthetic", num_classes=10, batch_size=2, steps=6, perceptual="none",
                      ckpt_every=1000, log_every=3, ema_half_lives_kimg=(1.0,), device="cpu", num_workers=0,
                      out=str(tmp_path))
    with _HostReads(iterations):
        result = train(cfg, progress=False)
    monkeypatch.undo()
    assert [record["step"] for record in result.history] == [1, 2, 3, 4, 5, 6]
    assert _steps(tmp_path / "log.jsonl") == [3, 6]
    loop = iterations[1:]
    assert len(loop) == 7, loop                # 6 steps and the forward that clears the last checkpoint
    for number, counts in enumerate(loop, start=1):
        check_point = number % 3 == 0 or number == 7
        assert all(count <= (1 if check_point else 0) for count in counts.values()), (number, counts)
    assert sum(counts["to_host"] for counts in loop) == 3      # every check point read its window


# ---------------------------------------------------------------------------- the walk of one training batch

def _walk_of_one_batch(cfg: TrainConfig, dataset) -> tuple[dict[str, set[str]], set[tuple[str, str]]]:
    """Train under a profiler (every Python call, on every thread) and return (a) the repository files whose
    functions run while ``train()``'s frame is between its ``next(batches)`` line and its ``.backward()`` line,
    each with the functions entered, and (b) every (file, function) of ``full`` called from a ``pmf_ref``
    frame in that window."""
    import inspect
    import threading

    import full.train as train_module

    code = train_module.train.__code__
    source, start = inspect.getsourcelines(train_module.train)
    first = start + next(i for i, line in enumerate(source) if "next(batches)" in line)
    last = start + next(i for i, line in enumerate(source) if ".backward()" in line)
    root = Path(train_module.__file__).resolve().parents[1]
    files: dict[str, set[str]] = {}
    callbacks: set[tuple[str, str]] = set()
    names: dict[str, str | None] = {}

    def in_repository(filename: str) -> str | None:    # "full/step.py", or None outside the repository
        if filename not in names:
            path = Path(filename).resolve()    # not "<frozen abc>", "<string>": those are no file of ours
            names[filename] = (path.relative_to(root).as_posix() if Path(filename).is_absolute() and
                               path.is_relative_to(root) and not {".venv", "site-packages"} & set(path.parts)
                               else None)
        return names[filename]

    def profile(frame, event, arg):
        if event != "call":
            return
        outer = frame
        while outer is not None and outer.f_code is not code:
            outer = outer.f_back
        if outer is None or not first <= outer.f_lineno <= last:
            return
        name = in_repository(frame.f_code.co_filename)
        if name is None:
            return
        files.setdefault(name, set()).add(frame.f_code.co_name)
        caller = in_repository(frame.f_back.f_code.co_filename) if frame.f_back is not None else None
        if caller is not None and caller.startswith("pmf_ref/") and name.startswith("full/"):
            callbacks.add((name, frame.f_code.co_name))

    threading.setprofile(profile)
    sys.setprofile(profile)
    try:
        train(cfg, dataset, progress=False)
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
    return files, callbacks


def _walk_in_full_init() -> list[str]:
    """The files listed in ``full/__init__.py``'s walk of one training batch (its numbered list)."""
    import re

    import full
    walk = full.__doc__.split("One training batch", 1)[1].split("Around it:", 1)[0]
    return re.findall(r"^\d+\. ``([\w/]+\.py)``", walk, flags=re.M)


def test_one_batch_walk_enters_the_eight_files_of_full_init_and_the_core_calls_back_only_the_jvp(tmp_path):
    """From ``next(batches)`` to ``.backward()`` (perceptual nets on, with random weights) the batch enters
    exactly the files ``full/__init__.py`` lists, at most 8, and ``pmf_ref`` calls into ``full`` only the
    JVP's function (the adapter's ``u_and_trunk``) or the engine ``full.fast_jvp.jvp``."""
    cfg = TrainConfig(preset="pMF-T/4", num_classes=10, batch_size=4, steps=2, out=str(tmp_path), device="cpu",
                      num_workers=0, log_every=1, ema_half_lives_kimg=(0.5,), perceptual="lpips+convnext",
                      perceptual_pretrained=False, convnext_arch="convnextv2_atto", perceptual_crop=32)
    files, callbacks = _walk_of_one_batch(cfg, SyntheticDataset(8, 32, num_classes=10, seed=1))
    listed = _walk_in_full_init()
    assert len(listed) == len(set(listed)) <= 8, listed
    walked = set(files) | {"full/train.py"}   # the loop's own file (entered again only if it calls a helper there)
    assert walked == set(listed), {name: sorted(functions)[:8] for name, functions in files.items()}
    assert {"sample_crop_boxes", "forward"} <= files["full/perceptual.py"]    # crop boxes, then the distances
    assert callbacks <= {("full/model.py", "u_and_trunk"), ("full/fast_jvp.py", "jvp")}, callbacks
    assert ("full/fast_jvp.py", "jvp") in callbacks    # the tracer sees the core's one call-back
