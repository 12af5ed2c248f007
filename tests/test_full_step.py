"""full.step: the training step built from a preset, and the released recipe's randomness per device batch
(the loss itself is checked against a transcription of the authors' code in test_full_official.py)."""
import inspect

import pytest
import torch

from full.model import build_model
from full.presets import RECIPES
from full.step import TIME_SAMPLERS, GuidanceSampler, TrainingStep, no_guidance


def _step(preset="pMF-T/4", **overrides):
    with torch.device("meta"):   # drawing needs no weights
        model = build_model(preset, num_classes=10)
    return TrainingStep.from_preset(model, preset, **overrides)


def _draw(n, seed=0, **overrides):
    step = _step(noise_scale=2.0, **overrides)
    return step.draw_randomness(torch.zeros(n, 3, 8, 8), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("slices", [1, 2, 4, 8])
def test_every_device_slice_has_an_exact_half_of_r_equal_t_rows(slices):
    n = 16
    for seed in range(20):
        rnd = _draw(n, seed)
        on_diagonal = (rnd.r == rnd.t).reshape(slices, n // slices)
        assert bool((on_diagonal.sum(dim=1) == n // slices // 2).all())
        assert not bool((rnd.dropped & (rnd.r < rnd.t)).any())        # only r = t rows lose their label
        assert bool((rnd.t_min[rnd.r == rnd.t] == 0).all()) and bool((rnd.t_max[rnd.r == rnd.t] == 1).all())


def test_noise_has_the_noise_scale():
    rnd = _draw(64)
    assert abs(rnd.e.std().item() - 2.0) < 0.05


def test_no_guidance_draws_unit_omega_and_no_drops():
    rnd = _draw(8, guidance=False)
    assert bool((rnd.omega == 1).all()) and not bool(rnd.dropped.any())


def test_draw_randomness_draws_the_global_batch_when_asked():
    step = _step()
    rnd = step.draw_randomness(torch.zeros(2, 3, 8, 8), generator=torch.Generator().manual_seed(0), batch_size=6)
    assert rnd.e.shape == (6, 3, 8, 8) and all(field.shape[0] == 6 for field in rnd)


@pytest.mark.parametrize("preset", ["pMF-B/16", "pMF-L/16", "pMF-H/16", "pMF-L/32"])
def test_from_preset_binds_the_presets_recipe_numbers(preset):
    recipe = RECIPES[preset]
    step = _step(preset)
    assert step.t_thr == recipe.t_thr
    assert step.sample_guidance == GuidanceSampler(beta=recipe.omega_beta, label_drop_prob=0.1)
    assert step.sample_time_pair.func is TIME_SAMPLERS["full"]
    assert step.sample_time_pair.keywords == {"mean": recipe.P_mean, "std": recipe.P_std,
                                             "uniform_fraction": recipe.uniform_fraction}
    assert step.noise_scale == recipe.noise_scale
    assert (step.c, step.p, step.weights) == (0.01, 1.0, {"lpips": 0.4, "convnext": 0.1})


def test_from_preset_overrides_and_ablations():
    step = _step("pMF-B/16", t_thr=0.5, omega_beta=3.0, time_sampler="diagonal", label_drop_prob=0.2)
    assert step.t_thr == 0.5 and step.sample_guidance == GuidanceSampler(beta=3.0, label_drop_prob=0.2)
    assert step.sample_time_pair.func is TIME_SAMPLERS["diagonal"]
    assert _step(guidance=False).sample_guidance is no_guidance
    with pytest.raises(ValueError, match="unknown recipe override"):
        _step(t_threshold=0.5)
    with pytest.raises(ValueError, match="time_sampler"):
        _step(time_sampler="uniform")
    with pytest.raises(ValueError, match=r"t_thr must lie in \[0, 1\].*nan"):
        _step(t_thr=float("nan"))


def test_constructor_has_no_recipe_defaults():
    """Nothing builds a step with default recipe numbers: every constructor argument must be given."""
    parameters = list(inspect.signature(TrainingStep.__init__).parameters.values())[2:]
    assert parameters and all(p.default is inspect.Parameter.empty for p in parameters)
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters)
