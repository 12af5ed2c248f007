"""The CLI convention (full/cli.py): one-line errors with exit 2, defaults in help, device forms."""
from __future__ import annotations

import pytest
import torch

from full import cli


def _parser():
    parser = cli.Parser("prog", "test")
    parser.add_argument("--n", type=int, default=3, help="a number")
    parser.add_argument("--zero", type=int, default=0, help="zero")
    parser.add_argument("--flag", action="store_true", help="a switch")
    cli.add_device(parser)
    cli.add_json(parser)
    return parser


def test_error_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as stop:
        _parser().parse_args(["--n", "x"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("prog: error:") and "--n" in err


def test_help_shows_real_defaults_only():
    text = _parser().format_help()
    assert "a number (default: 3)" in text and "zero (default: 0)" in text and "(default: False)" not in text


@pytest.mark.parametrize("text, expected", [("cpu", "cpu"), ("auto", "cuda" if torch.cuda.is_available() else "cpu")])
def test_device_forms(text, expected):
    assert cli.resolve_device(_parser(), text).type == expected


@pytest.mark.parametrize("text", ["tpu", "cuda:x", ""])
def test_bad_device_is_an_error(text, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.resolve_device(_parser(), text)
    assert stop.value.code == 2 and "--device must be auto, cpu, cuda or cuda:N" in capsys.readouterr().err


def test_interval_pairs():
    assert cli.interval("0.1,0.7") == (0.1, 0.7)
    with pytest.raises(Exception):
        cli.interval("0.1")


# ----------------------------------------------------------------------------- Ctrl-C

@pytest.mark.parametrize("module", ["full.sample", "full.export", "full.plot", "full.guidance_search", "toy"])
def test_ctrl_c_during_the_imports_is_one_line_and_exit_130(module):
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    repo = str(Path(cli.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    # -X importtime reports each finished import on stderr: once the package `full` is in (it installs
    # the hook), the signal lands in the seconds of importing torch and the rest.
    process = subprocess.Popen([sys.executable, "-X", "importtime", "-m", module, "--help"], env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in process.stderr:
            if line.split("|")[-1].strip() == "full":
                process.send_signal(signal.SIGINT)
                break
        rest = process.stderr.read()
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    errors = [line for line in rest.splitlines() if not line.startswith("import time:")]
    assert process.returncode == 130 and errors == [f"python -m {module}: interrupted (Ctrl-C)"], errors


def test_quiet_interrupt_leaves_an_importing_program_alone(monkeypatch):
    import sys

    hook = sys.excepthook
    monkeypatch.setattr(sys, "argv", ["pytest"])
    cli.quiet_interrupt()
    assert sys.excepthook is hook


@pytest.mark.parametrize("text, value", [("-1e-3", -1e-3), ("-1E+2", -100.0), ("-.5", -0.5), ("-2", -2.0),
                                         ("-inf", float("-inf"))])
def test_negative_numbers_in_any_notation_are_values_not_flags(text, value):
    parser = cli.Parser("prog", "test")
    parser.add_argument("--lr", type=float, default=1.0)
    assert parser.parse_args(["--lr", text]).lr == value


def test_a_flag_is_still_a_flag(capsys):
    parser = cli.Parser("prog", "test")
    parser.add_argument("--lr", type=float, default=1.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["--lr", "-x"])
    assert "--lr: expected one argument" in capsys.readouterr().err
