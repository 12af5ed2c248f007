"""The guidance search (full/guidance_search.py): each row equals full.sample + full.evaluate at its setting
(random Inception, tiny checkpoint); under bad input every unusable checkpoint, statistics file, weights file
or output path is one error line naming it, exit 2 -- found before the first sample is drawn.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from full import evaluate as E
from full import fid as F
from full import guidance_search as G
from full import sample as S
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


def _foreign_ema_key(tmp_path):
    state = _state()
    state["ema"] = {"fast": state["ema"]["500"]}
    save_checkpoint(tmp_path / "foreign_ema.pt", state)
    return tmp_path / "foreign_ema.pt"


def _nan_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "nan.pt", _state(nan=True))
    return tmp_path / "nan.pt"


def _npz64(path):
    np.savez(path, mu=np.zeros(64), sigma=np.eye(64))
    return path


BAD_INPUTS = [   # (name, flags builder (tmp), text of the one error line)
    ("empty --ckpt", lambda t: ["--ckpt", _write(t / "e.pt", b"")], "is empty (0 bytes)"),
    ("truncated --ckpt", lambda t: ["--ckpt", _write(t / "t.pt", (t / "ckpt.pt").read_bytes()[:2000])],
     "truncated or corrupt"),
    ("garbage --ckpt", lambda t: ["--ckpt", _write(t / "g.pt", b"%PDF-1.4" * 300)], "not a torch file"),
    ("foreign --ckpt", lambda t: ["--ckpt", _torch(t / "f.pt", {"net.pos_embed": torch.zeros(2)})],
     "sample it with --official-ckpt"),
    ("planted pickle", lambda t: ["--ckpt", _planted(t)], "refused: it holds Python objects"),
    ("NaN EMA", lambda t: ["--ckpt", _nan_checkpoint(t)], "EMA 500 hold NaN or inf"),
    ("EMA key not a half-life", lambda t: ["--ckpt", _foreign_ema_key(t)], "'ema' is not {half-life in kimg"),
    ("garbage --ref", lambda t: ["--ref", _write(t / "r.npz", b"nonsense" * 10)], "not a readable .npz"),
    ("--ref of 64-d features", lambda t: ["--ref", _npz64(t / "r64.npz")], "64-d features"),   # at start-up
    ("--out under a file", lambda t: ["--out", _write(t / "f", b"x") / "search.json"], "is a file, not a folder"),
    ("empty --inception-weights", lambda t: ["--inception-weights", t / "weights.pth"], "is empty (0 bytes)"),
    ("absent --inception-weights", lambda t: ["--inception-weights", t / "absent.pth"], "absent.pth"),
    ("--out holds an earlier search", lambda t: ["--out", _earlier_search(t)], "pass --overwrite"),
    ("--overwrite passes that check", lambda t: ["--out", _earlier_search(t), "--overwrite", "--inception-weights",
                                                 t / "weights.pth"], "is empty (0 bytes)"),
]


def _earlier_search(tmp_path):
    (tmp_path / "search").mkdir()
    (tmp_path / "search" / G.RESULT_NAME).write_text('{"rows": ["an earlier search"]}')
    return tmp_path / "search"


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
    if (files / "search" / G.RESULT_NAME).exists():                          # an earlier result is never touched
        assert "an earlier search" in (files / "search" / G.RESULT_NAME).read_text()
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """The contract's checkpoint layout holding a randomised pMF-T/2 under EMA key "500"."""
    torch.manual_seed(0)
    model = build_model("pMF-T/2", num_classes=10, v_head=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=generator))
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    save_checkpoint(path, {"model": model.state_dict(), "ema": {"500": model.state_dict()},
                           "config": {"model": {"preset": "pMF-T/2", "num_classes": 10}}})
    return path


def test_guidance_search_rows_match_sample_then_evaluate(tiny_checkpoint, image_folder, random_weights, tmp_path,
                                                         capsys):
    common = ["--inception-weights", str(random_weights), "--device", "cpu", "--no-progress", "--batch-size", "4"]
    E.main(["ref-stats", "--data", str(image_folder), "--resolution", "16", "--out", str(tmp_path),
            "--num-workers", "0", *common])
    (tmp_path / E.REF_STATS_NAME).rename(tmp_path / "ref.npz")
    G.main(["--ckpt", str(tiny_checkpoint), "--ref", str(tmp_path / "ref.npz"), "--omegas", "1", "3",
            "--intervals", "0.1,0.7", "--emas", "500", "--num", "4", "--is-splits", "2",
            "--out", str(tmp_path / "search"), *common])
    printed = capsys.readouterr().out
    rows = json.loads((tmp_path / "search" / G.RESULT_NAME).read_text())["rows"]
    assert [(row["omega"], row["t_min"], row["t_max"], row["ema"]) for row in rows] == [
        (1.0, 0.1, 0.7, "500"), (3.0, 0.1, 0.7, "500")]
    assert printed.count("<- best FID") == 1 and "omega" in printed
    assert rows[0]["fid"] != rows[1]["fid"]               # guidance changes the samples

    S.main(["--ckpt", str(tiny_checkpoint), "--ema", "500", "--omega", "3", "--interval", "0.1,0.7",
            "--num", "4", "--out", str(tmp_path / "samples"), "--format", "npz", "--grid", "0", "--device", "cpu",
            "--no-progress"])
    metrics = E.evaluate(E.EvalConfig(samples=str(tmp_path / "samples" / "samples.npz"), ref=str(tmp_path / "ref.npz"),
                                      inception_weights=str(random_weights), is_splits=2, progress=False))
    assert rows[1]["fid"] == pytest.approx(metrics["fid"], rel=1e-6)
    assert rows[1]["is_mean"] == pytest.approx(metrics["is_mean"], rel=1e-6)
    assert not os.path.exists(tmp_path / "samples" / "images" / "000000.png")   # --format npz only


@pytest.mark.parametrize("flags, message", [
    (["--emas", "123"], "available (half-life kimg): ['500']"),
    (["--emas", "fast"], "--emas: each must be"),
    (["--omegas", "0.9"], "--omegas: each must be"),
    (["--intervals", "0.5,0.2"], "--intervals: each needs"),
    (["--num", "1"], "--num must be"),
])
def test_guidance_search_cli_rejects_bad_arguments(tiny_checkpoint, tmp_path, capsys, flags, message):
    F.save_statistics(tmp_path / "ref.npz", np.zeros(2048), np.eye(2048))
    with pytest.raises(SystemExit):
        G.main(["--ckpt", str(tiny_checkpoint), "--ref", str(tmp_path / "ref.npz"), "--omegas", "2", *flags])
    assert message in capsys.readouterr().err




def test_default_ema_is_one_the_checkpoint_kept(tiny_checkpoint, image_folder, random_weights, tmp_path, capsys):
    """The checkpoint kept EMA 500 only (not the preset's 2000): without --emas that one is searched."""
    E.main(["ref-stats", "--data", str(image_folder), "--resolution", "16", "--out", str(tmp_path), "--num-workers",
            "0", "--inception-weights", str(random_weights), "--no-progress", "--device", "cpu"])
    capsys.readouterr()
    G.main(["--ckpt", str(tiny_checkpoint), "--ref", str(tmp_path / E.REF_STATS_NAME), "--omegas", "2", "--num", "4",
            "--is-splits", "2", "--inception-weights", str(random_weights), "--device", "cpu", "--no-progress",
            "--json"])
    assert [row["ema"] for row in json.loads(capsys.readouterr().out)["rows"]] == ["500"]


def test_full_disk_is_one_line_and_keeps_the_last_complete_json(files, random_weights, capsys, monkeypatch):
    import errno

    from full import io

    row = {"ema": "500", "omega": 2.0, "t_min": 0.1, "t_max": 0.7, "fid": float("nan"), "is_mean": 1.0}
    writes = []

    def two_rows_then_full_disk(path, payload):
        writes.append(path)
        if len(writes) > 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        io.write_json(path, payload)

    def fake_search(load_model, extractor, ref_mu, ref_sigma, cfg, on_row):
        on_row(dict(row))
        on_row(dict(row, omega=3.0))

    monkeypatch.setattr(G, "write_json", two_rows_then_full_disk)
    monkeypatch.setattr(G, "search", fake_search)
    with pytest.raises(SystemExit) as stop:
        G.main([str(arg) for arg in ["--ckpt", files / "ckpt.pt", "--ref", files / "ref.npz", "--omegas", "2", "3",
                                     "--emas", "500", "--num", "2", "--is-splits", "1", "--device", "cpu",
                                     "--inception-weights", random_weights, "--out", files / "search"]])
    error = capsys.readouterr().err
    assert stop.value.code == 1 and error.count("\n") == 1 and "No space left on device" in error, error
    saved = json.loads((files / "search" / G.RESULT_NAME).read_text())   # strict JSON: the NaN FID is null
    assert [r["omega"] for r in saved["rows"]] == [2.0] and saved["rows"][0]["fid"] is None
