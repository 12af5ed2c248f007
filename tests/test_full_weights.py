"""``python -m full.weights``: found / missing / wrong shape for each external file, checked by shape alone.

The references are files the test writes in the layouts the loaders read: a pMF-T/4 network in the
authors' layout, torchvision's VGG16 and timm's ConvNeXt-V2 state dicts with random values, and
reference statistics with the authors' TPU key names.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from full import weights
from full.model import build_model
from full.official import to_official_state_dict


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    return folder


def run(capsys, *argv):
    with pytest.raises(SystemExit) as exit_:
        weights.main([*argv, "--json"])
    return exit_.value.code, {record["path"]: record for record in json.loads(capsys.readouterr().out)}


def test_empty_hub_folder_reports_each_file_missing_by_name(hub, capsys):
    code, records = run(capsys)
    assert code == 1
    assert {record["status"] for record in records.values()} == {"missing"}
    assert {path.split("/")[-1] for path in records} == {
        "vgg16-397923af.pth", "convnextv2_base_22k_224_ema.pt", "weights-inception-2015-12-05-6726825d.pth"}


def test_official_checkpoint_must_fit_the_preset_its_name_says(hub, tmp_path, capsys):
    state = to_official_state_dict(build_model("pMF-T/4", v_head=False))   # keys net.*, as the released files
    named_b16, unnamed = tmp_path / "pMF-B-16.pt", tmp_path / "tiny.pt"
    torch.save(state, named_b16)
    torch.save(state, unnamed)
    code, records = run(capsys, "--official", str(named_b16), str(unnamed))
    assert code == 1
    assert records[str(named_b16)]["status"] == "wrong shape"
    assert "pMF-T/4" in records[str(named_b16)]["detail"] and "not pMF-B/16" in records[str(named_b16)]["detail"]
    assert records[str(unnamed)]["status"] == "found"


def test_vgg16_and_inception_are_checked_by_shape(hub, capsys):
    import torchvision

    torch.save(torchvision.models.vgg16().state_dict(), hub / "vgg16-397923af.pth")
    torch.save({"fc.weight": torch.zeros(10, 2048)}, hub / "weights-inception-2015-12-05-6726825d.pth")
    _, records = run(capsys)
    status = {path.split("/")[-1]: record["status"] for path, record in records.items()}
    assert status["vgg16-397923af.pth"] == "found"
    assert status["weights-inception-2015-12-05-6726825d.pth"] == "wrong shape"


def test_reference_statistics_keys_and_shapes(tmp_path, hub, capsys):
    good, tpu, small = tmp_path / "good.npz", tmp_path / "tpu.npz", tmp_path / "small.npz"
    np.savez(good, mu=np.zeros(2048, np.float32), sigma=np.zeros((2048, 2048), np.float32))
    np.savez(tpu, ref_mu=np.zeros(2048), ref_sigma=np.zeros((2048, 2048)))
    np.savez(small, mu=np.zeros(64), sigma=np.zeros((64, 64)))
    _, records = run(capsys, "--ref", str(good), str(tpu), str(small))
    assert records[str(good)]["status"] == "found"
    assert records[str(tpu)]["status"] == "wrong shape" and "ref_mu" in records[str(tpu)]["detail"]
    assert records[str(small)]["status"] == "wrong shape"


def test_a_garbage_file_is_one_line_not_a_traceback(hub, tmp_path, capsys):
    garbage = tmp_path / "pMF-L-16.pt"
    garbage.write_bytes(b"not a torch file")
    code, records = run(capsys, "--official", str(garbage))
    assert code == 1 and records[str(garbage)]["status"] == "unreadable"


def test_unusable_files_are_one_line_each(hub, tmp_path, capsys):
    from test_full_checkpoint import PlantedPayload

    planted, folder, containers = tmp_path / "pMF-B-16.pt", tmp_path / "pMF-L-16.pt", tmp_path / "pMF-H-16.pt"
    torch.save({"net.pos_embed": PlantedPayload(tmp_path / "payload-ran")}, planted)
    folder.mkdir()
    torch.save({"net.pos_embed": {"nested": torch.zeros(1)}}, containers)
    nan, npy = tmp_path / "nan.npz", tmp_path / "single.npy"
    np.savez(nan, mu=np.full(2048, np.nan), sigma=np.eye(2048))
    np.save(npy, np.zeros(2048))
    code, records = run(capsys, "--official", str(planted), str(folder), str(containers), "--ref", str(nan), str(npy))
    expected = {planted: "holds code and was refused", folder: "is a folder, expected a file",
                containers: "not a state dict {name: tensor}", nan: "holds NaN or inf", npy: "a single array (.npy)"}
    for path, detail in expected.items():
        record = records[str(path)]
        assert record["status"] == "unreadable" and detail in record["detail"] and "\n" not in record["detail"], record
    assert code == 1 and not (tmp_path / "payload-ran").exists()
