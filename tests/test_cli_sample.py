"""``python -m full.sample`` under bad input: one error line and exit 2 for every bad file, flag and folder;
stale samples are never mixed with new ones; the authors' released layout (``--official-ckpt``) samples
exactly what the network gives.

Oracles: the in-process network's one-step images (``x_hat(z_1, 0, 1)``) for the released layout, the
folder listing before and after, and a planted pickle shown to run under ``weights_only=False``.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from full import sample as S
from full.checkpoint import save_checkpoint
from full.model import build_model
from full.official import to_official_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")

PRESET = "pMF-T/2"
COMMON = ["--num", "4", "--device", "cpu", "--no-progress", "--grid", "0"]


def _perturbed(preset: str = PRESET, seed: int = 0, scale: float = 0.2, **overrides) -> torch.nn.Module:
    """A network whose zero-initialised heads and gates are perturbed, so its samples are not constant."""
    torch.manual_seed(seed)
    model = build_model(preset, v_head=False, **overrides)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def _contract(model) -> dict:
    return {"model": model.state_dict(), "ema": {"2000": model.state_dict()},
            "config": {"model": {"preset": PRESET, "num_classes": 10}}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    save_checkpoint(path, _contract(_perturbed(num_classes=10)))
    return path


def run_cli(argv, capsys) -> tuple[int, list[str]]:
    try:
        S.main([str(arg) for arg in argv])
        code = 0
    except SystemExit as stop:
        code = stop.code
    return code, [line for line in capsys.readouterr().err.splitlines() if "error:" in line]


def _file(tmp_path, name, content: bytes):
    (tmp_path / name).write_bytes(content)
    return tmp_path / name


def _nan_checkpoint(tmp_path):
    state = _contract(_perturbed(num_classes=10))
    state["ema"]["2000"]["u_head.out.bias"] = torch.full_like(state["ema"]["2000"]["u_head.out.bias"], float("inf"))
    save_checkpoint(tmp_path / "nan.pt", state)
    return tmp_path / "nan.pt"


def _exploding_checkpoint(tmp_path):
    """Finite but absurd weights (what one step at lr 1e30 leaves): the images come out NaN."""
    save_checkpoint(tmp_path / "huge.pt", _contract(_perturbed(num_classes=10, scale=1e25)))
    return tmp_path / "huge.pt"


def _planted(tmp_path):
    from test_full_checkpoint import plant_pickle   # the payload's helper lives with the checkpoint tests
    plant_pickle(tmp_path / "pickle.pt", tmp_path / "payload-ran")
    return tmp_path / "pickle.pt"


def _earlier_samples(tmp_path):
    (tmp_path / "out" / "images").mkdir(parents=True)
    (tmp_path / "out" / "images" / "000000.png").write_bytes(b"an earlier sample")
    return tmp_path / "out"


def _official(tmp_path, preset="pMF-T/4"):
    torch.save(to_official_state_dict(_perturbed(preset)), tmp_path / "official.pt")
    return tmp_path / "official.pt"


BAD_INPUTS = [   # (name, argv builder (tmp_path, checkpoint), text the one error line must contain)
    ("no checkpoint", lambda t, c: ["--out", t / "o"], "one of the arguments --ckpt --official-ckpt is required"),
    ("both checkpoints", lambda t, c: ["--ckpt", c, "--official-ckpt", c, "--out", t / "o"], "not allowed with"),
    ("missing --ckpt", lambda t, c: ["--ckpt", t / "absent.pt", "--out", t / "o"], "--ckpt"),
    ("empty --ckpt", lambda t, c: ["--ckpt", _file(t, "e.pt", b""), "--out", t / "o"], "is empty (0 bytes)"),
    ("truncated --ckpt", lambda t, c: ["--ckpt", _file(t, "t.pt", c.read_bytes()[:3000]), "--out", t / "o"],
     "truncated or corrupt"),
    ("garbage --ckpt", lambda t, c: ["--ckpt", _file(t, "g.pt", b"GIF89a" * 400), "--out", t / "o"], "not a torch file"),
    ("foreign --ckpt", lambda t, c: ["--ckpt", _official(t), "--out", t / "o"], "sample it with --official-ckpt"),
    ("planted pickle", lambda t, c: ["--ckpt", _planted(t), "--out", t / "o"], "refused: it holds Python objects"),
    ("NaN weights", lambda t, c: ["--ckpt", _nan_checkpoint(t), "--out", t / "o"], "EMA 2000 hold NaN or inf"),
    ("weights that explode", lambda t, c: ["--ckpt", _exploding_checkpoint(t), "--out", t / "o"],
     "the network returned NaN or inf"),
    ("absent EMA", lambda t, c: ["--ckpt", c, "--ema", "500", "--out", t / "o"], "available EMAs"),
    ("--out under a file", lambda t, c: ["--ckpt", c, "--out", _file(t, "f", b"x") / "o"], "is a file, not a folder"),
    ("--out holds samples", lambda t, c: ["--ckpt", c, "--out", _earlier_samples(t)], "pass --overwrite"),
    ("--preset with --ckpt", lambda t, c: ["--ckpt", c, "--preset", PRESET, "--out", t / "o"],
     "--preset applies only to --official-ckpt"),
    ("--official-ckpt without --preset", lambda t, c: ["--official-ckpt", _official(t), "--out", t / "o"],
     "--official-ckpt needs --preset"),
    ("--ema with --official-ckpt", lambda t, c: ["--official-ckpt", _official(t), "--preset", "pMF-T/4", "--ema",
                                                 "2000", "--out", t / "o"], "--ema does not apply"),
    ("--official-ckpt of another preset", lambda t, c: ["--official-ckpt", _official(t), "--preset", "pMF-T/2",
                                                        "--out", t / "o"], "pass --preset pMF-T/4"),
    ("garbage --official-ckpt", lambda t, c: ["--official-ckpt", _file(t, "g.pt", b"\x00" * 999), "--preset",
                                              "pMF-T/4", "--out", t / "o"], "not a readable torch state dict"),
    ("our checkpoint as --official-ckpt", lambda t, c: ["--official-ckpt", c, "--preset", PRESET, "--out", t / "o"],
     "expected a state dict"),
]


@pytest.mark.parametrize("name, argv, message", BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_is_one_error_line_and_exit_2(name, argv, message, tmp_path, checkpoint, capsys):
    code, errors = run_cli([*argv(tmp_path, checkpoint), *COMMON], capsys)
    assert code == 2 and len(errors) == 1 and message in errors[0], (code, errors)
    assert not (tmp_path / "o" / "images").exists() or not os.listdir(tmp_path / "o" / "images")
    assert not (tmp_path / "payload-ran").exists()


def test_overwrite_deletes_the_earlier_samples_first(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(["--ckpt", checkpoint, "--out", out, *COMMON, "--num", "6", "--grid", "4"], capsys)[0] == 0
    assert run_cli(["--ckpt", checkpoint, "--out", out, *COMMON, "--num", "3"], capsys)[0] == 2     # refused
    assert len(os.listdir(out / "images")) == 6
    assert run_cli(["--ckpt", checkpoint, "--out", out, *COMMON, "--num", "3", "--overwrite"], capsys)[0] == 0
    assert sorted(os.listdir(out / "images")) == ["000000.png", "000001.png", "000002.png"]   # no stale 3..5
    assert not (out / "grid.png").exists()                                    # the old grid went too
    with np.load(out / "samples.npz") as data:
        assert data["arr_0"].shape[0] == 3


def test_foreign_images_are_refused_even_with_overwrite(checkpoint, tmp_path, capsys):
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "images" / "holiday.jpg")
    code, errors = run_cli(["--ckpt", checkpoint, "--out", tmp_path, *COMMON, "--overwrite"], capsys)
    assert code == 2 and "holiday.jpg" in errors[0]
    assert os.listdir(tmp_path / "images") == ["holiday.jpg"]


def test_official_checkpoint_samples_equal_the_network_in_process(tmp_path, capsys):
    """Released layout -> load_official_checkpoint -> the CLI's images == the same network's one-step images."""
    model = _perturbed("pMF-T/4")
    torch.save(to_official_state_dict(model), tmp_path / "released.pt")
    out = tmp_path / "out"
    assert run_cli(["--official-ckpt", tmp_path / "released.pt", "--preset", "pMF-T/4", "--out", out, *COMMON,
                    "--format", "npz"], capsys)[0] == 0
    defaults = S.sampling_defaults("pMF-T/4")
    expected = torch.cat([images for _, _, images in S.iter_samples(
        model, torch.arange(4), omega=defaults["omega"], t_min=defaults["t_min"], t_max=defaults["t_max"], seed=0,
        batch_size=4, progress=False)])
    with np.load(out / "samples.npz") as data:
        np.testing.assert_array_equal(data["arr_0"], expected.permute(0, 2, 3, 1).numpy())
    assert expected.float().std() > 1                                          # not blank images
    info = json.loads((out / "sample_config.json").read_text())
    assert info["official_ckpt"] == str(tmp_path / "released.pt") and info["preset"] == "pMF-T/4"
    assert (info["omega"], info["t_min"], info["t_max"], info["ema"]) == (defaults["omega"], defaults["t_min"],
                                                                          defaults["t_max"], None)
    assert info["noise_scale"] == model.noise_scale
