"""The ImageNet trainer on CPU with tiny presets: learning, exact resume, atomic checkpoints, CLI errors."""
from __future__ import annotations

import os

import pytest
import torch

import pmf_ref as P
from full import checkpoint as checkpoint_lib
from full.checkpoint import load_checkpoint, load_model, read_checkpoint_file, save_checkpoint
from full.data import SyntheticDataset
from full.model import build_model, make_cond
from full.recipe import PMFObjective
from full.train import TrainConfig, main, train



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
    cond = make_cond(y, ones, zeros, ones)
    objective = PMFObjective(model)
    terms = P.pmf_guided_loss(lambda z, r_, t_: objective.denoise_uv(z, r_, t_, cond),
                              lambda z, t_, w: objective.guidance_denoise(z, t_, w, y), x, e, r, t,
                              omega=ones, t_min=zeros, t_max=ones, dropped=torch.zeros_like(t, dtype=torch.bool))
    return (terms.raw_u + terms.raw_v).mean().item()


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
    # Adam, not Muon: bf16 Newton-Schulz would magnify float summation-order differences (see test_full_ddp).
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


def test_u_prediction_reads_output_as_average_velocity():
    """prediction='u': x_hat = z - max(t, t_eps) * output (pmf_ref.x_from_average_velocity)."""
    torch.manual_seed(0)
    model = build_model("pMF-T/2", num_classes=10, prediction="u")
    objective = PMFObjective(model)
    z, t = torch.randn(3, 3, 16, 16), torch.tensor([0.01, 0.5, 1.0])
    cond = make_cond(torch.tensor([1, 2, 3]), 2.0, 0.1, 0.7)
    output_u, output_v = model.forward_uv(z, t * 0.5, t, cond)
    clip = t.clamp(min=P.T_EPS)[:, None, None, None]
    x_hat_u, x_hat_v = objective.denoise_uv(z, t * 0.5, t, cond)
    torch.testing.assert_close(x_hat_u, z - clip * output_u)
    torch.testing.assert_close(x_hat_v, z - clip * output_v)


def test_bf16_autocast_close_to_fp32():
    torch.manual_seed(0)
    model = build_model("pMF-T/2", num_classes=10)
    with torch.no_grad():                    # the heads start at zero: give every weight a value
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    e = torch.randn(4, 3, 16, 16)
    t = torch.tensor([0.2, 0.5, 0.7, 0.9])
    y, omega = torch.tensor([0, 1, 2, 3]), torch.tensor([1.0, 2.0, 4.0, 8.0])
    fp32 = torch.cat(PMFObjective(model).guidance_denoise(e, t, omega, y))
    bf16 = torch.cat(PMFObjective(model, autocast_dtype=torch.bfloat16).guidance_denoise(e, t, omega, y))
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
    monkeypatch.setattr("full.train.prepare_fid", lambda ref, weights, device: reference)
    (tmp_path / "ref.npz").write_bytes(b"")
    return reference, str(tmp_path / "ref.npz")


def _watched(tmp_path, ref, **overrides) -> TrainConfig:
    return _config(tmp_path / "run", **{**dict(sample_every=2, fid_every=2, fid_num=4, fid_ref=ref, tensorboard=True,
                                              keep_last=2, ckpt_every=1), **overrides})


def test_watched_run_writes_grids_fid_tensorboard_and_numbered_checkpoints(tmp_path, tiny_fid):
    import json

    from tensorboard.backend.event_processing import event_accumulator

    from full import monitor

    reference, ref = tiny_fid
    result = train(_watched(tmp_path, ref), _dataset(), progress=False)
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
    assert left == ["checkpoint.pt", "log.jsonl"], left


def test_compile_flag_compiles_the_objective_and_trains_the_same(tmp_path, monkeypatch):
    compiled = []

    def recording_compile(module, *args, **kwargs):
        compiled.append(module)
        return module

    monkeypatch.setattr(torch, "compile", recording_compile)
    eager = train(_config(tmp_path / "eager", steps=2), _dataset(), progress=False)
    assert not compiled
    with_flag = train(_config(tmp_path / "compiled", steps=2, compile=True), _dataset(), progress=False)
    assert len(compiled) == 1 and isinstance(compiled[0], PMFObjective)
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
