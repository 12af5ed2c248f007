"""The one atomic writer (full/io.py): the old file or the whole new one, never half; no temp left behind."""
from __future__ import annotations

import json

import pytest

from full import io


def test_write_replaces_whole_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "a.json"
    io.write_json(path, {"a": 1})
    io.write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]


def test_failed_write_keeps_the_old_file_and_removes_the_temp(tmp_path):
    path = tmp_path / "t.txt"
    io.write_text(path, "old")

    def half_then_fail(file):
        file.write(b"new, but")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        io.atomic_write(path, half_then_fail)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["t.txt"]


def test_unwritable_reason_names_the_blocking_file(tmp_path):
    (tmp_path / "f").write_text("x")
    assert "is a file, not a folder" in io.unwritable_reason(tmp_path / "f" / "out", folder=True)
    assert "is a folder" in io.unwritable_reason(tmp_path, folder=False)
    assert io.unwritable_reason(tmp_path / "new", folder=True) is None and (tmp_path / "new").is_dir()
