"""The --compile benchmark (full/bench_compile.py): the break-even formula and the row's plumbing.

No real compilation here (minutes on CPU) and no timed assertion: an identity "compiler" that
records what it was given stands in for torch.compile.
"""
from __future__ import annotations

import pytest
import torch

from full import bench_compile as BC
from full.recipe import PMFObjective

pytestmark = pytest.mark.usefixtures("one_thread")


def test_break_even_steps_closed_form():
    assert BC.break_even_steps(100.0, 0.3, 0.1) == pytest.approx(500.0)
    assert BC.break_even_steps(0.0, 0.3, 0.1) == 0.0
    assert BC.break_even_steps(100.0, 0.1, 0.1) is None      # no faster: never pays off
    assert BC.break_even_steps(100.0, 0.1, 0.2) is None


def test_compile_row_compiles_the_trainers_objective():
    given = []

    def identity_compiler(module):
        given.append(module)
        return module

    row = BC.compile_row("pMF-T/2", 2, device=torch.device("cpu"), warmup=1, repeats=2, compiler=identity_compiler)
    assert len(given) == 1 and isinstance(given[0], PMFObjective) and given[0].training
    assert row["eager_ms"] > 0 and row["compiled_ms"] > 0
    assert row["speedup"] == pytest.approx(row["eager_ms"] / row["compiled_ms"])
    expected = BC.break_even_steps(row["compile_s"], row["eager_ms"] / 1e3, row["compiled_ms"] / 1e3)
    assert row["break_even_steps"] == (pytest.approx(expected) if expected is not None else None)
    assert BC.markdown_row(row).startswith("| pMF-T/2 | 2 | cpu |")
    assert BC.markdown_row({**row, "break_even_steps": None}).endswith("| never |")
