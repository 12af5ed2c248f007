"""The one way this project writes a file: a temp file beside it, fsync, rename.

Every writer of checkpoints, JSON, figures, tables, images and .npz files goes through
:func:`atomic_write` (the toy and the tutorials included), so a reader -- or a run resumed after a
kill -- sees the old file or the complete new one, never half a file. The module is light (no torch,
no matplotlib at import) so that anything may import it.

It also reads pickles without running them (:func:`refused_pickle_global`), so that a torch file the
weights-only loader refuses is reported as holding code (naming what it asks for) or as damaged.
"""
from __future__ import annotations

import io
import json
import os
import pickletools
import re
import tempfile
import zipfile
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


def finite_or_null(payload: Any) -> Any:
    """``payload`` with every NaN / inf float replaced by None: JSON has no such numbers (Python's ``json``
    would write bare ``NaN`` / ``Infinity`` tokens, which other JSON readers reject)."""
    if isinstance(payload, float):
        return payload if payload == payload and payload not in (float("inf"), float("-inf")) else None
    if isinstance(payload, dict):
        return {key: finite_or_null(value) for key, value in payload.items()}
    if isinstance(payload, (list, tuple)):
        return [finite_or_null(value) for value in payload]
    return payload


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Write ``payload`` as indented, valid JSON (NaN / inf as ``null``, with a final newline) to ``path`` atomically."""
    return write_text(path, json.dumps(finite_or_null(payload), indent=2, allow_nan=False) + "\n")


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


# ----------------------------------------------------------------------------- pickles, read without running them

SAFE_PICKLE_MODULES = ("torch", "collections", "_codecs")
"""Modules whose globals a weights-only torch file may name (tensor rebuilders, storages, OrderedDict)."""
SCAN_LIMIT = 64 * 2 ** 20   # bytes of a non-zip file scanned for pickle globals (the pickles come first)
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING",
               "SHORT_BINSTRING"}
_REFUSED_GLOBAL = re.compile(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)")


def pickle_globals(data: bytes) -> list[str]:
    """The ``module.name`` globals that the pickles in ``data`` import, read with ``pickletools`` (nothing runs).

    Follows the concatenated pickles of a legacy torch file and stops at the first byte that does
    not parse (the raw tensor data after them, or damage).
    """
    names: list[str] = []
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        strings: list[str | None] = []   # recent pushes, enough for STACK_GLOBAL's (module, name)
        memo: dict[int, str | None] = {}
        try:
            for opcode, argument, _ in pickletools.genops(stream):
                if opcode.name in ("GLOBAL", "INST"):
                    names.append(argument.replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL":
                    module, name = (strings[-2:] if len(strings) >= 2 else [None, None])
                    names.append(f"{module}.{name}" if module and name else "an unnamed global")
                elif opcode.name in _STRING_OPS:
                    strings.append(argument if isinstance(argument, str) else None)
                elif opcode.name == "MEMOIZE":
                    memo[len(memo)] = strings[-1] if strings else None
                elif opcode.name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[argument] = strings[-1] if strings else None
                elif opcode.name in ("GET", "BINGET", "LONG_BINGET"):
                    strings.append(memo.get(argument))
        except Exception:   # not (or no longer) a pickle: the data after the last one, or a damaged stream
            break
    return names


def refused_pickle_global(path: str | os.PathLike, message: str = "") -> str | None:
    """The first global a torch file asks for beyond tensors and plain containers -- code a full
    ``torch.load`` would run -- or None when it asks for none (a file that is merely damaged).

    ``message`` is the weights-only loader's error, which names the global for the zip format; the
    pickle itself is scanned otherwise (:func:`pickle_globals`; nothing in it runs).
    """
    named = _REFUSED_GLOBAL.search(message)
    if named:
        return named.group(1)
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                member = next((name for name in archive.namelist() if name.endswith("data.pkl")), None)
                data = archive.read(member) if member else b""
        else:
            with open(path, "rb") as file:
                data = file.read(SCAN_LIMIT)
    except (OSError, zipfile.BadZipFile, RuntimeError, ValueError):
        return None
    return next((name for name in pickle_globals(data)
                 if name.split(".")[0] not in SAFE_PICKLE_MODULES), None)
