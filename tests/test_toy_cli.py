"""``python -m toy``: outputs, and every user error as one line with exit 2 before any training."""
import json

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
