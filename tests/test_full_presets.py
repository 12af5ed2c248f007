"""The preset tables (full/presets.py): typed, frozen, one key set, and the paper's numbers."""
from __future__ import annotations

import dataclasses

import pytest

from full import presets as PR
from full.model import build_model


def test_three_tables_share_one_key_set_and_are_frozen():
    assert set(PR.ARCHITECTURES) == set(PR.RECIPES) == set(PR.SAMPLING) == set(PR.PRESETS)
    for table in (PR.ARCHITECTURES, PR.RECIPES, PR.SAMPLING):
        entry = table["pMF-B/16"]
        with pytest.raises(dataclasses.FrozenInstanceError):
            entry.__setattr__(dataclasses.fields(entry)[0].name, 0)


@pytest.mark.parametrize("name, shapes", [   # paper Table 8: depth, width, heads; resolution / patch
    ("pMF-B/16", (16, 768, 12, 256, 16)), ("pMF-L/16", (32, 1024, 16, 256, 16)), ("pMF-H/16", (48, 1280, 16, 256, 16)),
    ("pMF-B/32", (16, 768, 12, 512, 32)), ("pMF-L/32", (32, 1024, 16, 512, 32)), ("pMF-H/32", (48, 1280, 16, 512, 32)),
])
def test_architectures_are_the_papers(name, shapes):
    a = PR.ARCHITECTURES[name]
    assert (a.depth, a.width, a.heads, a.resolution, a.patch) == shapes
    assert (a.channels, a.num_classes) == (3, 1000)


def test_recipe_and_sampling_numbers():
    assert dataclasses.astuple(PR.RECIPES["pMF-B/16"]) == (0.8, 0.8, 0.8, 0.0, 1.0, 1.0)
    assert dataclasses.astuple(PR.RECIPES["pMF-H/16"])[:4] == (0.6, 0.0, 0.8, 0.1)   # pMF-H: 10% uniform rows
    assert [PR.RECIPES[n].noise_scale for n in ("pMF-B/16", "pMF-B/32", "pMF-L/32")] == [1.0, 2.0, 4.0]
    assert dataclasses.astuple(PR.SAMPLING["pMF-B/16"]) == (8.5, 0.1, 0.7, 2000)


def test_build_model_reads_architecture_and_noise_scale():
    model = build_model("pMF-T/2", num_classes=10)
    assert (model.resolution, model.num_classes, model.noise_scale) == (16, 10, PR.RECIPES["pMF-T/2"].noise_scale)
    with pytest.raises(ValueError, match="unknown preset"):
        PR.check_preset("pMF-X/1")
