"""The command-line convention of every entry point (``toy``, ``full.train``, ``full.sample``,
``full.evaluate``, ``full.guidance_search``, ``full.digits``, ``full.bench``, ``full.params``, ...).

* **Errors:** a user error prints one line, ``<prog>: error: <what> (see --help)``, and exits 2 -- never
  a usage block, never a traceback. Checks call ``parser.error(...)`` naming the flag or file.
* **Help:** every flag's help ends with its default (``(default: ...)``), except flags whose default
  is "off" or "none" (False / None), whose help says what leaving them out does.
* **--out DIR** is always a folder; what a tool writes in it is named in its help and its docstring.
* **--json** always means: print the result as JSON on stdout (instead of the human-readable table).
* **--device** takes ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
* **Lists** are space-separated values of one flag: ``--dims 2 8 16``, ``--ema-kimg 500 1000``.
* **Ctrl-C** that no tool handles itself (during the imports, say) prints one line and exits 130
  (:func:`quiet_interrupt`, installed by ``full/__init__.py`` and ``toy/__init__.py``).

Light on purpose (no torch at import), so that ``--help`` is instant.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

EXIT_INTERRUPTED = 130   # 128 + SIGINT: what a shell reports for a program stopped by Ctrl-C
DEVICE_FORMS = "auto, cpu, cuda or cuda:N"
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The description as written; each flag's help with its default, unless the default is False/None/SUPPRESS."""

    def _get_help_string(self, action):
        text = action.help or ""
        off = action.default is None or action.default is False or action.default is argparse.SUPPRESS  # not 0
        if off or "default" in text or action.required:
            return text
        return super()._get_help_string(action)


NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$|^-(inf|nan)$")
"""What argparse must read as a negative number, not a flag: ``-1``, ``-0.5``, ``-.5``, ``-1e-3``, ``-inf``."""


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with one-line errors (exit 2) and :class:`HelpFormatter`.

    Negative numbers in scientific notation (``--lr -1e-3``) are values, so that the range check names
    the flag and the rule; plain argparse (before Python 3.13) takes them for an unknown flag.
    """

    def __init__(self, prog: str, description: str, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(prog=prog, description=description, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER   # argparse's hook for this; widened as Python 3.13 does

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_out(parser: argparse.ArgumentParser, default: str | None, writes: str) -> None:
    """``--out DIR``: the output folder (required when ``default`` is None); ``writes`` says what goes in it."""
    parser.add_argument("--out", default=default, metavar="DIR", required=default is None,
                        help=f"output folder: {writes}")


def add_json(parser: argparse.ArgumentParser, what: str = "the result") -> None:
    """``--json``: print ``what`` as JSON on stdout instead of the table."""
    parser.add_argument("--json", action="store_true", help=f"print {what} as JSON on stdout instead of the table")


def add_device(parser: argparse.ArgumentParser, default: str = "auto") -> None:
    """``--device``: auto, cpu, cuda or cuda:N (checked by :func:`resolve_device`)."""
    parser.add_argument("--device", default=default, metavar="DEVICE",
                        help=f"where to run: {DEVICE_FORMS} (auto = CUDA when available, else CPU)")


def resolve_device(parser: argparse.ArgumentParser, text: str):
    """The ``torch.device`` for ``--device text``, or a one-line ``parser.error`` (exit 2)."""
    import torch

    if not _DEVICE.match(text or ""):
        parser.error(f"--device must be {DEVICE_FORMS}, got {text!r}")
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(text)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error(f"--device {text}: no CUDA device is available (torch.cuda.is_available() is False)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            parser.error(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) here")
    return device


def check_out(parser: argparse.ArgumentParser, out, flag: str = "--out") -> None:
    """``parser.error`` unless ``out`` can be used as an output folder (created if missing)."""
    from .io import unwritable_reason

    problem = unwritable_reason(out, folder=True)
    if problem:
        parser.error(f"{flag}: {problem}")


def interval(text: str) -> tuple[float, float]:
    """An argparse ``type`` for one guidance interval written ``TMIN,TMAX`` (e.g. ``0.1,0.7``)."""
    try:
        t_min, t_max = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected TMIN,TMAX such as 0.1,0.7, got {text!r}") from None
    return t_min, t_max


def quiet_interrupt() -> None:
    """Under ``python -m``: an uncaught Ctrl-C prints ``<prog>: interrupted (Ctrl-C)`` and exits 130, no traceback.

    Installed as ``sys.excepthook`` by the packages' ``__init__`` before torch is imported, so that it
    also covers a Ctrl-C during the seconds of imports. Does nothing when the package is imported by
    another program, a test or a REPL (``sys.argv[0]`` is ``-m`` only while ``python -m`` finds the module).
    Whatever the tool writes is written atomically (``full.io``), so stopping here loses no file.
    """
    if sys.argv[:1] != ["-m"] or sys.flags.interactive or getattr(sys.excepthook, "quiet_interrupt", False):
        return
    previous = sys.excepthook

    def hook(kind, value, traceback):
        if not issubclass(kind, KeyboardInterrupt):
            return previous(kind, value, traceback)
        command = getattr(sys, "orig_argv", [])   # e.g. [python, -m, full.export, ...]
        module = command[command.index("-m") + 1] if "-m" in command[:-1] else None
        prog = f"python -m {module}" if module else "python"
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        sys.stderr.write(f"{prog}: interrupted (Ctrl-C)\n")
        sys.stderr.flush()
        os._exit(EXIT_INTERRUPTED)   # not a re-raised SIGINT, whose exit status is -2 to a parent process

    hook.quiet_interrupt = True
    sys.excepthook = hook
