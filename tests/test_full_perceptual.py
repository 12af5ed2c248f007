"""Perceptual terms: paired random resized crops, LPIPS / ConvNeXt distances, local weights, t_thr gating.

Backbones are randomly initialised (no downloads); the LPIPS linear heads ship with the package.
"""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import pmf_ref as P
from full.model import build_model
from full.perceptual import (CONVNEXT_V2_BASE_FILE, CROP_RATIO, CROP_SCALE, VGG16_FILE, PerceptualDistances,
                             build_convnext_v2, build_lpips_vgg, convnext_feature, lpips_heads_file,
                             paired_resized_crop, sample_crop_boxes)
from full.step import StepRandomness, TrainingStep


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def distances() -> PerceptualDistances:
    torch.manual_seed(0)
    return PerceptualDistances(build_lpips_vgg(pretrained_backbone=False),
                               build_convnext_v2(arch="convnextv2_atto", pretrained=False), crop_size=32)


@given(height=st.integers(4, 300), width=st.integers(4, 300), seed=st.integers(0, 2 ** 31))
def test_crop_boxes_in_bounds_with_area_and_aspect_in_range(height, width, seed):
    boxes = sample_crop_boxes(64, height, width, generator=torch.Generator().manual_seed(seed))
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    # Rounding to whole pixels moves area and aspect by at most one pixel per side.
    area = (h * w).double() / (height * width)
    slack_area = (h + w + 1).double() / (height * width)
    assert (area <= CROP_SCALE[1] + slack_area).all()
    fallback = (h == min(height, round(width / CROP_RATIO[0])) if width / height < CROP_RATIO[0] else h == height) \
        & (top == (height - h) // 2)
    regular = ~fallback
    assert (area[regular] >= CROP_SCALE[0] - slack_area[regular]).all()
    aspect = w.double() / h.double()
    assert (aspect[regular] >= CROP_RATIO[0] * (1 - 1 / h[regular]) - 1 / h[regular]).all()
    assert (aspect[regular] <= CROP_RATIO[1] * (1 + 1 / w[regular]) + 1 / h[regular]).all()


def test_crop_boxes_draw_a_fixed_amount_of_randomness():
    generator = torch.Generator().manual_seed(0)
    sample_crop_boxes(5, 4, 400, generator=generator)       # extreme aspect: every row falls back
    after_fallbacks = torch.rand(1, generator=generator)
    generator = torch.Generator().manual_seed(0)
    sample_crop_boxes(5, 64, 64, generator=generator)
    assert torch.equal(after_fallbacks, torch.rand(1, generator=generator))


def test_paired_crop_uses_one_box_for_both_images():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 20, 24, generator=generator)
    boxes = torch.tensor([[0, 0, 20, 24], [2, 3, 10, 12], [5, 1, 9, 7]])
    crop_hat, crop = paired_resized_crop(x + 0.5, x, boxes, size=16)
    torch.testing.assert_close(crop_hat, crop + 0.5)      # a constant shift survives the same crop
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        expected = F.interpolate(x[i:i + 1, :, top:top + h, left:left + w], size=(16, 16), mode="bilinear",
                                 align_corners=False, antialias=True)
        torch.testing.assert_close(crop[i:i + 1], expected)


def test_distances_vanish_iff_images_equal(distances):
    generator = torch.Generator().manual_seed(2)
    x = torch.rand(3, 3, 16, 16, generator=generator) * 2 - 1
    boxes = sample_crop_boxes(3, 16, 16, generator=generator)
    same = distances(x, x, boxes)
    assert set(same) == {"lpips", "convnext"} and all(torch.all(value.abs() < 1e-6) for value in same.values())
    x_hat = (x + 0.3 * torch.randn(x.shape, generator=generator)).requires_grad_()
    different = distances(x_hat, x, boxes)
    assert all(torch.all(value > 0) for value in different.values())
    different["convnext"].sum().backward()
    assert x_hat.grad.abs().sum() > 0                     # gradients reach x_hat through the frozen net
    assert all(not parameter.requires_grad for parameter in distances.parameters())
    distances.train()
    assert not distances.training and not distances.lpips_net.training   # dropout of LPIPS heads stays off


def test_missing_pretrained_weights_name_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=VGG16_FILE) as raised:
        build_lpips_vgg()
    assert str(tmp_path / "hub" / "checkpoints") in str(raised.value)
    with pytest.raises(FileNotFoundError, match=CONVNEXT_V2_BASE_FILE):
        build_convnext_v2()
    with pytest.raises(FileNotFoundError, match="my_convnext.pt.*--convnext-weights"):
        build_convnext_v2(weights=tmp_path / "my_convnext.pt")


def test_convnext_loads_local_file_in_official_and_timm_formats(tmp_path):
    torch.manual_seed(3)
    source = build_convnext_v2(arch="convnextv2_atto", pretrained=False)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    reference = convnext_feature(source.eval(), images)
    torch.save(source.state_dict(), tmp_path / "timm.pt")
    # The official release's key names (facebookresearch/ConvNeXt-V2), wrapped in {"model": ...}.
    official = {}
    for key, value in source.state_dict().items():
        key = key.replace("stem.", "downsample_layers.0.").replace("conv_dw", "dwconv").replace("mlp.fc", "pwconv")
        key = key.replace("mlp.grn.weight", "grn.gamma").replace("mlp.grn.bias", "grn.beta")
        for stage in range(1, 4):
            key = key.replace(f"stages.{stage}.downsample.", f"downsample_layers.{stage}.")
        key = key.replace(".blocks.", ".").replace("head.norm.", "norm.")
        if "grn" in key:
            value = value.reshape(1, 1, 1, -1)
        official[key] = value
    torch.save({"model": official}, tmp_path / "official.pt")
    for name in ("timm.pt", "official.pt"):
        loaded = build_convnext_v2(arch="convnextv2_atto", weights=tmp_path / name).eval()
        torch.testing.assert_close(convnext_feature(loaded, images), reference)


def test_objective_adds_weighted_terms_only_below_t_thr(distances):
    torch.manual_seed(4)
    model = build_model("pMF-T/2", num_classes=10)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    objective = TrainingStep.from_preset(model, "pMF-T/4", perceptual=distances, t_thr=0.6)
    n = 4
    x = torch.rand(n, 3, 16, 16) * 2 - 1
    t = torch.tensor([0.3, 0.59, 0.6, 0.9])
    boxes = sample_crop_boxes(n, 16, 16, generator=torch.Generator().manual_seed(5))
    randomness = StepRandomness(torch.randn(n, 3, 16, 16), 0.5 * t, t, torch.full((n,), 2.0), torch.zeros(n),
                                torch.ones(n), torch.zeros(n, dtype=torch.bool), boxes)
    terms = objective(x, torch.arange(n), randomness)
    below = t < 0.6
    assert torch.all(terms["lpips"][~below] == 0) and torch.all(terms["convnext"][~below] == 0)
    # Oracle: the same distances on z_t - t u (the u-head's denoised image) of those rows, weighted.
    z_t = P.interpolate(x, randomness.e, t)
    x_hat_u = model.forward_u(z_t, randomness.r, t, _cond(randomness, n, False))
    x_pred = z_t - t[:, None, None, None] * P.average_velocity_from_x(z_t, x_hat_u, t)
    raw = distances(x_pred[below], x[below], boxes[below])
    torch.testing.assert_close(terms["lpips"][below], 0.4 * P.adaptively_weighted(raw["lpips"]))
    torch.testing.assert_close(terms["convnext"][below], 0.1 * P.adaptively_weighted(raw["convnext"]))
    torch.testing.assert_close(terms["total"], terms["loss_u"] + terms["loss_v"] + terms["lpips"] + terms["convnext"])
    assert math.isclose(terms["loss"].item(), terms["total"].mean().item(), rel_tol=1e-6)


def _cond(randomness: StepRandomness, n: int, unconditional: bool):
    from full.model import make_cond

    if unconditional:
        return make_cond(torch.full((n,), 10), torch.ones(n), randomness.t_min, randomness.t_max)
    return make_cond(torch.arange(n), randomness.omega, randomness.t_min, randomness.t_max)


# ----------------------------------------------------------------------------- pretrained files read safely

@pytest.fixture(scope="module")
def vgg16_features():
    """torchvision's VGG16 ``features`` with random weights, and its state dict in torchvision's key names."""
    import torchvision

    torch.manual_seed(4)
    features = torchvision.models.vgg16().features.eval()
    return features, {f"features.{key}": value for key, value in features.state_dict().items()}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    return folder


def test_lpips_backbone_equals_torchvision_vgg16_of_the_hub_file(vgg16_features, hub):
    features, state = vgg16_features
    torch.save(state, hub / VGG16_FILE)
    network = build_lpips_vgg()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    # Oracle: torchvision's own layer order; LPIPS taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
    expected = [features[:end](x) for end in (4, 9, 16, 23, 30)]
    with torch.no_grad():
        for found, wanted in zip(network.net(x), expected, strict=True):
            torch.testing.assert_close(found, wanted, rtol=0, atol=0)
    heads = torch.load(lpips_heads_file(), map_location="cpu", weights_only=True)
    assert all(torch.equal(network.state_dict()[key], value) for key, value in heads.items())
    assert not network.training


@pytest.mark.parametrize("content, message", [
    (b"<html>404</html>" * 20, "is not a torch file"),
    (b"", "is empty"),
    ("foreign", "is not torchvision's VGG16 (it lacks 'features.0.weight')"),
    ("shape", "'features.0.weight' has shape (64, 3, 3), expected (64, 3, 3, 3)"),
    ("nan", "holds NaN or inf"),
])
def test_unusable_vgg16_file_is_one_line_naming_it(vgg16_features, hub, content, message):
    path = hub / VGG16_FILE
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        state = dict(vgg16_features[1])
        if content == "foreign":
            state = {"weight": torch.zeros(3)}
        elif content == "shape":
            state["features.0.weight"] = torch.zeros(64, 3, 3)
        else:
            state["features.2.bias"] = torch.full((64,), float("nan"))
        torch.save(state, path)
    with pytest.raises(FileNotFoundError, match=re.escape(message)) as raised:
        build_lpips_vgg()
    assert str(path) in str(raised.value) and "\n" not in str(raised.value)


def test_vgg16_file_with_a_payload_is_refused_and_never_run(hub, tmp_path):
    from test_full_checkpoint import PlantedPayload

    marker = tmp_path / "payload-ran"
    torch.save({"features.0.weight": torch.zeros(1), "note": PlantedPayload(marker)}, hub / VGG16_FILE)
    with pytest.raises(FileNotFoundError, match="holds code and was refused"):
        build_lpips_vgg()
    with pytest.raises(FileNotFoundError, match="holds code and was refused"):
        build_convnext_v2(arch="convnextv2_atto", weights=hub / VGG16_FILE)
    assert not marker.exists()


def test_garbage_convnext_files_are_one_line(hub, tmp_path):
    (tmp_path / "g.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "foreign.pt")
    for name, message in (("g.safetensors", "not a readable safetensors file"), ("foreign.pt", "does not fit")):
        with pytest.raises(FileNotFoundError, match=message) as raised:
            build_convnext_v2(arch="convnextv2_atto", weights=tmp_path / name)
        assert name in str(raised.value) and "\n" not in str(raised.value)


def test_train_with_a_garbage_vgg16_file_exits_2_naming_it(hub, tmp_path, capsys):
    from full.train import main

    (hub / VGG16_FILE).write_bytes(b"garbage" * 100)
    with pytest.raises(SystemExit) as raised:
        main(["--preset", "pMF-T/2", "--num-classes", "10", "--data", "synthetic", "--steps", "1", "--batch-size", "2",
              "--perceptual", "lpips", "--device", "cpu", "--num-workers", "0", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert raised.value.code == 2 and len(err) == 1 and VGG16_FILE in err[0] and "Traceback" not in err[0]
