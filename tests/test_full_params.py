"""Parameter and GMAC counts (full/params.py): closed forms against numel and the flop counter, the paper's
Table 8, the authors' exact released counts; ``python -m full.params --json``."""
from __future__ import annotations

import json

import pytest

from full.model import build_model
from full.params import PAPER, analytic_gmacs, analytic_params, main, measured_gmacs, meta_model

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
