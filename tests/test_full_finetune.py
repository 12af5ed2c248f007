"""Fine-tuning from the authors' released files (full.finetune): the v-head rule, the resized label table,
bad files, and a few training steps -- checked against the transcription of their network
(tests/official_reference.py) on files written in their layout."""
from __future__ import annotations

import pytest
import torch

from full.finetune import (V_HEAD_RULE, InitFromOfficialError, init_from_official, official_num_classes,
                           resize_label_table)
from full.model import build_model, make_cond
from full.official import to_official_state_dict

from official_reference import pmfdit

pytestmark = pytest.mark.usefixtures("one_thread")

FILE_CLASSES = 12
PRESET = "pMF-T/4"
HEADS = 4                       # pMF-T/4: width 64, 4 heads, patch 4, 32 px


def _released_file(tmp_path, *, v_head=False, seed=0, name="pMF-T-4.pt", num_classes=FILE_CLASSES):
    """A file in the authors' layout ("net.*" keys, rope_freqs) with every weight random and non-zero, and
    their layout as a plain dict (no "net."), float64."""
    torch.manual_seed(seed)
    source = build_model(PRESET, v_head=v_head, num_classes=num_classes).double()
    source.reset_rope_()
    with torch.no_grad():
        for param_name, param in source.named_parameters():
            param.copy_(0.3 * torch.randn_like(param) + (1.0 if param_name.endswith("norm.weight") else 0.0))
    state = to_official_state_dict(source)
    path = tmp_path / name
    torch.save(state, path)
    return path, {key[len("net."):]: value for key, value in state.items()}


def _training_model(num_classes, seed=1, **overrides):
    torch.manual_seed(seed)
    model = build_model(PRESET, num_classes=num_classes, **overrides).double()
    model.reset_rope_()
    return model


def _inputs(batch=3, seed=2):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, 3, 32, 32, generator=generator, dtype=torch.float64)
    t = torch.rand(batch, generator=generator, dtype=torch.float64) * 0.9 + 0.1
    r = t * torch.rand(batch, generator=generator, dtype=torch.float64)
    omega = 1 + 3 * torch.rand(batch, generator=generator, dtype=torch.float64)
    return z, r, t, omega


def _their_x_hat(state, z, r, t, omega, y):
    """Their network's u-head output (the denoised image) at h = t - r, from u = (z - x_hat) / max(t, 0.05)."""
    u, _ = pmfdit(state, z, t, t - r, omega, torch.full_like(t, 0.1), torch.full_like(t, 0.7), y, heads=HEADS, patch=4)
    return z - u * t.clamp(min=0.05).reshape(-1, 1, 1, 1)


def _ours(model, z, r, t, omega, y):
    cond = make_cond(y, omega, 0.1, 0.7)
    return model.forward_u(z, r, t, cond), model.forward_v(z, t, cond)


def _assert_same(ours, theirs):
    """Relative error of the whole batch in float64 (elementwise, near-zero pixels would dominate)."""
    assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-10


def _check_heads(model, state, labels_ours, labels_theirs):
    z, r, t, omega = _inputs(batch=len(labels_ours))
    x_u, x_v = _ours(model, z, r, t, omega, torch.tensor(labels_ours))
    theirs_u = _their_x_hat(state, z, r, t, omega, torch.tensor(labels_theirs))
    theirs_u_at_h0 = _their_x_hat(state, z, t, t, omega, torch.tensor(labels_theirs))
    _assert_same(x_u, theirs_u)
    return x_v, theirs_u_at_h0


def test_heads_of_the_transcription(tmp_path):
    """Sanity of the oracle: the transcription is called with the preset's head count and patch."""
    model = build_model(PRESET)
    assert model.trunk[0].attn.heads == HEADS and model.patch == 4 and model.resolution == 32


def test_copy_u_rule_starts_the_v_head_at_the_released_u_head(tmp_path):
    path, state = _released_file(tmp_path)
    model = _training_model(FILE_CLASSES)
    info = init_from_official(model, path, num_classes=FILE_CLASSES)
    assert V_HEAD_RULE == "copy-u" and info["v_head"] == "copy-u" and info["file_classes"] == FILE_CLASSES
    labels = [0, 5, FILE_CLASSES]                      # two classes and the null label
    x_v, theirs_u_at_h0 = _check_heads(model, state, labels, labels)
    # u(z, t, t) = v(z, t): the copied v-head predicts what the released u-head predicts at h = 0.
    _assert_same(x_v, theirs_u_at_h0)


def test_fresh_rule_keeps_the_models_own_v_head(tmp_path):
    path, state = _released_file(tmp_path)
    model = _training_model(FILE_CLASSES)
    before = {name: value.clone() for name, value in model.state_dict().items() if name.startswith("v_head.")}
    info = init_from_official(model, path, num_classes=FILE_CLASSES, v_head_rule="fresh")
    assert info["v_head"] == "fresh"
    for name, value in before.items():
        assert torch.equal(model.state_dict()[name], value), name
    _check_heads(model, state, [1, 2], [1, 2])


def test_a_file_with_a_v_head_loads_it(tmp_path):
    path, state = _released_file(tmp_path, v_head=True)
    model = _training_model(FILE_CLASSES)
    assert init_from_official(model, path, num_classes=FILE_CLASSES)["v_head"] == "file"
    z, r, t, omega = _inputs()
    y = torch.tensor([3, 4, 5])
    _, x_v = _ours(model, z, r, t, omega, y)
    _, v_theirs = pmfdit(state, z, t, torch.zeros_like(t), omega, torch.full_like(t, 0.1), torch.full_like(t, 0.7),
                         y, heads=HEADS, patch=4)
    _assert_same(x_v, z - v_theirs * t.clamp(min=0.05).reshape(-1, 1, 1, 1))


@pytest.mark.parametrize("class_rows", [None, [7, 0, 11]])
def test_fewer_classes_take_the_chosen_rows_and_keep_the_null_row(tmp_path, class_rows):
    path, state = _released_file(tmp_path)
    model = _training_model(3)
    info = init_from_official(model, path, num_classes=3, class_rows=class_rows)
    rows = class_rows or [0, 1, 2]
    assert info["class_rows"] == rows
    # Our classes 0..2 and null label 3 are their classes ``rows`` and their null label FILE_CLASSES.
    _check_heads(model, state, [0, 1, 2, 3], [*rows, FILE_CLASSES])


def test_resize_label_table_by_hand():
    table = torch.arange(5.0)[:, None].repeat(1, 2)           # 4 classes + null row 4
    assert resize_label_table(table, 2)[:, 0].tolist() == [0, 1, 4]
    assert resize_label_table(table, 3, [3, 1, 0])[:, 0].tolist() == [3, 1, 0, 4]
    with pytest.raises(ValueError, match="distinct"):
        resize_label_table(table, 2, [1, 1])
    with pytest.raises(ValueError, match="one per class"):
        resize_label_table(table, 2, [1])
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        resize_label_table(table, 1, [4])                     # the null row is not a class


def test_official_num_classes(tmp_path):
    assert official_num_classes(_released_file(tmp_path)[0]) == FILE_CLASSES


def _one_line(error):
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.mark.parametrize("content, match", [
    (b"", "not a readable"), (b"garbage", "not a readable"), ("absent", "no such file"),
    ({"model": {"a": 1}}, "state dict"), ({"net.other": torch.zeros(2)}, "label table"),
])
def test_bad_files_give_one_line(tmp_path, content, match):
    path = tmp_path / "bad.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, dict):
        torch.save(content, path)
    with pytest.raises(InitFromOfficialError) as error:
        init_from_official(_training_model(FILE_CLASSES), path, num_classes=FILE_CLASSES)
    assert match in _one_line(error) and "bad.pt" in str(error.value)


def test_a_pickled_payload_is_refused(tmp_path):
    path = tmp_path / "payload.pt"
    torch.save({"net.class_tokens": torch.zeros(1), "code": print}, path)   # pickles a global
    with pytest.raises(InitFromOfficialError) as error:
        init_from_official(_training_model(FILE_CLASSES), path, num_classes=FILE_CLASSES)
    assert "payload.pt" in _one_line(error)


def test_a_file_of_another_network_names_the_key(tmp_path):
    path, _ = _released_file(tmp_path)
    model = _training_model(FILE_CLASSES, resolution=64)        # pos_embed and RoPE of 16 x 16 patches
    with pytest.raises(InitFromOfficialError) as error:
        init_from_official(model, path, num_classes=FILE_CLASSES)
    assert "pos_embed" in _one_line(error)


def test_more_classes_than_the_file_is_refused(tmp_path):
    path, _ = _released_file(tmp_path)
    with pytest.raises(InitFromOfficialError) as error:
        init_from_official(_training_model(FILE_CLASSES + 1), path, num_classes=FILE_CLASSES + 1)
    assert f"holds {FILE_CLASSES} classes" in _one_line(error)


def test_arguments_that_do_not_fit_the_model(tmp_path):
    path, _ = _released_file(tmp_path)
    with pytest.raises(ValueError, match="built with 3 classes"):
        init_from_official(_training_model(3), path, num_classes=4)
    with pytest.raises(ValueError, match="v_head_rule"):
        init_from_official(_training_model(3), path, num_classes=3, v_head_rule="zeros")
    with pytest.raises(ValueError, match="predict x"):
        init_from_official(_training_model(3, prediction="u"), path, num_classes=3)


def test_a_few_training_steps_from_a_released_file(tmp_path):
    """A tiny fine-tuning run: 3 classes from a 12-class file, the trainer's objective and optimiser."""
    from full.optim import build_optimizer
    from full.step import TrainingStep

    path, _ = _released_file(tmp_path)
    torch.manual_seed(0)
    model = build_model(PRESET, num_classes=3)
    init_from_official(model, path, num_classes=3, class_rows=[4, 5, 6])
    start = {name: value.clone() for name, value in model.state_dict().items()}
    objective = TrainingStep.from_preset(model, PRESET)
    optimizer = build_optimizer(model, kind="muon", lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32, generator=generator) * 2 - 1
    y = torch.tensor([0, 1, 2, 0])
    for _ in range(2):
        randomness = objective.draw_randomness(x, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        terms = objective(x, y, randomness)
        terms["loss"].backward()
        optimizer.step()
        assert torch.isfinite(terms["loss"])
    changed = [name for name, value in model.state_dict().items() if not torch.equal(value, start[name])]
    assert any(name.startswith("v_head.") for name in changed) and any(name.startswith("trunk.") for name in changed)


def test_digits_measurement_plumbing(tmp_path):
    """python -m full.digits.finetune's pieces at a 2-step budget: the release is a file in the authors' layout
    without v-head, and each arm fine-tunes from it (scores from an untrained classifier: plumbing only)."""
    from full.digits import finetune as D
    from full.digits.classifier import DigitsClassifier
    from full.digits.metrics import DigitsEvaluator

    release = D.make_release(tmp_path, 2, progress=False)
    state = torch.load(release, weights_only=True)
    assert not any(key.startswith(("net.v_heads.", "net.v_final_layer.")) for key in state)
    assert official_num_classes(release) == 10
    torch.manual_seed(0)
    evaluator = DigitsEvaluator(DigitsClassifier())
    for source, rule, digits, rows in ((release, "copy-u", tuple(range(10)), None), (release, "fresh", (5, 6), [5, 6]),
                                       (None, "copy-u", (5, 6), None)):
        scores = D.fine_tune(source, digits=digits, rule=rule, class_rows=rows, steps=2, checks=[2], seed=1,
                             evaluator=evaluator, reference=evaluator.reference)
        assert set(scores) == {0, 2} and all(0 <= s["accuracy"] <= 1 and s["fd"] >= -1e-6 for s in scores.values())
