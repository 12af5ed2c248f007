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


def test_json_is_valid_with_non_finite_numbers_as_null(tmp_path):
    def refuse(token):
        raise ValueError(f"{token} is not JSON")

    io.write_json(tmp_path / "a.json", {"fid": float("nan"), "rows": [1.5, float("inf"), (float("-inf"), 2)]})
    assert json.loads((tmp_path / "a.json").read_text(), parse_constant=refuse) == {
        "fid": None, "rows": [1.5, None, [None, 2]]}


def test_unwritable_reason_names_the_blocking_file(tmp_path):
    (tmp_path / "f").write_text("x")
    assert "is a file, not a folder" in io.unwritable_reason(tmp_path / "f" / "out", folder=True)
    assert "is a folder" in io.unwritable_reason(tmp_path, folder=False)
    assert io.unwritable_reason(tmp_path / "new", folder=True) is None and (tmp_path / "new").is_dir()


# ----------------------------------------------------------------------------- pickles read without running them

class _Payload:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for arbitrary code in a shared file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _payload_files(tmp_path):
    """The same payload in the three containers a .pt file can be: torch's zip, torch's legacy format, a bare pickle."""
    import pickle

    import torch

    marker = tmp_path / "payload-ran"
    files = {"zip": tmp_path / "zip.pt", "legacy": tmp_path / "legacy.pt", "pickle": tmp_path / "bare.pt"}
    torch.save({"model": {}, "note": _Payload(marker)}, files["zip"])
    torch.save({"model": {}, "note": _Payload(marker)}, files["legacy"], _use_new_zipfile_serialization=False)
    files["pickle"].write_bytes(pickle.dumps({"note": _Payload(marker)}, protocol=4))
    return files, marker


def test_pickle_globals_name_the_payload_without_running_it(tmp_path):
    files, marker = _payload_files(tmp_path)
    for path in files.values():
        assert io.refused_pickle_global(path) == "io.open"
    assert not marker.exists()


def test_pickle_globals_of_a_plain_state_dict_are_torch_only(tmp_path):
    import torch

    torch.save({"w": torch.ones(2), "nested": {"b": torch.zeros(1)}}, tmp_path / "ok.pt")
    assert io.refused_pickle_global(tmp_path / "ok.pt") is None
    (tmp_path / "garbage.pt").write_bytes(b"\x80\x02garbage" * 50)
    assert io.refused_pickle_global(tmp_path / "garbage.pt") is None


@pytest.mark.filterwarnings("ignore::UserWarning")   # torch warns about the bare pickle's protocol
def test_every_payload_container_is_reported_as_code(tmp_path):
    from full.checkpoint import CheckpointError, read_checkpoint_file

    files, marker = _payload_files(tmp_path)
    for path in files.values():
        with pytest.raises(CheckpointError, match="holds code and was refused") as refused:
            read_checkpoint_file(path)
        assert str(path) in str(refused.value) and "io.open" in str(refused.value)
    assert not marker.exists()
