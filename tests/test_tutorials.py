"""The tutorials run end to end in fast mode, write their figures, and print the numbers they promise.

Each tutorial runs as a subprocess (``PMF_TUTORIAL_FAST=1``, output in a temporary folder). The
numbers checked are the ones with an independent oracle inside the tutorial: closed forms (Gaussian
flow, 1/t_eps, omega's mean, the paper's parameter counts), finite differences, a second
formulation of the same quantity (vmap vs batch, Jacobian vs JVP, hand-assembled vs ``pmf_loss``).
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NUMBER_LINE = re.compile(r"^(?P<name>.+?) = (?P<value>[-+0-9.eEinfa]+)$")
TIMEOUT_S = 600  # a hang guard only; fast mode takes seconds


def run_tutorial(filename: str, out: Path) -> dict[str, float]:
    """Run one tutorial in fast mode; return its printed ``name = value`` numbers."""
    env = {**os.environ, "PMF_TUTORIAL_FAST": "1", "PMF_TUTORIAL_OUT": str(out), "MPLBACKEND": "Agg"}
    completed = subprocess.run([sys.executable, str(TUTORIALS / filename)], cwd=TUTORIALS.parent, env=env,
                               capture_output=True, text=True, timeout=TIMEOUT_S)
    assert completed.returncode == 0, f"{filename} failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
    numbers = {}
    for line in completed.stdout.splitlines():
        match = NUMBER_LINE.match(line.strip())
        if match:
            numbers[match["name"]] = float(match["value"])
    return numbers


def assert_files(out: Path, *names: str) -> None:
    for name in names:
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, f"missing or empty output {path}"


def test_tutorial_files_are_percent_scripts_that_never_differentiate_by_hand():
    scripts = sorted(TUTORIALS.glob("[0-9][0-9]_*.py"))
    assert [s.name[:2] for s in scripts] == ["01", "02", "03", "04", "05", "06"]
    for script in scripts:
        text = script.read_text()
        assert text.startswith("# %% [markdown]"), f"{script.name} must open with a markdown cell"
        assert text.count("\n# %%\n") >= 3, f"{script.name} should alternate markdown and code cells"
        # The JVP and forward-mode AD live in pmf_ref; a tutorial that calls them re-implements the core.
        for forbidden in ("torch.func.jvp", "forward_ad", "fwAD"):
            assert forbidden not in text, f"{script.name} uses {forbidden}; call pmf_ref instead"


def test_tutorial01_velocity_matches_finite_difference(tmp_path):
    numbers = run_tutorial("01_flow_matching_and_x_prediction.py", tmp_path)
    assert numbers["velocity finite-difference error"] < 1e-8
    assert numbers["x -> v -> x round-trip error"] < 1e-12
    assert numbers["v from the true x vs e - x (t >= t_eps)"] < 1e-12
    assert_files(tmp_path, "noising_path.png", "multi_step_samples.png")


def test_tutorial02_meanflow_identity_holds_on_the_gaussian_flow(tmp_path):
    numbers = run_tutorial("02_average_velocity_and_the_meanflow_identity.py", tmp_path)
    assert numbers["MeanFlow identity residual |u - (v - (t - r) du/dt)|"] < 1e-10
    assert numbers["compound velocity V vs v"] < 1e-10
    assert numbers["time-average of v vs closed-form u"] < 1e-5
    assert numbers["one-step sample with the true u vs the exact ODE endpoint"] < 1e-10
    assert numbers["one Euler step with v vs the exact ODE endpoint"] > 0.1   # Euler is not exact
    assert abs(numbers["per-coordinate std of one-step samples (data sigma = 0.3)"] - 0.3) < 0.05
    assert numbers["best relative JVP vs finite-difference error, Gaussian u"] < 1e-7
    assert numbers["best relative JVP vs finite-difference error, MLP"] < 1e-7
    assert numbers["vmapped per-example JVP vs batched JVP"] < 1e-12
    assert numbers["Jacobian formulation vs JVP"] < 1e-10
    assert_files(tmp_path, "average_velocity.png", "jvp_vs_finite_differences.png")


def test_tutorial03_hand_assembled_loss_equals_pmf_loss(tmp_path):
    numbers = run_tutorial("03_the_pixel_meanflow_loss.py", tmp_path)
    assert numbers["u error per unit x error at t = 0.01 (clipped to 1/t_eps)"] == pytest.approx(20.0, rel=1e-5)
    assert numbers["u error per unit x error at t = 0.5"] == pytest.approx(2.0, rel=1e-5)
    assert numbers["grad of <w, V> vs grad of <w, u> (stop-gradient)"] < 1e-12
    assert numbers["grad of ||V - v||^2 vs grad of ||u - sg(u_tgt)||^2"] < 1e-10
    assert numbers["adaptive-weight gradient vs 1/(L + c)"] < 1e-12
    assert numbers["hand-assembled loss vs P.pmf_loss"] < 1e-6
    assert numbers["raw loss after the step (same batch)"] < numbers["raw loss before the step"]
    assert numbers["fraction of pairs with r > t (must be 0)"] == 0.0
    assert abs(numbers["fraction of pairs with r = t (target 0.5)"] - 0.5) < 0.1
    sigmoid = 1 / (1 + math.exp(-0.8))
    assert abs(numbers["median of one logit-normal(0.8, 0.8) draw (sigmoid(0.8) = 0.69)"] - sigmoid) < 0.03
    assert_files(tmp_path, "x_to_u_gain.png", "adaptive_weighting.png", "time_samplers.png", "one_step_samples.png")


def test_tutorial04_x_target_is_planar_and_sweep_writes_outputs(tmp_path):
    numbers = run_tutorial("04_x_vs_u_in_high_dimensions.py", tmp_path)
    assert numbers["variance fraction in the top 2 directions, x, D = 512"] > 1 - 1e-6
    # v = e - x spreads over all 512 directions: about (2 + 2) / (512 + 2) in the top two.
    assert numbers["variance fraction in the top 2 directions, v = e - x, D = 512"] < 0.05
    assert numbers["off-manifold distance, x-prediction, D = 2"] < 1e-5      # D = 2: no room to leave the plane
    assert_files(tmp_path, "samples.png", "loss_curves.png", "metrics.json", "table.md")


def test_tutorial05_guidance_scale_distribution_and_gating(tmp_path):
    numbers = run_tutorial("05_guidance_and_one_step_sampling.py", tmp_path)
    # density 1 / (omega ln 8) on [1, 8]: mean 7 / ln 8; 1e5 draws, standard error ~0.006
    assert numbers["mean sampled omega, beta = 1 (theory 7 / ln 8 = 3.366)"] == pytest.approx(7 / math.log(8), abs=0.03)
    assert numbers["guided target at omega = 1 minus v_t"] == 0.0
    assert numbers["effective omega at t = 0.9, interval [0.1, 0.7], omega = 4"] == 1.0
    assert numbers["effective omega at t = 0.5, interval [0.1, 0.7], omega = 4"] == 4.0
    assert_files(tmp_path, "guidance_scale_and_interval.png", "guided_one_step_samples.png", "one_vs_few_steps.png")


def test_tutorial06_preset_counts_match_the_paper(tmp_path):
    numbers = run_tutorial("06_from_toy_to_imagenet.py", tmp_path)
    assert numbers["pMF-B/16 inference parameters (M; paper 118)"] == pytest.approx(118, rel=0.01)
    assert numbers["pMF-B/16 GMACs per forward (paper 33)"] == pytest.approx(33, rel=0.03)
    assert numbers["max |x_hat| of the freshly initialised network (zero-init heads)"] == 0.0
    assert numbers["EMA decay in steady state, batch 1024, half-life 2000 kimg (0.5^(1024/2e6))"] == \
        pytest.approx(0.5 ** (1024 / 2e6), abs=1e-9)
    assert numbers["ViT: relative |JVP - finite difference| of du/dt"] < 1e-4
    assert_files(tmp_path, "training_loss.png", "one_step_digits.png")
