"""``python -m full.train`` under bad input and faults: every user error is one line and exit 2, a diverged
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
from pathlib import Path

import pytest
import torch

from full import checkpoint as checkpoint_lib
from full.checkpoint import read_checkpoint_file, save_checkpoint
from full.data import SyntheticDataset
from full.train import DivergenceError, TrainConfig, UsageError, main, train

pytestmark = pytest.mark.usefixtures("one_thread")

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


def _config(out, **overrides) -> TrainConfig:
    settings = dict(preset="pMF-T/2", num_classes=10, batch_size=4, steps=6, perceptual="none", out=str(out),
                    ckpt_every=2, log_every=1, ema_half_lives_kimg=(1.0,), device="cpu", num_workers=0)
    return TrainConfig(**{**settings, **overrides})


def test_divergence_stops_before_the_step_and_keeps_the_last_checkpoint(tmp_path):
    with pytest.raises(DivergenceError, match=r"step 4 is non-finite .*last checkpoint: .*checkpoint.pt \(step 2\)"):
        train(_config(tmp_path), _TurnsNaN(bad_from=3 * 4), progress=False)
    state = read_checkpoint_file(tmp_path / "checkpoint.pt")
    assert state["step"] == 2
    assert all(torch.isfinite(tensor).all() for tensor in state["model"].values())
    assert _steps(tmp_path / "log.jsonl") == [1, 2, 3]                      # the bad step is not logged


def test_divergence_through_the_cli_exits_3(tmp_path, capsys):
    """An absurd learning rate: step 1 is finite, its update blows the weights up, step 2 is NaN."""
    code, errors = run_cli([*TINY, "--lr", "1e30", "--steps", "4", "--ckpt-every", "1", "--out", tmp_path], capsys)
    assert code == 3 and len(errors) == 1 and "non-finite" in errors[0] and "(step 1)" in errors[0]
    assert read_checkpoint_file(tmp_path / "checkpoint.pt")["step"] == 1


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
    first = train(_config(tmp_path, steps=2), SyntheticDataset(16, 16, num_classes=10, seed=1), progress=False)
    with pytest.raises(UsageError, match="time_sampler='full' but this run asks for 'diagonal'"):
        train(_config(tmp_path, steps=4, resume=str(first.checkpoint), time_sampler="diagonal"),
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
    return train(_config(tmp_path_factory.mktemp("straight"), steps=3),
                 SyntheticDataset(16, 16, num_classes=10, seed=1), progress=False)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_at_the_step_boundary_and_resume_matches_the_straight_run(signum, tmp_path, straight_run):
    stopped = train(_config(tmp_path, steps=3, ckpt_every=100), _SignalsAt(signum, at=4 + 2), progress=False)
    assert stopped.stopped_by == signum                                         # sent while fetching step 2
    assert read_checkpoint_file(tmp_path / "checkpoint.pt")["step"] == 2 == stopped.history[-1]["step"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL                    # handlers restored
    resumed = train(_config(tmp_path, steps=3, resume=str(tmp_path / "checkpoint.pt")),
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
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint.pt", "log.jsonl"]


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
