"""The authors' checkpoint layout (full.official) and the released loss (full.step) against an
independent transcription of their code (tests/official_reference.py), in float64."""
from __future__ import annotations

import pytest
import torch

import pmf_ref as P
from full.model import build_model, PRESETS
from full.official import (OfficialCheckpointError, load_official_checkpoint, load_official_state_dict,
                           official_name, to_official_state_dict)
from full.params import RELEASED_PARAMS
from full.step import StepRandomness, TrainingStep

from official_reference import pixel_mean_flow_loss, pmfdit, precompute_rope_freqs_2d

NUM_CLASSES = 10


def _random_model(preset="pMF-T/4", v_head=True, seed=0, num_classes=NUM_CLASSES):
    """A model with every parameter random and non-zero (gates and final layers included)."""
    torch.manual_seed(seed)
    model = build_model(preset, v_head=v_head, num_classes=num_classes).double()
    model.reset_rope_()                   # float64 angles, not float32 ones cast up
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(0.3 * torch.randn_like(param) + (1.0 if name.endswith("norm.weight") else 0.0))
    return model


def _their_state(model):
    return {key[len("net."):]: value for key, value in to_official_state_dict(model).items()}


def _net(state, model):
    def net(x, t, h, w, t_min, t_max, y):
        return pmfdit(state, x, t, h, w, t_min, t_max, y, heads=model.trunk[0].attn.heads, patch=model.patch)
    return net


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------- the network

def test_released_parameter_counts_are_exact():
    for preset, (inference, with_v_head) in RELEASED_PARAMS.items():
        with torch.device("meta"):
            model = build_model(preset)
        assert model.param_count(with_v_head=False) == inference, preset
        assert model.param_count(with_v_head=True) == with_v_head, preset


def test_every_parameter_has_a_unique_official_name():
    with torch.device("meta"):
        model = build_model("pMF-H/16")
    names = [official_name(name) for name in model.state_dict()]
    assert len(set(names)) == len(names)


@pytest.mark.parametrize("v_head", [True, False])
def test_network_equals_transcription_of_their_forward(v_head):
    model = _random_model(v_head=v_head)
    state = _their_state(model)
    gen = torch.Generator().manual_seed(1)
    b = 3
    z = torch.randn(b, 3, 32, 32, generator=gen, dtype=torch.float64)
    t = torch.tensor([0.9, 0.3, 0.02], dtype=torch.float64)
    r = torch.tensor([0.1, 0.3, 0.0], dtype=torch.float64)
    omega = torch.tensor([1.0, 3.0, 7.5], dtype=torch.float64)
    t_min = torch.tensor([0.1, 0.0, 0.4], dtype=torch.float64)
    t_max = torch.tensor([0.7, 1.0, 0.6], dtype=torch.float64)
    y = torch.tensor([3, NUM_CLASSES, 0])
    u_ref, v_ref = _net(state, model)(z, t, t - r, omega, t_min, t_max, y)
    from full.model import make_cond
    cond = make_cond(y, omega, t_min, t_max)
    if v_head:
        x_u, x_v = model.forward_uv(z, r, t, cond)
        assert _rel(P.average_velocity_from_x(z, x_v, t), v_ref) < 1e-10
    else:
        x_u = model.forward_u(z, r, t, cond)
    assert _rel(P.average_velocity_from_x(z, x_u, t), u_ref) < 1e-10


def test_rope_buffer_equals_their_precomputed_frequencies():
    model = _random_model()
    theirs = precompute_rope_freqs_2d(model.head_dim, model.grid ** 2)
    torch.testing.assert_close(to_official_state_dict(model)["net.rope_freqs"], theirs.to(torch.complex64))


# ----------------------------------------------------------------------------- the loader

def _save(state, path):
    torch.save(state, path)
    return str(path)


@pytest.mark.parametrize("prefix", ["net.", ""])
def test_loader_round_trips_their_layout_without_v_head(tmp_path, prefix):
    model = _random_model(v_head=False, num_classes=1000).float()
    state = {prefix + key[len("net."):]: value for key, value in to_official_state_dict(model).items()}
    path = _save(state, tmp_path / "pMF-T-4.pt")
    loaded = load_official_checkpoint(path, "pMF-T/4")
    assert loaded.v_head is None and not loaded.training
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


def test_loader_keeps_a_v_head_when_the_file_has_one(tmp_path):
    model = _random_model(v_head=True, num_classes=1000).float()
    loaded = load_official_checkpoint(_save(to_official_state_dict(model), tmp_path / "full.pt"), "pMF-T/4")
    assert loaded.v_head is not None
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update({"net.extra.weight": torch.zeros(1)}), "'net.extra.weight' is not a parameter"),
    (lambda s: s.pop("net.u_heads.1.mlp.w3._flax_linear.weight"), "missing key 'net.u_heads.1.mlp.w3"),
    (lambda s: s.update({"net.rope_freqs": s["net.rope_freqs"] * 1j}), "rope_freqs"),
    (lambda s: s.update({"shared_blocks.0.attn_scale": torch.zeros(64)}), "lacks the 'net.' prefix"),
])
def test_loader_names_the_offending_key(tmp_path, edit, message):
    state = to_official_state_dict(_random_model(v_head=False, num_classes=1000).float())
    edit(state)
    with pytest.raises(OfficialCheckpointError, match=message.replace("(", r"\(")):
        load_official_checkpoint(_save(state, tmp_path / "bad.pt"), "pMF-T/4")


def test_loader_says_which_preset_the_shapes_fit(tmp_path):
    with torch.device("meta"):
        meta = build_model("pMF-T/2", v_head=False)
    state = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in to_official_state_dict(meta).items()}
    with pytest.raises(OfficialCheckpointError, match=r"fit pMF-T/2"):
        load_official_checkpoint(_save(state, tmp_path / "t2.pt"), "pMF-T/4")


@pytest.mark.parametrize("content", [b"", b"garbage", None])
def test_loader_rejects_unreadable_files(tmp_path, content):
    path = tmp_path / "x.pt"
    if content is None:
        torch.save({"model": {"a": 1}}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(OfficialCheckpointError, match="x.pt"):
        load_official_checkpoint(str(path), "pMF-T/4")
    with pytest.raises(OfficialCheckpointError, match="no such file"):
        load_official_checkpoint(str(tmp_path / "absent.pt"), "pMF-T/4")


def test_loader_refuses_a_payload_without_running_it(tmp_path):
    from test_full_checkpoint import PlantedPayload

    path = tmp_path / "pMF-T-4.pt"
    torch.save({"net.pos_embed": PlantedPayload(tmp_path / "payload-ran")}, path)
    with pytest.raises(OfficialCheckpointError, match=r"^'.*pMF-T-4.pt' holds code and was refused") as refused:
        load_official_checkpoint(str(path), "pMF-T/4")
    assert "not a readable" not in str(refused.value) and not (tmp_path / "payload-ran").exists()


def test_every_preset_has_its_layout_loadable_on_meta():
    for preset in PRESETS:
        with torch.device("meta"):
            model = build_model(preset, v_head=False)
            state = to_official_state_dict(model)
            state.pop("net.rope_freqs")           # meta tensors hold no values to compare
            load_official_state_dict(build_model(preset, v_head=False), state)


# ----------------------------------------------------------------------------- the loss

class _Distances(torch.nn.Module):
    """Stand-in for PerceptualDistances: two smooth per-sample distances (crop boxes ignored)."""

    def forward(self, x_hat, x, boxes=None):
        weight = torch.linspace(0.5, 1.5, x.shape[-1], dtype=x.dtype)
        return {"lpips": ((x_hat - x) ** 2 * weight).flatten(1).sum(1),
                "convnext": (torch.tanh(x_hat) - torch.tanh(x)).pow(2).flatten(1).mean(1)}


def _draws(b=8, noise_scale=2.0, seed=3):
    """Rows 0-3 r = t (0, 1 dropped; row 2 at t < t_eps), rows 4-7 r < t: 4, 7 inside their interval,
    5 outside (t > t_max), 6 at t < t_eps."""
    gen = torch.Generator().manual_seed(seed)
    d = torch.float64
    t = torch.tensor([0.7, 0.4, 0.03, 0.9, 0.6, 0.95, 0.04, 0.3], dtype=d)
    r = torch.tensor([0.7, 0.4, 0.03, 0.9, 0.2, 0.5, 0.01, 0.0], dtype=d)
    t_min = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.1, 0.2, 0.0, 0.25], dtype=d)
    t_max = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.7, 0.6, 0.5, 0.9], dtype=d)
    omega = torch.tensor([2.0, 6.0, 3.0, 1.5, 4.0, 7.0, 2.5, 5.0], dtype=d)
    dropped = torch.tensor([True, True] + [False] * 6)
    e = noise_scale * torch.randn(b, 3, 32, 32, generator=gen, dtype=d)
    boxes = torch.zeros(b, 4, dtype=torch.long)
    return StepRandomness(e, r, t, omega, t_min, t_max, dropped, boxes)


@pytest.mark.parametrize("perceptual", [False, True])
def test_objective_equals_transcription_of_their_forward_in_value_and_gradient(perceptual):
    model = _random_model()
    gen = torch.Generator().manual_seed(4)
    x = torch.rand(8, 3, 32, 32, generator=gen, dtype=torch.float64) * 2 - 1
    y = torch.randint(0, NUM_CLASSES, (8,), generator=gen)
    rnd = _draws()
    distances = _Distances() if perceptual else None
    t_thr = 0.65
    objective = TrainingStep.from_preset(model, "pMF-T/4", perceptual=distances, t_thr=t_thr)
    ours = objective(x, y, rnd)
    params = dict(model.named_parameters())
    our_grads = torch.autograd.grad(ours["loss"], list(params.values()))

    state = {k: v.detach().clone().requires_grad_(v.is_floating_point() and not v.is_complex())
             for k, v in _their_state(model).items()}
    aux_fn = (lambda pred_x, x_: tuple(_Distances()(pred_x, x_).values())) if perceptual else None
    draws = dict(t=rnd.t, r=rnd.r, fm_mask=rnd.r == rnd.t, e=rnd.e, t_min=rnd.t_min, t_max=rnd.t_max,
                 omega=rnd.omega, drop_mask=rnd.dropped)
    loss, terms = pixel_mean_flow_loss(_net(state, model), x, y, draws, num_classes=NUM_CLASSES, aux_fn=aux_fn,
                                       perceptual_max_t=t_thr)
    assert abs(ours["loss"].item() - loss.item()) <= 1e-9 * abs(loss.item())
    torch.testing.assert_close(ours["loss_u"], terms["loss_u"], rtol=1e-9, atol=0)
    torch.testing.assert_close(ours["loss_v"], terms["loss_v"], rtol=1e-9, atol=0)
    leaves = {k: v for k, v in state.items() if v.requires_grad}
    their_grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)))
    for (name, _), grad in zip(params.items(), our_grads):
        reference = their_grads[official_name(name)]
        reference = torch.zeros_like(grad) if reference is None else reference
        scale = reference.norm().item()
        assert (grad - reference).norm().item() <= 1e-6 * max(scale, 1e-12), name
