"""Checkpoint files (full/checkpoint.py): weights-only format, refusal of bad and unsafe files, full disk,
RNG round trip, log truncation, the stop-on-signal handler.

Oracles: ``torch.load(weights_only=True)`` itself (the format must pass it), a planted pickle payload that
demonstrably runs under ``weights_only=False`` (so its absence proves it was not run), draws from every
RNG before and after a round trip, and hand-written JSONL logs.
"""
from __future__ import annotations

import errno
import io
import json
import os
import random
import signal

import numpy as np
import pytest
import torch

from full import checkpoint as C
from full.model import build_model
from full.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

PRESET = "pMF-T/2"


class PlantedPayload:
    """Unpickling this object calls ``open(marker, "w")``: a stand-in for arbitrary code in a shared file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant_pickle(path, marker) -> None:
    """A checkpoint-shaped file whose config hides the payload; proves the payload is live, then removes its trace."""
    torch.save({"model": {}, "config": {"model": {"preset": PRESET}, "note": PlantedPayload(marker)}}, path)
    torch.load(path, weights_only=False)          # the unsafe load does run it ...
    assert os.path.exists(marker)
    os.remove(marker)                             # ... so a missing marker later means it never ran


@pytest.fixture(scope="module")
def run_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(preset=PRESET, num_classes=10, batch_size=4, steps=2, perceptual="none", out=str(out),
                      ema_half_lives_kimg=(0.5,), device="cpu", num_workers=0, log_every=1)
    return train(cfg, progress=False).checkpoint


def _values(obj):
    """Every leaf of nested dicts / lists / tuples."""
    if isinstance(obj, dict):
        return [leaf for value in obj.values() for leaf in _values(value)]
    if isinstance(obj, (list, tuple)):
        return [leaf for value in obj for leaf in _values(value)]
    return [obj]


def test_trainer_checkpoint_is_tensors_and_plain_containers(run_checkpoint):
    state = torch.load(run_checkpoint, weights_only=True)   # raises on anything else
    assert state["format"] == C.CHECKPOINT_FORMAT
    plain = (torch.Tensor, str, int, float, bool, type(None))
    assert all(isinstance(leaf, plain) for leaf in _values(state))
    assert isinstance(state["rng"]["numpy"]["keys"], torch.Tensor)
    assert isinstance(state["rng"]["python"]["state"], torch.Tensor)


def test_rng_state_round_trip_restores_every_generator():
    generator = torch.Generator().manual_seed(3)
    random.seed(1), np.random.seed(2), torch.manual_seed(4)
    np.random.standard_normal()                      # a cached Gaussian in numpy's state
    state = C.capture_rng_state(generator)
    saved = io.BytesIO()
    torch.save(state, saved)
    draws = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(),
             torch.rand(3).tolist(), torch.rand(3, generator=generator).tolist())
    saved.seek(0)
    C.restore_rng_state(torch.load(saved, weights_only=True), generator)
    again = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(),
             torch.rand(3).tolist(), torch.rand(3, generator=generator).tolist())
    assert again == draws


def test_planted_pickle_is_refused_and_never_run(tmp_path):
    path, marker = tmp_path / "shared.pt", tmp_path / "payload-ran"
    plant_pickle(path, marker)
    for load in (C.load_checkpoint, C.read_checkpoint_file, C.load_model):
        with pytest.raises(C.CheckpointError, match="refused: it holds Python objects") as refused:
            load(path)
        assert str(path) in str(refused.value) and "\n" not in str(refused.value)
    assert not marker.exists()


def _bad_files(tmp_path, good):
    data = good.read_bytes()
    files = {"empty": b"", "truncated": data[: len(data) // 2], "garbage": os.urandom(2048)}
    paths = {}
    for name, content in files.items():
        paths[name] = tmp_path / f"{name}.pt"
        paths[name].write_bytes(content)
    paths["foreign"] = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(3)}, paths["foreign"])
    paths["official"] = tmp_path / "official.pt"
    torch.save({"net.pos_embed": torch.zeros(3)}, paths["official"])
    paths["list"] = tmp_path / "list.pt"
    torch.save([torch.zeros(3)], paths["list"])
    paths["unknown preset"] = tmp_path / "preset.pt"
    torch.save({"model": {}, "config": {"model": {"preset": "pMF-Q/9"}}}, paths["unknown preset"])
    return paths


@pytest.mark.parametrize("kind, message", [
    ("empty", "is empty (0 bytes)"), ("truncated", "truncated or corrupt"), ("garbage", "not a"),
    ("foreign", "not a full.train checkpoint"), ("official", "--official-ckpt"), ("list", "holds a list"),
    ("unknown preset", "config.model.preset is 'pMF-Q/9'"), ("missing", "does not exist"),
])
def test_bad_checkpoint_files_are_one_line_errors_naming_the_file(run_checkpoint, tmp_path, kind, message):
    path = _bad_files(tmp_path, run_checkpoint).get(kind, tmp_path / "missing.pt")
    with pytest.raises(C.CheckpointError) as error:
        C.load_checkpoint(path)
    assert message in str(error.value) and str(path) in str(error.value) and "\n" not in str(error.value)


def test_load_model_refuses_non_finite_weights(tmp_path):
    model = build_model(PRESET, num_classes=10, v_head=False)
    state = model.state_dict()
    state["u_head.out.weight"] = torch.full_like(state["u_head.out.weight"], float("nan"))
    C.save_checkpoint(tmp_path / "nan.pt", {"model": state, "ema": {"1": model.state_dict()},
                                            "config": {"model": {"preset": PRESET, "num_classes": 10}}})
    with pytest.raises(C.CheckpointError, match=r"raw weights hold NaN or inf \(tensor 'u_head.out.weight'\)"):
        C.load_model(tmp_path / "nan.pt")
    assert C.load_model(tmp_path / "nan.pt", ema="1") is not None      # the finite EMA still loads


def test_load_model_refuses_weights_of_another_shape(tmp_path):
    state = build_model(PRESET, num_classes=10, v_head=False).state_dict()
    C.save_checkpoint(tmp_path / "shape.pt", {"model": state, "config": {"model": {"preset": PRESET, "num_classes": 7}}})
    with pytest.raises(C.CheckpointError, match="do not fit the recorded model"):
        C.load_model(tmp_path / "shape.pt")


class _DiskFillsUp(io.RawIOBase):
    """A file that accepts ``capacity`` bytes and then fails like a full disk."""

    def __init__(self, raw, capacity: int):
        self.raw, self.capacity = raw, capacity

    def writable(self):
        return True

    def write(self, data):
        if self.capacity < len(data):
            raise OSError(errno.ENOSPC, "No space left on device")
        self.capacity -= len(data)
        return self.raw.write(data)

    def fileno(self):
        return self.raw.fileno()

    def close(self):
        self.raw.close()
        super().close()


def test_full_disk_says_no_space_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    C.save_checkpoint(path, {"step": 1, "weights": torch.arange(4.0)})
    real_fdopen = os.fdopen
    monkeypatch.setattr(C.os, "fdopen", lambda handle, mode: _DiskFillsUp(real_fdopen(handle, mode), 500))
    with pytest.raises(C.CheckpointWriteError, match="no space left on device .the previous checkpoint is kept") as error:
        C.save_checkpoint(path, {"step": 2, "weights": torch.zeros(10_000)})   # torch's writer wraps the OSError
    monkeypatch.undo()
    assert error.value.errno == errno.ENOSPC
    assert C.read_checkpoint_file(path)["step"] == 1 and sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]


def test_stale_temp_files_of_a_killed_save_are_removed(tmp_path):
    (tmp_path / f"{C.TEMP_PREFIX}checkpoint.pt.abc123").write_bytes(b"half a checkpoint")
    (tmp_path / "checkpoint.pt").write_bytes(b"kept")
    (tmp_path / f"{C.TEMP_PREFIX}other.pt.x").write_bytes(b"not ours")
    removed = C.remove_stale_temp_files(tmp_path)
    assert [path.name for path in removed] == [f"{C.TEMP_PREFIX}checkpoint.pt.abc123"]
    assert sorted(os.listdir(tmp_path)) == [f"{C.TEMP_PREFIX}other.pt.x", "checkpoint.pt"]


def test_truncate_log_keeps_each_step_up_to_the_checkpoint_once(tmp_path):
    path = tmp_path / "log.jsonl"
    lines = [json.dumps({"step": step, "loss": float(step)}) for step in (1, 2, 3, 4, 5)]
    lines += [json.dumps({"step": 3, "loss": 30.0}), '{"step": 6, "lo']          # a re-run step, a torn line
    path.write_text("\n".join(lines))
    assert C.truncate_log(path, 4) == 3
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [record["step"] for record in records] == [1, 2, 3, 4]
    assert records[2]["loss"] == 30.0                                             # the latest record of step 3
    assert C.truncate_log(path, 4) == 0 and C.truncate_log(tmp_path / "absent.jsonl", 4) == 0


def test_stop_on_signal_defers_the_first_signal_and_passes_on_the_second():
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        with C.StopOnSignal(announce=False) as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.signum == signal.SIGTERM and received == []      # deferred: the process lives on
            os.kill(os.getpid(), signal.SIGTERM)
            assert received == [signal.SIGTERM]                          # the second reaches the old handler
        assert signal.getsignal(signal.SIGTERM) is not stop._handle
    finally:
        signal.signal(signal.SIGTERM, previous)
