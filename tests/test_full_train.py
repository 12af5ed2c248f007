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
    model = build_model("pMF-T/2", num_classes=10)
    objective = PMFObjective(model, x_from_output=P.x_from_average_velocity)
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
