"""full.runlog: the run-folder lock, the divergence guard, log records and the resume note."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from full.runlog import (DIVERGENCE_FACTOR, DIVERGENCE_WINDOW, DivergenceError, DivergenceGuard, LogWriteError,
                         RunFolderLocked, RunLock, RunLog, append_record, changed_settings_note, summary)

REPO = Path(__file__).resolve().parents[1]


def test_divergence_guard_threshold_against_the_runs_own_history():
    guard = DivergenceGuard()
    guard.check(1, {"raw_u": 800.0, "raw_v": 700.0, "grad_norm": 1.0}, "none yet")     # no history: accepted
    for step, raw in enumerate((400.0, 1200.0, 600.0), start=2):
        guard.check(step, {"raw_u": raw, "raw_v": 700.0, "grad_norm": 1.0}, "none yet")
    median = 700.0                                                                    # of 800, 400, 1200, 600
    guard.check(5, {"raw_u": 0.99 * DIVERGENCE_FACTOR * median, "raw_v": 700.0, "grad_norm": 1e4}, "none yet")
    median = 800.0                                                                    # 69300 joined them
    with pytest.raises(DivergenceError, match=r"step 6 is exploded .*raw_u .* vs median 800\).*last checkpoint: c.pt"):
        guard.check(6, {"raw_u": 1.01 * DIVERGENCE_FACTOR * median, "raw_v": 700.0, "grad_norm": 1.0}, "c.pt")
    # The gradient norm is judged only against a full window (it grows legitimately as the heads leave zero).
    for step in range(7, 7 + DIVERGENCE_WINDOW):
        guard.check(step, {"raw_u": 700.0, "raw_v": 700.0, "grad_norm": 1.0}, "none yet")
    with pytest.raises(DivergenceError, match="grad_norm"):
        guard.check(200, {"raw_u": 700.0, "raw_v": 700.0, "grad_norm": 1.01 * DIVERGENCE_FACTOR}, "none yet")


def test_lock_is_exclusive_released_on_exit_and_by_a_killed_holder(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunFolderLocked, match="in use by another full.train run"):
            RunLock(tmp_path).__enter__()
    with RunLock(tmp_path):                              # released by the first one's exit
        pass
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from full.runlog import RunLock; "
                               "lock = RunLock(sys.argv[1]).__enter__(); print('locked', flush=True); time.sleep(600)",
                               str(tmp_path)], env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(RunFolderLocked):
        RunLock(tmp_path).__enter__()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with RunLock(tmp_path):                              # a crashed run leaves nothing stuck
        pass


def test_append_record_on_a_full_disk_names_the_file_and_leaves_no_empty_log(tmp_path, monkeypatch):
    import full.runlog as runlog

    real_open = open

    def full_disk(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        handle.close()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runlog, "open", full_disk, raising=False)
    with pytest.raises(LogWriteError, match="log.jsonl.*No space left"):
        append_record(tmp_path / "log.jsonl", {"step": 1})
    assert not (tmp_path / "log.jsonl").exists()


def test_log_record_is_the_window_mean_with_time_and_memory(tmp_path):
    log = RunLog(tmp_path / "log.jsonl", device=torch.device("cpu"), total_steps=4, start_step=0, batch_size=8,
                 progress=False, enabled=True, terms=("loss", "raw_u", "raw_v"))
    for step, raw in ((1, 100.0), (2, 300.0), (3, 1000.0)):
        log.add(step, 8 * step, torch.tensor([1.0, raw, raw], dtype=torch.float64))
    log.check(DivergenceGuard(), "none yet")
    record = log.write(2, 16, {"fid": 12.5, "is_mean": 3.0})      # steps 1 and 2; step 3 waits for the next
    assert record["raw_u"] == 200.0 and record["window_steps"] == 2 and record["fid"] == 12.5
    assert record["sec_per_kimg"] > 0 and record["peak_host_gib"] > 0 and record["peak_gpu_gib"] is None
    assert json.loads((tmp_path / "log.jsonl").read_text()) == record
    assert [values["step"] for values in log.history] == [1, 2] and log.history[1]["raw_v"] == 300.0
    assert log.write(3, 24)["raw_u"] == 1000.0 and [values["step"] for values in log.history] == [1, 2, 3]


def test_resume_note_names_what_changed():
    old = {"steps": 4, "lr": 1e-3, "ema_half_lives_kimg": [1.0], "resume": None}
    assert changed_settings_note(old, {**old, "ema_half_lives_kimg": (1.0,), "resume": "c.pt"}) is None
    assert changed_settings_note(old, {**old, "steps": 8}) == "changed on resume (allowed): steps 4 -> 8"
    assert changed_settings_note(None, old) is None
    assert summary({"a": 1, "long name": "x"}).splitlines()[1:3] == ["a:         1", "long name: x"]
