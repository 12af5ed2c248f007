"""full.config: one check per bad value, the same sentence from the command line and the Python API."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from full.config import (RESUME_FIXED, TrainConfig, UsageError, _join_negative_numbers, check_config, check_resume,
                         config_from_argv)
from full.train import main

REPO = Path(__file__).resolve().parents[1]
TINY = ["--preset", "pMF-T/2", "--data", "synthetic", "--batch-size", "4", "--perceptual", "none", "--device", "cpu",
        "--num-classes", "10", "--steps", "1"]


@pytest.mark.parametrize("flags, field, value, message", [
    (["--lr", "-1e-3"], "lr", -1e-3, "--lr must be > 0"),          # argparse alone reads -1e-3 as a flag
    (["--lr", "inf"], "lr", float("inf"), "--lr must be > 0"),
    (["--seed", "-1"], "seed", -1, "--seed must lie in [0, 2**31)"),
    (["--seed", str(2 ** 40)], "seed", 2 ** 40, "--seed must lie in [0, 2**31)"),
    (["--num-classes", "0"], "num_classes", 0, "--num-classes must be >= 1"),
    (["--num-classes", "-3"], "num_classes", -3, "--num-classes must be >= 1"),
    (["--steps", "0"], "steps", 0, "--steps must be >= 1"),
    (["--ema-kimg", "0"], "ema_half_lives_kimg", (0.0,), "--ema-kimg: each half-life must be a number > 0"),
    (["--precision", "bf16", "--fsdp-mixed-precision", "bf16"], "fsdp_mixed_precision", "bf16",
     "--fsdp-mixed-precision needs --fsdp"),
])
def test_bad_value_is_refused_with_the_same_line_by_the_cli_and_the_api(flags, field, value, message, tmp_path,
                                                                         capsys):
    with pytest.raises(SystemExit) as raised:
        main([*TINY, "--out", str(tmp_path / "cli"), *flags])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert raised.value.code == 2 and len(errors) == 1 and message in errors[0], errors
    cfg = dataclasses.replace(TrainConfig(preset="pMF-T/2", batch_size=4, perceptual="none"), **{field: value})
    with pytest.raises(UsageError) as api:
        check_config(cfg)
    assert str(api.value) in errors[0]                    # the same sentence: one home
    assert not (tmp_path / "cli").exists()                # refused before anything was created


def test_each_message_has_one_home():
    source = "\n".join((REPO / "full" / name).read_text() for name in ("train.py", "config.py", "runlog.py"))
    for message in ("must be > 0 (and finite)", "must lie in [0, 2**31)", "is required (a class-folder root",
                    "must be divisible by the number of processes", "cannot change on resume"):
        assert source.count(message) == 1, message


def test_batch_divisibility_uses_processes_and_accumulation():
    check_config(TrainConfig(batch_size=8, accum_steps=2), world_size=4)
    with pytest.raises(UsageError, match=r"--batch-size 8 must be divisible by the number of processes \(4\) x "
                                         r"--accum-steps \(4\)"):
        check_config(TrainConfig(batch_size=8, accum_steps=4), world_size=4)


def test_negative_numbers_reach_the_check():
    assert _join_negative_numbers(["--lr", "-1e-3", "--seed", "-1", "--out", "x"]) == [
        "--lr=-1e-3", "--seed=-1", "--out", "x"]
    assert _join_negative_numbers(["--data", "-weird-name"]) == ["--data", "-weird-name"]


def test_resume_refuses_only_what_changes_the_training():
    saved = dataclasses.asdict(TrainConfig(preset="pMF-T/2"))
    check_resume(TrainConfig(preset="pMF-T/2", steps=10 ** 6, lr=5e-4, log_every=1, keep_last=3), saved, step=10)
    for name in RESUME_FIXED:
        value = saved[name]
        changed = {"preset": "pMF-T/4", "guidance": not value, "ema_half_lives_kimg": (7.0,)}.get(
            name, (value or 1) + 1 if isinstance(value, (int, float)) and not isinstance(value, bool) else "other")
        with pytest.raises(UsageError, match="cannot change on resume"):
            check_resume(dataclasses.replace(TrainConfig(preset="pMF-T/2"), **{name: changed}), saved, step=10)


def test_cli_config_on_resume_takes_the_missing_flags_from_the_checkpoint_and_its_folder(tmp_path):
    from full.train import train

    out = tmp_path / "moved"
    first = train(TrainConfig(preset="pMF-T/2", num_classes=10, batch_size=4, steps=1, perceptual="none",
                              out=str(tmp_path / "run"), seed=5, device="cpu", num_workers=0,
                              ema_half_lives_kimg=(1.0,)), progress=False)
    (tmp_path / "run").rename(out)
    cfg, progress = config_from_argv(["--resume", str(out), "--steps", "2", "--no-progress"])
    assert cfg.resume == str(out / Path(first.checkpoint).name) and cfg.out == str(out)
    assert (cfg.seed, cfg.preset, cfg.num_classes, cfg.steps, progress) == (5, "pMF-T/2", 10, 2, False)
