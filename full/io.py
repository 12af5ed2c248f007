"""The one way this project writes a file: a temp file beside it, fsync, rename.

Every writer of checkpoints, JSON, figures, tables, images and .npz files goes through
:func:`atomic_write` (the toy and the tutorials included), so a reader -- or a run resumed after a
kill -- sees the old file or the complete new one, never half a file. The module is light (no torch,
no matplotlib at import) so that anything may import it.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

TEMP_PREFIX = ".tmp-"
"""Temp files are ``.tmp-<name>.<random>`` beside their target (a kill can leave one; see ``full.checkpoint``)."""


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any], *, fsync: bool = True) -> Path:
    """Call ``write(file)`` on a binary temp file beside ``path``, then rename it onto ``path``.

    Creates the parent folder. A failed write (any exception, Ctrl-C included) removes the temp file and
    leaves an earlier ``path`` untouched. ``fsync=False`` skips the flush to disk (durability across a
    power cut), which costs milliseconds per file when writing 50,000 PNGs.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMP_PREFIX}{path.name}.")
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            if fsync:
                file.flush()
                os.fsync(file.fileno())
        os.replace(temp_name, path)   # atomic on POSIX within one file system
    except BaseException:
        if os.path.exists(temp_name):
            os.unlink(temp_name)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda file: file.write(text.encode("utf-8")))


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Write ``payload`` as indented JSON (with a final newline) to ``path`` atomically."""
    return write_text(path, json.dumps(payload, indent=2) + "\n")


def save_figure(figure, path: str | os.PathLike, **savefig_kwargs) -> Path:
    """Write a matplotlib figure to ``path`` atomically; the format follows the suffix (e.g. ``.png``)."""
    path = Path(path)
    kwargs = {"format": path.suffix.lstrip(".") or "png", **savefig_kwargs}
    return atomic_write(path, lambda file: figure.savefig(file, **kwargs))


def unwritable_reason(path: str | os.PathLike, *, folder: bool) -> str | None:
    """Why ``path`` (an output folder, or a file when ``folder`` is False) cannot be written, or None.

    Creates the folder (or the file's parent) and a probe file in it, then removes the probe: the
    CLIs call this before any work, so a typo in --out fails in a second, not after hours.
    """
    path = Path(path)
    if not folder and path.is_dir():
        return f"{str(path)!r} is a folder, expected a file name"
    target = path if folder else path.parent
    blocker = next((parent for parent in (target, *target.parents) if parent.exists()), None)
    if blocker is not None and not blocker.is_dir():
        return f"{str(blocker)!r} is a file, not a folder"
    try:
        target.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=target, prefix=".write-probe-")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        return f"cannot write to {str(target)!r}: {error.strerror or error}"
    return None
