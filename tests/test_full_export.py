"""Exported inference weights (full/export.py): round trips in both layouts, the config, CLI errors.

Oracles: the checkpoint's own model (``full.checkpoint.load_model``) -- an exported and reloaded
network must give bit-identical outputs -- and the authors'-layout loader of full.official.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from full import export as X
from full.checkpoint import load_checkpoint, load_model, save_checkpoint
from full.data import SyntheticDataset
from full.model import build_model, make_cond
from full.official import load_official_state_dict
from full.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

EMA = "1"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real 2-step pMF-T/2 run (10 classes, EMAs 0.5 and 1 kimg)."""
    out = tmp_path_factory.mktemp("run") / "run"
    cfg = TrainConfig(preset="pMF-T/2", num_classes=10, batch_size=8, steps=2, perceptual="none", out=str(out),
                      ckpt_every=1000, log_every=1, ema_half_lives_kimg=(0.5, 1.0), device="cpu", num_workers=0)
    train(cfg, SyntheticDataset(16, 16, num_classes=10, seed=1), progress=False)
    return out / "checkpoint.pt"


def _outputs(model: torch.nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(3, 3, 16, 16, generator=generator)
    with torch.no_grad():
        return model.forward_u(z, torch.zeros(3), torch.ones(3), make_cond(torch.tensor([0, 4, 9]), 2.0, 0.1, 0.7))


def test_export_round_trip_gives_the_checkpoint_network(checkpoint, tmp_path):
    out = tmp_path / "model.safetensors"
    config = X.export(checkpoint, out, ema=EMA)
    reference = load_model(checkpoint, EMA)
    state = load_file(str(out))
    assert set(state) == set(reference.state_dict()) and not any(name.startswith("v_head.") for name in state)
    assert all(torch.equal(state[name], tensor) for name, tensor in reference.state_dict().items())
    model, loaded = X.load_exported(out)
    assert torch.equal(_outputs(model), _outputs(reference)) and not model.training
    assert loaded == config == json.loads(X.config_path(out).read_text())
    saved = load_checkpoint(checkpoint)
    assert config["model"] == {**saved["config"]["model"], "v_head": False}
    assert (config["model"]["preset"], config["model"]["num_classes"]) == ("pMF-T/2", 10)
    assert (config["ema"], config["step"], config["images_seen"]) == (EMA, 2, 16)
    assert config["parameters"] == sum(p.numel() for p in reference.parameters())
    assert config["sampling"] == {"omega": 8.5, "t_min": 0.1, "t_max": 0.7}   # the tiny presets take B/16's
    assert config["prediction"] == saved["config"]["train"]["prediction"] == "x"
    assert out.stat().st_size < checkpoint.stat().st_size / 3          # no v-head, optimiser or other EMAs


def test_export_raw_weights_are_the_trained_model(checkpoint, tmp_path):
    X.export(checkpoint, tmp_path / "raw.safetensors", ema="raw")
    trained = load_checkpoint(checkpoint)["model"]
    state = load_file(str(tmp_path / "raw.safetensors"))
    assert state and all(torch.equal(tensor, trained[name]) for name, tensor in state.items())
    assert not any(name.startswith("v_head.") for name in state)


def test_safetensors_file_alone_carries_its_config(checkpoint, tmp_path):
    out = tmp_path / "model.safetensors"
    config = X.export(checkpoint, out, ema=EMA)
    X.config_path(out).unlink()
    model, loaded = X.load_exported(out)
    assert loaded == config and torch.equal(_outputs(model), _outputs(load_model(checkpoint, EMA)))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_official_layout_loads_with_the_authors_loader(checkpoint, tmp_path, suffix):
    out = tmp_path / f"pMF-T-2{suffix}"
    X.export(checkpoint, out, ema=EMA, layout="official")
    state = load_file(str(out)) if suffix == ".safetensors" else torch.load(out, weights_only=True)
    assert all(name.startswith("net.") for name in state) and "net.rope_freqs" in state
    assert not any(name.startswith(("net.v_heads.", "net.v_final_layer.")) for name in state)
    theirs = build_model("pMF-T/2", num_classes=10, v_head=False)
    load_official_state_dict(theirs, state, source=str(out))
    reference = _outputs(load_model(checkpoint, EMA))
    assert torch.equal(_outputs(theirs.eval()), reference)
    model, config = X.load_exported(out)
    assert config["layout"] == "official" and torch.equal(_outputs(model), reference)
    assert X.is_export(out)


def test_load_exported_refuses_broken_files(checkpoint, tmp_path):
    out = tmp_path / "model.safetensors"
    X.export(checkpoint, out, ema=EMA)
    (tmp_path / "cut.safetensors").write_bytes(out.read_bytes()[:100])
    with pytest.raises(X.ExportError, match="cut.safetensors"):
        X.load_exported(tmp_path / "cut.safetensors")
    with pytest.raises(X.ExportError, match="does not exist"):
        X.load_exported(tmp_path / "absent.safetensors")
    official = tmp_path / "official.pt"
    X.export(checkpoint, official, ema=EMA, layout="official")
    X.config_path(official).unlink()
    assert not X.is_export(official)
    with pytest.raises(X.ExportError, match="official.json"):
        X.load_exported(official)


@pytest.fixture
def nan_checkpoint(checkpoint, tmp_path):
    state = load_checkpoint(checkpoint)
    state["ema"][EMA]["pos_embed"][0, 0, 0] = float("nan")
    return save_checkpoint(tmp_path / "diverged.pt", state)


@pytest.mark.parametrize("argv_tail, message", [
    (["--out", "a_file"], "--out"),
    (["--out", "export", "--ema", "7"], "it kept --ema 0.5, --ema 1, or pass --ema raw"),   # flags, not ema=None
    (["--out", "export", "--ema", "2000"], "--ema 2000: the checkpoint has no EMA '2000'"),
    (["--out", "export", "--ema", "abc"], "--ema"),
    (["--out", "exists", "--ema", EMA], "--force"),
    (["--out", "official", "--ema", EMA, "--force"], "an export in the other --format"),
])
def test_cli_bad_input_one_line_error(checkpoint, argv_tail, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_bytes(b"")
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "model.safetensors").write_bytes(b"")
    (tmp_path / "official").mkdir()
    (tmp_path / "official" / "model.pt").write_bytes(b"an official-layout export")
    with pytest.raises(SystemExit) as exit_info:
        X.main([str(checkpoint), *argv_tail])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in error and "Traceback" not in error


def test_cli_refuses_missing_and_diverged_checkpoints(nan_checkpoint, tmp_path, capsys):
    for ckpt, message in ((tmp_path / "absent.pt", "CKPT"), (nan_checkpoint, "NaN")):
        with pytest.raises(SystemExit) as exit_info:
            X.main([str(ckpt), "--ema", EMA, "--out", str(tmp_path / "export")])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "export" / "model.safetensors").exists()


def test_cli_writes_weights_and_config(checkpoint, tmp_path, capsys):
    X.main([str(checkpoint), "--ema", EMA, "--out", str(tmp_path)])
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "model.json").is_file()
    assert "parameters" in capsys.readouterr().out
    X.main([str(checkpoint), "--ema", "raw", "--out", str(tmp_path), "--force"])
    assert json.loads((tmp_path / "model.json").read_text())["ema"] == "raw"
    X.main([str(checkpoint), "--ema", EMA, "--out", str(tmp_path), "--format", "official", "--force"])
    assert (tmp_path / "model.pt").is_file()


@pytest.mark.parametrize("layout, suffix", [("ours", ".safetensors"), ("official", ".pt")])
def test_full_sample_reads_an_export_like_its_checkpoint(checkpoint, tmp_path, layout, suffix):
    import numpy as np

    from full import sample as S

    out = tmp_path / f"model{suffix}"
    X.export(checkpoint, out, ema=EMA, layout=layout)
    common = ["--num", "6", "--format", "npz", "--grid", "0", "--device", "cpu", "--no-progress", "--batch-size", "3"]
    S.main(["--ckpt", str(checkpoint), "--ema", EMA, "--out", str(tmp_path / "from_ckpt"), *common])
    S.main(["--ckpt", str(out), "--out", str(tmp_path / "from_export"), *common])
    with np.load(tmp_path / "from_ckpt" / "samples.npz") as a, np.load(tmp_path / "from_export" / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])
    assert S.checkpoint_info(str(out)) == ("pMF-T/2", [EMA])
    with pytest.raises(SystemExit) as exit_info:        # the export holds one EMA only
        S.main(["--ckpt", str(out), "--ema", "0.5", "--out", str(tmp_path / "other"), *common])
    assert exit_info.value.code == 2


def test_default_ema_is_the_one_the_run_kept(checkpoint, tmp_path, capsys):
    """The preset's best (2000) was not kept by this run (0.5 and 1): the nearest kept one is exported, and said."""
    X.main([str(checkpoint), "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert json.loads((tmp_path / "model.json").read_text())["ema"] == "1"
    assert "did not keep EMA 2000" in captured.err and "--ema" in captured.err


@pytest.mark.parametrize("kept, asked, expected", [
    (["500", "1000", "2000"], None, "2000"),       # the preset's best, kept
    (["0.5", "1"], None, "1"),                     # nearest to 2000 in log scale
    (["1000", "4000"], None, "4000"),              # a tie (a factor 2 each way): the longer half-life
    ([], None, "raw"),                             # no EMA kept: the raw weights
    (["1000"], "1000.0", "1000"), (["1000"], "raw", "raw"),
])
def test_choose_ema(kept, asked, expected):
    assert X.choose_ema("pMF-B/16", kept, asked) == expected


def test_choose_ema_names_the_flag():
    with pytest.raises(X.MissingEMAError) as error:
        X.choose_ema("pMF-B/16", ["500"], "2000")
    assert "--ema 2000" in error.value.args[0] and "--ema 500" in error.value.args[0]
    assert "ema=None" not in error.value.args[0]
    with pytest.raises(ValueError, match="--ema"):
        X.choose_ema("pMF-B/16", ["500"], "abc")


# ----------------------------------------------------------------------------- damaged exports, full disks

def _beside_a_valid_config(checkpoint, tmp_path, content):
    """``model.pt`` holding ``content`` (bytes, or an object to torch.save) beside a valid official-layout model.json."""
    out = tmp_path / "export" / "model.pt"
    X.export(checkpoint, out, ema=EMA, layout="official")
    if isinstance(content, bytes):
        out.write_bytes(content)
    else:
        torch.save(content, out)
    return out


def _metadata_export(tmp_path, metadata: str):
    from safetensors.torch import save

    path = tmp_path / "model.safetensors"
    path.write_bytes(save({"pos_embed": torch.zeros(2)}, metadata={X.METADATA_KEY: metadata}))
    return path


@pytest.mark.parametrize("make, message", [
    (lambda c, t: _beside_a_valid_config(c, t, b"\x00garbage" * 400), "is not a torch file"),
    (lambda c, t: _beside_a_valid_config(c, t, b""), "is empty"),
    (lambda c, t: _beside_a_valid_config(c, t, [torch.zeros(2)]), "is not a state dict"),
    (lambda c, t: _planted_export(c, t), "holds code and was refused"),
    (lambda c, t: _metadata_export(t, "{not json"), "its metadata entry 'pmf_config' is not JSON"),
    (lambda c, t: _metadata_export(t, "[1, 2]"), "is not a full.export config"),
    (lambda c, t: _metadata_export(t, json.dumps({"format": X.EXPORT_FORMAT, "model": {"preset": "pMF-Z/1"},
                                                  "layout": "ours", "ema": "1"})), "the config names preset 'pMF-Z/1'"),
])
def test_damaged_export_is_one_line_naming_the_file(checkpoint, tmp_path, capsys, make, message):
    from full import sample as S

    path = make(checkpoint, tmp_path)
    with pytest.raises(X.ExportError, match=message) as raised:
        X.load_exported(path)
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)
    with pytest.raises(SystemExit) as exit_info:   # full.sample: named as --ckpt, never as an --ema problem
        S.main(["--ckpt", str(path), "--num", "2", "--out", str(tmp_path / "samples"), "--device", "cpu"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1 and "--ckpt:" in error and message in error, error
    assert not (tmp_path / "payload-ran").exists()


def _planted_export(checkpoint, tmp_path):
    from test_full_checkpoint import PlantedPayload

    return _beside_a_valid_config(checkpoint, tmp_path, {"net.pos_embed": PlantedPayload(tmp_path / "payload-ran")})


@pytest.mark.parametrize("layout", ["ours", "official"])
def test_cli_full_disk_is_one_line_and_keeps_the_earlier_export(checkpoint, tmp_path, capsys, monkeypatch, layout):
    import errno

    from full import io

    X.main([str(checkpoint), "--ema", "0.5", "--out", str(tmp_path), "--format", layout])
    earlier = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    real_atomic_write = io.atomic_write

    def disk_fills_while_writing_weights(path, write, **kwargs):
        if path.suffix in X.SUFFIXES:
            def half_then_full(file):
                file.write(b"the first bytes of the weights")
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_atomic_write(path, half_then_full, **kwargs)
        return real_atomic_write(path, write, **kwargs)

    monkeypatch.setattr(X, "atomic_write", disk_fills_while_writing_weights)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        X.main([str(checkpoint), "--ema", EMA, "--out", str(tmp_path), "--format", layout, "--force"])
    error = capsys.readouterr().err
    assert exit_info.value.code == 1 and error.count("\n") == 1 and "No space left on device" in error, error
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == earlier   # both files, no temp
