"""full.recipe: the released recipe's randomness per device batch (the loss itself is checked against a
transcription of the authors' code in test_full_official.py)."""
import pytest
import torch

import pmf_ref as P
from full.recipe import GuidanceSampler, draw_step_randomness, no_guidance


def _draw(n, seed=0, sampler=P.sample_time_pair_released, guidance=GuidanceSampler()):
    return draw_step_randomness(n, (3, 8, 8), generator=torch.Generator().manual_seed(seed), noise_scale=2.0,
                                sample_time_pair=sampler, sample_guidance=guidance, device=torch.device("cpu"))


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
    rnd = _draw(8, guidance=no_guidance)
    assert bool((rnd.omega == 1).all()) and not bool(rnd.dropped.any())
