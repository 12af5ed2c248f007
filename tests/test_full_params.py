"""Parameter and GMAC counts (full/params.py): closed forms against numel and the flop counter, the paper's
Table 8, the authors' exact released counts; ``python -m full.params --json``."""
from __future__ import annotations

import json

import pytest

from full.model import build_model
from full.params import PAPER, analytic_gmacs, analytic_params, main, measured_gmacs, meta_model, training_gmacs

TINY = ["pMF-T/4", "pMF-T/2"]


@pytest.mark.parametrize("preset", TINY)
def test_param_count_matches_numel_and_formula(preset):
    model = build_model(preset)
    assert model.param_count() == sum(p.numel() for p in model.parameters()) == analytic_params(preset)
    assert model.param_count(with_v_head=False) == analytic_params(preset, with_v_head=False)
    inference = build_model(preset, v_head=False, channels=1, num_classes=10)
    assert inference.param_count() == analytic_params(preset, with_v_head=False, channels=1, num_classes=10)


@pytest.mark.parametrize("preset", list(PAPER))
def test_param_count_presets_match_paper(preset):
    """Inference parameters within 1% and GMACs within 5% of the paper's Table 8."""
    paper_params, paper_gmacs = PAPER[preset]
    model = meta_model(preset)
    assert model.param_count(with_v_head=False) == analytic_params(preset, with_v_head=False)
    assert abs(model.param_count(with_v_head=False) / paper_params - 1) < 0.01
    assert abs(analytic_gmacs(preset) / paper_gmacs - 1) < 0.05


@pytest.mark.parametrize("preset, device", [("pMF-T/4", "cpu"), ("pMF-T/2", "cpu"), ("pMF-B/16", "meta")])
def test_gmacs_analytic_matches_flop_counter(preset, device):
    model = meta_model(preset) if device == "meta" else build_model(preset)
    assert measured_gmacs(model) == pytest.approx(analytic_gmacs(preset), rel=1e-12)


def test_cli_json_prints_the_released_counts(capsys):
    main(["--json", "--presets", "pMF-B/16"])
    row = json.loads(capsys.readouterr().out)["pMF-B/16"]
    assert (row["params"], row["params_with_v_head"]) == (118_234_240, 175_474_304)   # the authors' network


def test_cli_unknown_preset_is_one_error_line(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--presets", "pMF-X/1"])
    assert stop.value.code == 2 and "--presets" in capsys.readouterr().err


def test_training_gmacs_tiny_by_hand():
    """pMF-T/4 counted by hand: W = 64, SwiGLU hidden 170, L = 20 + 64 tokens, 2 + 2 blocks, a 2-block v-head."""
    block_linear = 84 * (4 * 64 * 64 + 3 * 64 * 170)                 # q, k, v, out + gate, value, out
    block_attention = 2 * 84 * 84 * 64                               # q k^T and P v
    patch_embed = 64 * (3 * 4 * 4 * 16) + 64 * 16 * 64               # 4x4 conv to 16, 1x1 conv to 64
    scalar_embedder = 256 * 64 + 64 * 64
    output = 64 * 64 * 48
    forward = 4 * (block_linear + block_attention) + patch_embed + 4 * scalar_embedder + output
    assert forward == 20_477_952
    primal = forward + 2 * (block_linear + block_attention) + output            # + v-head
    tangent = 4 * (block_linear + 2 * block_attention) + patch_embed + scalar_embedder + output
    backward = 2 * primal - 64 * 3 * 4 * 4 * 16 - 4 * 256 * 64
    counted = training_gmacs("pMF-T/4")
    assert counted["forward"] == pytest.approx(forward / 1e9, rel=1e-12)
    assert counted["total"] == pytest.approx((2 * forward + primal + tangent + backward) / 1e9, rel=1e-12)
    with_v_tangent = training_gmacs("pMF-T/4", tangent_free_v_head=False)
    extra = 2 * (block_linear + 2 * block_attention) + output
    assert with_v_tangent["total"] == pytest.approx(counted["total"] + extra / 1e9, rel=1e-12)


def test_training_gmacs_match_flop_counter_on_a_released_step():
    """The whole estimate against torch's FlopCounterMode on a real released step (pMF-T/4, batch 4): within
    0.1% (the counter also sees a few input-gradient and forward-AD GEMMs of the embedders) of the count with
    or without the v-head's tangent."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import pmf_ref as P
    from full.step import TrainingStep

    generator = torch.Generator().manual_seed(0)
    model = build_model("pMF-T/4", num_classes=10)
    n = 4
    randomness = TrainingStep.from_preset(model, "pMF-T/4", noise_scale=1.0, omega_beta=1.0).draw_randomness(
        torch.zeros(n, 3, 32, 32), generator=generator)
    x = torch.rand(n, 3, 32, 32, generator=generator) * 2 - 1
    y = torch.randint(0, 10, (n,), generator=generator)
    counter = FlopCounterMode(display=False)
    with counter:
        TrainingStep.from_preset(model, "pMF-T/4", noise_scale=1.0, t_thr=0.8, omega_beta=1.0)(x, y, randomness)["loss"].backward()
    measured = counter.get_total_flops() / 2 / n / 1e9
    # full.step's JVP decides whether the v-head carries a tangent; the two counts differ by 7%
    counts = [training_gmacs("pMF-T/4", tangent_free_v_head=flag)["total"] for flag in (True, False)]
    assert any(measured == pytest.approx(count, rel=1e-3) for count in counts)
