"""``python -m toy``: outputs, and every user error as one line with exit 2 before any training; a diverged
run or Ctrl-C is one line too (exit 3 / 130), and neither leaves a file in --out."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import toy.__main__ as cli

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--steps", "2", "--batch-size", "8", "--width", "8", "--depth", "2", "--eval-samples", "128",
        "--no-progress", "--workers", "1"]


def _error_line(argv, capsys):
    with pytest.raises(SystemExit) as raised:
        cli.main(argv)
    assert raised.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "error:" in error, error
    return error


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if the CLI gets as far as training."""
    def refuse(**kwargs):
        raise AssertionError("training started")
    monkeypatch.setattr(cli, "run_sweep", refuse)


def test_cli_writes_outputs(tmp_path, capsys):
    cli.main(["--dims", "2", "3", "--predictions", "x", "--out", str(tmp_path), *TINY])
    records = json.loads((tmp_path / "metrics.json").read_text())
    assert [record["dim"] for record in records] == [2, 3]
    assert {"precision", "coverage", "precision_floor", "coverage_floor"} <= set(records[0])
    out = capsys.readouterr().out
    assert str(tmp_path / "samples.png") in out and "data vs data" in out


@pytest.mark.parametrize("argv, message", [
    (["--dims", "2", "1"], "--dims"),
    (["--dims", "2", "2"], "--dims"),
    (["--seeds", "0", "1", "0"], "--seeds"),
    (["--dataset", "spiral"], "--dataset"),
    (["--steps", "0"], "--steps"),
    (["--steps", "ten"], "--steps"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "inf"], "--lr must be a number in (0, 1], got inf"),
    (["--lr", "1e3"], "--lr must be a number in (0, 1], got 1000.0"),
    (["--time-std", "inf"], "--time-std"),
    (["--time-mean", "nan"], "--time-mean"),
    (["--adaptive-power", "inf"], "--adaptive-power"),
    (["--uniform-fraction", "1.5"], "--uniform-fraction"),
    (["--equal-fraction", "-0.1"], "--equal-fraction"),
    (["--ema-decay", "1"], "--ema-decay"),
    (["--compute-dtype", "fp8"], "--compute-dtype"),
    (["--tangent", "v_head"], "--tangent"),
    (["--lr-schedule", "step"], "--lr-schedule"),
    (["--corner-fraction", "2"], "--corner-fraction"),
    (["--adaptive-power", "-1"], "--adaptive-power"),
    (["--warmup-steps", "-1"], "--warmup-steps"),
    (["--device", "tpu9"], "--device"),
])
def test_cli_bad_flags_give_one_line_error(argv, message, capsys, no_training, tmp_path):
    assert message in _error_line([*argv, "--out", str(tmp_path / "out")], capsys)


def test_cli_out_under_a_file_fails_before_training(tmp_path, capsys, no_training):
    (tmp_path / "a_file").write_text("")
    error = _error_line(["--out", str(tmp_path / "a_file" / "runs")], capsys)
    assert "--out" in error and "a_file" in error


def test_cli_refuses_an_earlier_run_unless_overwrite(tmp_path, capsys, monkeypatch):
    (tmp_path / "metrics.json").write_text("[]\n")
    with monkeypatch.context() as patch:
        patch.setattr(cli, "run_sweep", lambda **kwargs: pytest.fail("training started"))
        error = _error_line(["--out", str(tmp_path)], capsys)
    assert "metrics.json" in error and "--overwrite" in error
    assert (tmp_path / "metrics.json").read_text() == "[]\n"
    cli.main(["--dims", "2", "--predictions", "u", "--out", str(tmp_path), "--overwrite", *TINY])
    assert json.loads((tmp_path / "metrics.json").read_text())[0]["prediction"] == "u"


def test_cli_diverged_run_is_one_line_exit_3_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "MAX_LR", float("inf"))   # past the CLI's bound, to reach the training guard
    with pytest.raises(SystemExit) as raised:
        cli.main(["--lr", "1e3", "--dims", "8", "--predictions", "u", "--out", str(tmp_path / "out"), "--steps", "20",
                  "--batch-size", "64", "--eval-samples", "64", "--no-progress", "--workers", "1"])
    error = capsys.readouterr().err
    assert raised.value.code == cli.EXIT_DIVERGED == 3
    assert error.count("\n") == 1 and re.search(r"u-pred D=8 seed 0: the raw loss is (nan|inf) at step", error), error
    assert not any(name in os.listdir(tmp_path / "out") for name in ("metrics.json", "table.md", "samples.png"))


def _python_m_toy(tmp_path, *argv):
    repo = str(Path(cli.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "toy", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.parametrize("when", ["during the imports", "while training in a process pool"])
def test_ctrl_c_is_one_line_exit_130_without_traceback(tmp_path, when):
    out = tmp_path / "out"
    process = _python_m_toy(tmp_path, "--out", str(out), "--steps", "100000", "--dims", "2", "8",
                            "--predictions", "x", "--workers", "2", "--no-progress")
    try:
        if when == "during the imports":
            time.sleep(0.3)
        else:   # the folder is probed just before training; the spawned workers need a moment to start
            deadline = time.monotonic() + 60
            while not out.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(4)
        process.send_signal(signal.SIGINT)
        _, error = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, error
    assert error.count("\n") == 1 and "python -m toy: interrupted (Ctrl-C)" in error, error
    assert not out.exists() or not os.listdir(out)


def test_cli_output_name_taken_by_a_folder_fails_before_training(tmp_path, capsys, no_training):
    (tmp_path / "table.md").mkdir()
    error = _error_line(["--out", str(tmp_path), "--overwrite"], capsys)
    assert "table.md" in error and "is a folder" in error


def test_cli_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    import errno

    def full_disk(**kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "samples.png"))

    monkeypatch.setattr(cli, "run_sweep", full_disk)
    with pytest.raises(SystemExit) as raised:
        cli.main(["--out", str(tmp_path), *TINY])
    error = capsys.readouterr().err
    assert raised.value.code == 1 and error.count("\n") == 1 and "samples.png" in error and "No space" in error


def test_cli_out_of_memory_is_one_line_exit_2(tmp_path, capsys):
    """A network too wide for this machine (10^16 weights): torch's allocator fails in the first run; the CLI
    says so in one line naming the size flags, exits 2 and writes nothing."""
    with pytest.raises(SystemExit) as raised:
        cli.main(["--out", str(tmp_path / "run"), "--dims", "2", "--predictions", "x", "--width", "100000000",
                  "--steps", "2", "--no-progress"])
    error = capsys.readouterr().err
    assert raised.value.code == 2 and error.count("\n") == 1
    assert "out of memory" in error and "--width 100000000" in error
    assert not (tmp_path / "run" / "metrics.json").exists()
