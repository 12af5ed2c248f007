"""The tutorials run cell by cell in fast mode, write their figures, and print the numbers they promise.

All selected tutorials run in *one* subprocess, cell by cell (split at ``# %%``) in a fresh namespace
each, without ``__file__`` and from a temporary working directory -- the way a Jupyter kernel or VS
Code's interactive window runs them -- one after the other, so global state that one tutorial leaks
(e.g. torch's default dtype) shows up. Fast mode: ``PMF_TUTORIAL_FAST=1``.

The numbers checked are the ones with an independent oracle inside the tutorial: closed forms
(Gaussian flow, 1/t_eps, omega's mean, the paper's parameter counts), finite differences, a second
formulation of the same quantity (vmap vs batch, Jacobian vs JVP, hand-assembled vs ``pmf_loss``).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NUMBER_LINE = re.compile(r"^(?P<name>.+?) = (?P<value>[-+0-9.eEinfa]+)$")
CELL_MARKER = re.compile(r"^# %%.*$", flags=re.MULTILINE)
TIMEOUT_S = 900  # a hang guard only; fast mode takes a few minutes for all tutorials
TEST_NAME = re.compile(r"^test_tutorial(?P<number>\d\d)_")


def split_cells(source: str) -> list[str]:
    """The cells of a percent-format script (markdown cells are comments and execute as nothing)."""
    return [cell for cell in CELL_MARKER.split(source) if cell.strip()]


def run_cell_by_cell(paths: list[str], out_root: str, result_path: str) -> None:
    """Subprocess entry point: run each tutorial's cells in one namespace; write a JSON of the results."""
    import matplotlib
    matplotlib.use("Agg")
    import torch

    results = {}
    for path in map(Path, paths):
        os.environ["PMF_TUTORIAL_OUT"] = str(Path(out_root) / path.name[:2])
        namespace = {"__name__": "__main__"}          # no __file__: a notebook kernel has none
        stdout, error = io.StringIO(), None
        cells = split_cells(path.read_text())
        with contextlib.redirect_stdout(stdout):
            try:
                for index, cell in enumerate(cells):
                    exec(compile(cell, f"{path.name} [cell {index}]", "exec"), namespace)
            except Exception:  # noqa: BLE001 -- reported to the test
                error = traceback.format_exc()
        leaks = []
        if torch.get_default_dtype() != torch.float32:
            leaks.append(f"default dtype left at {torch.get_default_dtype()}")
            torch.set_default_dtype(torch.float32)
        results[path.name[:2]] = {"error": error, "stdout": stdout.getvalue(), "leaks": leaks, "cells": len(cells)}
    Path(result_path).write_text(json.dumps(results))


@pytest.fixture(scope="module")
def tutorial_runs(request, tmp_path_factory) -> dict:
    """Run every tutorial that a selected test of this module needs, once, in one subprocess."""
    numbers = sorted({match["number"] for item in request.session.items
                      if item.module is request.module and (match := TEST_NAME.match(item.name))})
    paths = [str(next(TUTORIALS.glob(f"{number}_*.py"))) for number in numbers]
    root = tmp_path_factory.mktemp("tutorials")
    result_path = root / "results.json"
    env = {**os.environ, "PMF_TUTORIAL_FAST": "1", "MPLBACKEND": "Agg"}
    completed = subprocess.run(
        [sys.executable, __file__, str(root), str(result_path), *paths], cwd=root, env=env,
        capture_output=True, text=True, timeout=TIMEOUT_S)
    assert completed.returncode == 0, f"runner failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
    return {"root": root, **json.loads(result_path.read_text())}


def tutorial_numbers(runs: dict, number: str) -> tuple[dict[str, float], Path]:
    """The printed ``name = value`` numbers of tutorial ``number`` and its output folder; fails on any error."""
    run = runs[number]
    assert run["error"] is None, f"tutorial {number} failed:\n{run['stdout'][-3000:]}\n{run['error']}"
    assert not run["leaks"], f"tutorial {number} leaked global state: {run['leaks']}"
    numbers = {}
    for line in run["stdout"].splitlines():
        match = NUMBER_LINE.match(line.strip())
        if match:
            numbers[match["name"]] = float(match["value"])
    return numbers, runs["root"] / number


def assert_files(out: Path, *names: str) -> None:
    for name in names:
        path = out / name
        assert path.is_file() and path.stat().st_size > 0, f"missing or empty output {path}"


def test_tutorial_files_are_percent_scripts_that_never_differentiate_by_hand():
    scripts = sorted(TUTORIALS.glob("[0-9][0-9]_*.py"))
    numbers = [s.name[:2] for s in scripts]
    assert numbers == [f"{i:02d}" for i in range(1, 10)], numbers     # exactly 01..09, each once
    for script in scripts:
        text = script.read_text()
        assert text.startswith("# %% [markdown]"), f"{script.name} must open with a markdown cell"
        assert text.count("\n# %%\n") >= 3, f"{script.name} should alternate markdown and code cells"
        # The JVP and forward-mode AD live in pmf_ref; a tutorial that calls them re-implements the core.
        for forbidden in ("torch.func.jvp", "forward_ad", "fwAD", "set_default_dtype", "matplotlib.use"):
            assert forbidden not in text, f"{script.name} uses {forbidden}"
        # A notebook cell has no __file__ of its own (a module's, like pmf_ref.__file__, is fine).
        assert not re.search(r"(?<![.\w])__file__", text), f"{script.name} uses its own __file__"


def test_save_figure_shows_inline_in_a_notebook_and_closes_in_a_script(tmp_path, monkeypatch):
    sys.path.insert(0, str(TUTORIALS))
    try:
        import _common
    finally:
        sys.path.remove(str(TUTORIALS))
    import matplotlib.pyplot as plt

    shown = []
    monkeypatch.setattr(plt, "show", lambda *args, **kwargs: shown.append(True))
    for notebook in (True, False):
        monkeypatch.setattr(_common, "in_notebook", lambda notebook=notebook: notebook)
        fig, _ = plt.subplots()
        _common.save_figure(fig, tmp_path / f"figure_{notebook}.png")
        assert (tmp_path / f"figure_{notebook}.png").stat().st_size > 0
        assert plt.fignum_exists(fig.number) == notebook      # a script closes it; a notebook shows it
        plt.close(fig)
    assert shown == [True]


def test_tutorial01_velocity_matches_finite_difference(tutorial_runs):
    numbers, out = tutorial_numbers(tutorial_runs, "01")
    assert numbers["velocity finite-difference error"] < 1e-8
    assert numbers["x -> v -> x round-trip error"] < 1e-12
    assert numbers["v from the true x vs e - x (t >= t_eps)"] < 1e-12
    assert_files(out, "noising_path.png", "why_one_step_fails.png", "multi_step_samples.png")


def test_tutorial02_meanflow_identity_holds_on_the_gaussian_flow(tutorial_runs):
    numbers, out = tutorial_numbers(tutorial_runs, "02")
    assert numbers["MeanFlow identity residual |u - (v - (t - r) du/dt)|"] < 1e-10
    assert numbers["compound velocity V vs v"] < 1e-10
    assert numbers["identity residual with the per-sample tangent e - x (RMS; not 0)"] > 0.1
    assert numbers["time-average of v vs closed-form u"] < 1e-5
    assert numbers["one-step sample with the true u vs the exact ODE endpoint"] < 1e-10
    assert numbers["one Euler step with v vs the exact ODE endpoint"] > 0.1   # Euler is not exact
    assert abs(numbers["per-coordinate std of one-step samples (data sigma = 0.3)"] - 0.3) < 0.05
    assert numbers["best relative JVP vs finite-difference error, Gaussian u"] < 1e-7
    assert numbers["best relative JVP vs finite-difference error, MLP"] < 1e-7
    assert numbers["vmapped per-example JVP vs batched JVP"] < 1e-12
    assert numbers["Jacobian formulation vs JVP"] < 1e-10
    assert_files(out, "average_velocity.png", "jvp_vs_finite_differences.png")


def test_tutorial03_hand_assembled_loss_equals_pmf_loss(tutorial_runs):
    numbers, out = tutorial_numbers(tutorial_runs, "03")
    assert numbers["u error per unit x error at t = 0.01 (clipped to 1/t_eps)"] == pytest.approx(20.0, rel=1e-5)
    assert numbers["u error per unit x error at t = 0.5"] == pytest.approx(2.0, rel=1e-5)
    assert numbers["grad of <w, V> vs grad of <w, u> (stop-gradient)"] < 1e-12
    assert numbers["grad of ||V - v||^2 vs grad of ||u - sg(u_tgt)||^2"] < 1e-10
    # the same Jacobian does not make the squared losses' gradients equal
    assert numbers["grad of ||V - v||^2 vs grad of ||u - v||^2, relative (not 0)"] > 1e-4
    assert numbers["adaptive-weight gradient vs 1/(L + c)"] < 1e-12
    assert numbers["hand-assembled loss vs P.pmf_loss"] < 1e-6
    assert numbers["raw loss after the step (same batch)"] < numbers["raw loss before the step"]
    assert numbers["fraction of pairs with r > t (must be 0)"] == 0.0
    assert abs(numbers["fraction of pairs with r = t (target 0.5)"] - 0.5) < 0.1
    sigmoid = 1 / (1 + math.exp(-0.8))
    assert abs(numbers["median of one logit-normal(0.8, 0.8) draw (sigmoid(0.8) = 0.69)"] - sigmoid) < 0.03
    # the largest 10% of the losses carry at least 10% of the sum, and (weight 1/(L + c)) at most 10% of the weight
    assert numbers["share of the batch's summed loss from its 10% largest-loss rows"] >= 0.1
    assert numbers["share of the batch's summed gradient weight on those rows"] <= 0.1
    assert_files(out, "x_to_u_gain.png", "adaptive_weighting.png", "time_samplers.png", "one_step_samples.png",
                 "adaptive_weight_in_a_batch.png")


def test_tutorial04_x_target_is_planar_and_noise_sets_the_scale(tutorial_runs):
    numbers, out = tutorial_numbers(tutorial_runs, "04")
    assert numbers["variance fraction in the top 2 directions, x, D = 512"] > 1 - 1e-6
    # v = e - x spreads over all 512 directions: about (2 + 2) / (512 + 2) in the top two.
    assert numbers["variance fraction in the top 2 directions, v = e - x, D = 512"] < 0.05
    assert numbers["off-manifold distance, x-prediction, D = 2"] < 1e-5      # D = 2: no room to leave the plane
    # pure noise leaves the plane by |(I - P P^T) e| ~ sqrt(D - 2)
    assert numbers["off-manifold distance, pure noise, D = 16"] == pytest.approx(math.sqrt(14), rel=0.05)
    assert_files(out, "samples.png", "loss_curves.png")


def test_tutorial05_guidance_scale_distribution_and_gating(tutorial_runs):
    numbers, out = tutorial_numbers(tutorial_runs, "05")
    # density 1 / (omega ln 8) on [1, 8]: mean 7 / ln 8; 1e5 draws, standard error ~0.006
    assert numbers["mean sampled omega, beta = 1 (theory 7 / ln 8 = 3.366)"] == pytest.approx(7 / math.log(8), abs=0.03)
    assert numbers["guided target at omega = 1 minus v_t"] == 0.0
    assert numbers["effective omega at t = 0.9, interval [0.1, 0.7], omega = 4"] == 1.0
    assert numbers["effective omega at t = 0.5, interval [0.1, 0.7], omega = 4"] == 4.0
    for omega in (1.5, 2.0, 4.0, 8.0):
        assert math.isfinite(numbers[f"one call vs two-call CFG, omega = {omega}: RMS error / RMS correction"])
    assert_files(out, "guidance_scale_and_interval.png", "guided_one_step_samples.png", "one_call_vs_cfg.png",
                 "interval_at_t_1.png", "one_vs_few_steps.png")


def test_tutorial06_preset_counts_and_the_bottleneck(tutorial_runs):
    numbers, out = tutorial_numbers(tutorial_runs, "06")
    assert numbers["pMF-B/16 inference parameters (M; paper 118)"] == pytest.approx(118, rel=0.01)
    assert numbers["pMF-B/16 GMACs per forward (paper 33)"] == pytest.approx(33, rel=0.03)
    assert numbers["max |x_hat| of the freshly initialised network (zero-init heads)"] == 0.0
    assert numbers["EMA decay in steady state, batch 1024, half-life 2000 kimg (0.5^(1024/2e6))"] == \
        pytest.approx(0.5 ** (1024 / 2e6), abs=1e-9)
    assert numbers["ViT: relative |JVP - finite difference| of du/dt"] < 1e-4
    assert numbers["one ViT block: |written out - full.model.Block| (max)"] < 1e-5
    # the written-out released step and the library's training-step object: same loss, same gradients
    assert numbers["written-out step vs the library's TrainingStep: relative loss difference on the same draws"] < 1e-5
    assert numbers["written-out step vs TrainingStep: max gradient difference / max gradient"] < 1e-4
    assert numbers["released-layout file, loaded vs the network it came from: max |sample difference|"] == 0.0
    # 192 noise-only directions of 256 pixels give t to a few percent (chi-square with 192 dof)
    assert numbers["noise level read off a 16 x 16 digit's pixels: RMS error of t"] < 0.06
    # what the patch embedding cannot see: 1 - 16 / 256 of the noise; a u-network's sample keeps all of it
    assert numbers["64 px, patch 16, bottleneck 16: share of the noise energy the network cannot see"] == \
        pytest.approx(1 - 16 / 256, abs=0.01)
    assert numbers["u-prediction, 64 px, patch 16: share of the unseen noise in its one-step samples"] == \
        pytest.approx(1.0, abs=0.02)
    assert abs(numbers["x-prediction, 64 px, patch 16: share of the unseen noise in its one-step samples"]) < 0.02
    assert_files(out, "training_loss.png", "one_step_digits.png", "x_vs_u_at_image_scale.png",
                 "official_layout_samples.png", "pMF-T-4_in_the_official_layout.pt")


def test_tutorial07_identity_needs_the_marginal_velocity(tutorial_runs):
    numbers, out = tutorial_numbers(tutorial_runs, "07")
    assert numbers["identity residual, tangent = marginal v"] < 1e-12
    assert numbers["identity residual, tangent = e - x of one pair"] > 0.1
    # e - x is unbiased: averaging 16 posterior pairs cuts the residual about 4x (1 / sqrt(K))
    assert numbers["identity residual, e - x averaged over 16 posterior pairs"] < \
        0.5 * numbers["identity residual, e - x averaged over 1 posterior pairs"]
    assert numbers["exact one-step map vs fresh data: sliced W2 (small: the map is right)"] < 0.1
    assert numbers["MeanFlow: e - x: tangent error (t-weighted, relative to e - x)"] == pytest.approx(1.0, rel=1e-6)
    assert_files(out, "tangent_needs_marginal_v.png", "tangents_over_training.png", "one_step_samples_by_tangent.png")


def test_tutorial08_invisible_share_noise_scale_and_cutoff(tutorial_runs):
    numbers, out = tutorial_numbers(tutorial_runs, "08")
    for resolution, patch in ((16, 4), (32, 8), (64, 16)):
        share = numbers[f"invisible share of the noise energy, {resolution} px, patch {patch}, bottleneck 16"]
        assert share == pytest.approx(max(0.0, 1 - 16 / patch**2), abs=0.01)
    # noise scale s at k-fold upsampling restores the 16 px signal-to-noise ratio (energy ~ k^2)
    t_16 = numbers["t* (SNR = 1 in the digits' subspace), 16 px, noise scale 1"]
    assert numbers["t* (SNR = 1 in the digits' subspace), 64 px, noise scale 4"] == pytest.approx(t_16, abs=0.02)
    assert numbers["t* (SNR = 1 in the digits' subspace), 64 px, noise scale 1"] > t_16 + 0.2
    assert numbers["perceptual term and gradient on rows with t >= t_thr (must be 0)"] == 0.0
    # the exact field: r = t predictions at t = 0.95 are averages (small spread), r = 0 endpoints spread like data
    assert numbers["exact field at t = 0.95, r = t: spread across images (std per coordinate)"] < \
        0.3 * numbers["exact field at t = 0.95, r = 0: spread across images (std per coordinate)"]
    assert_files(out, "x_vs_u_by_bottleneck.png", "denoised_field_across_r.png", "noise_scale.png",
                 "perceptual_cutoff.png")


def test_tutorial09_one_step_families_are_one_flow_map(tutorial_runs):
    numbers, out = tutorial_numbers(tutorial_runs, "09")
    assert numbers["consistency function vs the ODE endpoint Φ(z_t; t -> 0)"] < 1e-12
    assert numbers["self-consistency: |f(z_t, t) - f(z_s, s)| along one trajectory"] < 1e-12
    assert numbers["sCM condition df/dt along the flow, from MeanFlow's JVP (exact u: 0)"] < 1e-12
    assert numbers["df/dt by central differences of f (exact u: 0 up to O(h^2))"] < 1e-6
    # a wrong u: the sCM derivative and the MeanFlow residual are the same non-zero quantity
    assert numbers["perturbed u: |MeanFlow residual v - V at r = 0| (RMS)"] > 1e-2
    assert numbers["perturbed u: |df/dt - (v - V)|, same quantity two ways"] < 1e-6
    assert numbers["shortcut self-consistency: |s(z_t, t, 2d) - (s(z_t, t, d) + s(z_{t-d}, t-d, d)) / 2|"] < 1e-10
    assert numbers["additivity with an arbitrary split point m in [r, t]"] < 1e-10
    # the one-small-step target converges to u at second order in delta (MeanFlow: the limit, exact)
    assert numbers["error ratio per 10x smaller delta (second order: ~100)"] == pytest.approx(100, rel=0.3)
    assert_files(out, "one_step_families.png")


def test_full_mode_check_reads_checks_ranges_orders_and_flags_unchecked_numbers(tmp_path):
    sys.path.insert(0, str(TUTORIALS))
    try:
        import check_full_mode as checker
    finally:
        sys.path.remove(str(TUTORIALS))
    script = tmp_path / "99_example.py"
    script.write_text(
        "# %% [markdown]\n# The loss is 0.91 and the share 94%, seeds 0.30-0.36; FID 3.53 (paper).\n"
        "# <!-- check: loss = 0.91 -->\n# <!-- check: share = 94% -->\n"
        "# <!-- check: gap, seed * in [0.30, 0.36] -->\n# <!-- check: loss < big -->\n# <!-- given: 3.53 -->\n"
        "# %%\nprint(1)\n# %% [markdown]\n# An unchecked 0.5 here.\n")
    log = "loss = 0.93\nshare = 0.88\ngap, seed 0 = 0.31\ngap, seed 1 = 0.37\nbig = 2\n"
    results, unchecked = checker.check_tutorial(script, log)
    verdicts = {r.check: r.ok for r in results}
    assert verdicts == {"loss = 0.91": True,                       # within 5%
                        "share = 94%": False,                      # 0.88 vs 0.94: off by more than 5%
                        "gap, seed * in [0.30, 0.36]": True,       # 0.37 is within one last digit of 0.36
                        "loss < big": True}
    assert unchecked == ["99: '0.5' in the prose has no check"]
    results, _ = checker.check_tutorial(script, log.replace("gap, seed 1 = 0.37", "gap, seed 1 = 0.38"))
    assert not {r.check: r.ok for r in results}["gap, seed * in [0.30, 0.36]"]
    results, _ = checker.check_tutorial(script, "")
    assert not any(r.ok for r in results)                          # nothing printed: every check fails


if __name__ == "__main__":
    run_cell_by_cell(sys.argv[3:], sys.argv[1], sys.argv[2])
