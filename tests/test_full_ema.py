"""The EDM-style EMAs (full/ema.py) against the closed-form decay and a scalar recursion."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from full.ema import EMASet, ema_decay


@given(batch=st.integers(1, 4096), hl_kimg=st.floats(0.1, 5000), images_seen=st.integers(0, 10 ** 9))
def test_ema_decay_closed_form(batch, hl_kimg, images_seen):
    hl_imgs = min(hl_kimg * 1000, 0.05 * images_seen)
    expected = 0.0 if hl_imgs == 0 else 0.5 ** (batch / hl_imgs)
    assert ema_decay(batch, hl_kimg, images_seen) == pytest.approx(expected, rel=1e-12, abs=0)


def test_ema_decay_half_life_meaning():
    """After hl_kimg*1000 images in steps of `batch` (ramp over), the old weights' share is 1/2."""
    decay = ema_decay(100, 2.0, images_seen=10 ** 9)
    assert decay ** (2000 / 100) == pytest.approx(0.5, rel=1e-12)
    assert ema_decay(100, 2.0, images_seen=0) == 0.0      # first step copies the weights


def test_ema_set_matches_scalar_recursion():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    emas = EMASet(model, (0.001, 0.004))                  # half-lives of 1 and 4 images
    expected = {"0.001": 0.0, "0.004": 0.0}
    images_seen = 1000                                    # past the ramp-up: the half-lives differ
    for value in (1.0, 3.0, -2.0, 5.0, 0.5):
        with torch.no_grad():
            model.weight.fill_(value)
        emas.update(model, batch=2, images_seen=images_seen)
        for key, hl in (("0.001", 0.001), ("0.004", 0.004)):
            decay = ema_decay(2, hl, images_seen)
            expected[key] = decay * expected[key] + (1 - decay) * value
        images_seen += 2
    for key in expected:
        assert emas.models[key].weight.item() == pytest.approx(expected[key], rel=1e-6)
    assert emas.models["0.001"].weight.item() != pytest.approx(emas.models["0.004"].weight.item())
    restored = EMASet(model, (0.001, 0.004))
    restored.load_state_dict(emas.state_dict())
    assert restored.models["0.004"].weight.item() == emas.models["0.004"].weight.item()


