"""``python -m full.guidance_search`` under bad input: every unusable checkpoint, statistics file, weights
file or output path is one error line naming it, exit 2 -- found before the first sample is drawn.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from full import fid as F
from full import guidance_search as G
from full.checkpoint import save_checkpoint
from full.model import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

PRESET = "pMF-T/2"


def _state(nan: bool = False) -> dict:
    torch.manual_seed(0)
    weights = build_model(PRESET, num_classes=10, v_head=False).state_dict()
    ema = {key: value.clone() for key, value in weights.items()}
    if nan:
        ema["pos_embed"] = torch.full_like(ema["pos_embed"], float("nan"))
    return {"model": weights, "ema": {"500": ema}, "config": {"model": {"preset": PRESET, "num_classes": 10}}}


@pytest.fixture
def files(tmp_path):
    save_checkpoint(tmp_path / "ckpt.pt", _state())
    F.save_statistics(tmp_path / "ref.npz", np.zeros(2048), np.eye(2048))
    (tmp_path / "weights.pth").write_bytes(b"")   # never reached by the cases below except where named
    return tmp_path


def _write(path, content: bytes):
    path.write_bytes(content)
    return path


def _planted(tmp_path):
    from test_full_checkpoint import plant_pickle   # the payload's helper lives with the checkpoint tests
    plant_pickle(tmp_path / "pickle.pt", tmp_path / "payload-ran")
    return tmp_path / "pickle.pt"


def _nan_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "nan.pt", _state(nan=True))
    return tmp_path / "nan.pt"


BAD_INPUTS = [   # (name, flags builder (tmp), text of the one error line)
    ("empty --ckpt", lambda t: ["--ckpt", _write(t / "e.pt", b"")], "is empty (0 bytes)"),
    ("truncated --ckpt", lambda t: ["--ckpt", _write(t / "t.pt", (t / "ckpt.pt").read_bytes()[:2000])],
     "truncated or corrupt"),
    ("garbage --ckpt", lambda t: ["--ckpt", _write(t / "g.pt", b"%PDF-1.4" * 300)], "not a torch file"),
    ("foreign --ckpt", lambda t: ["--ckpt", _torch(t / "f.pt", {"net.pos_embed": torch.zeros(2)})],
     "sample it with --official-ckpt"),
    ("planted pickle", lambda t: ["--ckpt", _planted(t)], "refused: it holds Python objects"),
    ("NaN EMA", lambda t: ["--ckpt", _nan_checkpoint(t)], "EMA 500 hold NaN or inf"),
    ("garbage --ref", lambda t: ["--ref", _write(t / "r.npz", b"nonsense" * 10)], "not a readable .npz"),
    ("--out under a file", lambda t: ["--out", _write(t / "f", b"x") / "search.json"], "is a file, not a folder"),
    ("empty --inception-weights", lambda t: ["--inception-weights", t / "weights.pth"], "is empty (0 bytes)"),
]


def _torch(path, obj):
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("name, flags, message", BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_is_one_error_line_and_exit_2(name, flags, message, files, capsys):
    argv = ["--ckpt", files / "ckpt.pt", "--ref", files / "ref.npz", "--omegas", "2", "--emas", "500", "--num", "2",
            "--is-splits", "1", "--device", "cpu", "--no-progress", *flags(files)]
    with pytest.raises(SystemExit) as stop:
        G.main([str(arg) for arg in argv])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert stop.value.code == 2 and len(errors) == 1 and message in errors[0], (stop.value.code, errors)
    assert not (files / "payload-ran").exists()
