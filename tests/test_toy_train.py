"""Toy training loop and sweep: shapes, files, JSON schema, parametrisations, the recipe's helpers."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch

import pmf_ref as P
import toy
from toy.model import ToyMLP
from toy.train import (ToyConfig, learning_rate, loss_terms, make_u_fn, resolve_compute_dtype, sample_times, train,
                       training_precision)

pytestmark = pytest.mark.usefixtures("one_thread")

FLOORED = ("swd", "energy", "precision", "coverage")
SCHEMA = {"prediction": str, "dim": int, "dataset": str, "steps": int, "seed": int, "off_manifold": float,
          "final_loss": float, **{name: float for name in FLOORED}, **{f"{name}_floor": float for name in FLOORED}}
TINY = dict(steps=3, batch_size=16, width=16, depth=3, eval_samples=256)  # fast: no learning checked here


def test_mlp_output_shape():
    model = ToyMLP(5, depth=3, width=8)
    t = torch.rand(4)
    assert model(torch.randn(4, 5), t * 0.5, t).shape == (4, 5)


def test_parametrisations_convert_output_to_u():
    # Oracle: the pMF conversion written out, u = (z - x_hat) / max(t, t_eps); u-prediction is the raw output.
    torch.manual_seed(0)
    model = ToyMLP(3, depth=3, width=8)
    z, t = torch.randn(6, 3), torch.tensor([0.01, 0.05, 0.2, 0.5, 0.9, 1.0])
    r = 0.5 * t
    raw = model(z, r, t)
    u_fn, has_aux = make_u_fn(model, "x")
    u, x_hat = u_fn(z, r, t)
    assert has_aux
    torch.testing.assert_close(x_hat, raw)
    torch.testing.assert_close(u, (z - raw) / t.clamp(min=P.T_EPS).unsqueeze(1))
    u_fn, has_aux = make_u_fn(model, "u")
    assert not has_aux
    torch.testing.assert_close(u_fn(z, r, t), raw)


@pytest.mark.parametrize("prediction", ["x", "u"])
@pytest.mark.parametrize("tangent", ["model", "conditional"])
@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_train_record_schema_and_shapes(prediction, tangent, compute_dtype):
    run = train(ToyConfig(dim=4, prediction=prediction, tangent=tangent, compute_dtype=compute_dtype, **TINY),
                progress=False)
    assert set(run.record) == set(SCHEMA)
    for key, kind in SCHEMA.items():
        assert isinstance(run.record[key], kind), key
    assert all(np.isfinite(run.record[key]) for key in SCHEMA if SCHEMA[key] is float)
    assert run.samples_2d.shape == (256, 2)
    assert run.losses.shape == (3,)
    assert run.projection.shape == (4, 2)
    assert next(run.model.parameters()).dtype == torch.float32   # weights stay float32 under autocast


def test_train_is_reproducible_from_seed():
    first = train(ToyConfig(dim=3, prediction="u", **TINY), progress=False)
    second = train(ToyConfig(dim=3, prediction="u", **TINY), progress=False)
    assert first.record == second.record


def test_floors_are_data_against_data():
    # The floors do not depend on the model: two runs that share the dataset, seed and evaluation size
    # but not the network or D have the same floors; they lie below an untrained-ish model's values.
    first = train(ToyConfig(dim=2, **TINY), progress=False).record
    second = train(ToyConfig(dim=6, prediction="u", **TINY), progress=False).record
    for name in FLOORED:
        assert first[f"{name}_floor"] == second[f"{name}_floor"]
        assert 0 <= first[f"{name}_floor"] < first[name]


def test_uniform_time_sampler_has_the_order_statistics_of_two_uniforms():
    # Oracle: with every row uniform and no r = t rows, t = max(U1, U2) has CDF t^2, r = min has 1 - (1 - r)^2.
    config = ToyConfig(uniform_fraction=1.0, equal_fraction=0.0)
    r, t = sample_times(config, 20_000, generator=torch.Generator().manual_seed(0))
    assert scipy.stats.kstest(t.numpy(), lambda q: q ** 2).pvalue > 1e-3
    assert scipy.stats.kstest(r.numpy(), lambda q: 1 - (1 - q) ** 2).pvalue > 1e-3
    config = ToyConfig(uniform_fraction=1.0, equal_fraction=0.5)
    r, t = sample_times(config, 20_000, generator=torch.Generator().manual_seed(1))
    assert abs(float((r == t).float().mean()) - 0.5) < 0.02 and bool((r <= t).all())


def test_corner_fraction_sets_that_share_of_rows_to_the_one_step_point():
    config = ToyConfig(uniform_fraction=1.0, equal_fraction=0.5, corner_fraction=0.3)
    r, t = sample_times(config, 20_000, generator=torch.Generator().manual_seed(2))
    corner = (r == 0) & (t == 1)
    assert abs(float(corner.float().mean()) - 0.3) < 0.02 and bool((r <= t).all())
    # Without corner rows the draw is pmf_ref's sampler, unchanged (no extra random numbers taken).
    plain = ToyConfig(uniform_fraction=1.0)
    r, t = sample_times(plain, 64, generator=torch.Generator().manual_seed(3))
    r_ref, t_ref = P.sample_time_pair(64, mean=plain.time_mean, std=plain.time_std, equal_fraction=plain.equal_fraction,
                                      uniform_fraction=1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(r, r_ref) and torch.equal(t, t_ref)


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_learning_rate_warmup_rises_linearly_then_hands_over_to_the_schedule(schedule):
    warm = ToyConfig(lr=2e-3, steps=101, lr_schedule=schedule, warmup_steps=10)
    cold = dataclasses.replace(warm, warmup_steps=0)
    for step in (0, 4, 9):
        assert learning_rate(warm, step) == pytest.approx(2e-3 * (step + 1) / 10 * learning_rate(cold, step) / 2e-3)
    for step in (10, 50, 100):
        assert learning_rate(warm, step) == learning_rate(cold, step)


@pytest.mark.parametrize("schedule, middle", [("constant", 1.0), ("cosine", 0.5), ("linear", 0.5)])
def test_learning_rate_schedules_start_at_lr_and_decay_to_zero(schedule, middle):
    # Closed forms: at k = (K - 1) / 2 the half cosine and the line are both at lr / 2; at the last step 0.
    config = ToyConfig(lr=2e-3, steps=101, lr_schedule=schedule, warmup_steps=0)
    assert learning_rate(config, 0) == pytest.approx(2e-3)
    assert learning_rate(config, 50) == pytest.approx(middle * 2e-3)
    assert learning_rate(config, 100) == pytest.approx(2e-3 if schedule == "constant" else 0.0, abs=1e-12)
    if schedule == "cosine":   # a quarter of the way: (1 + cos(pi / 4)) / 2 of the peak
        assert learning_rate(config, 25) == pytest.approx(2e-3 * (1 + np.cos(np.pi / 4)) / 2)


@pytest.mark.parametrize("amx, avx512_bf16, expected", [(True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                                        (False, False, torch.float32)])
def test_auto_compute_dtype_is_bf16_exactly_on_cpus_with_native_bf16(monkeypatch, amx, avx512_bf16, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert resolve_compute_dtype(ToyConfig(compute_dtype="auto")) == expected
    assert resolve_compute_dtype(ToyConfig(compute_dtype="float32")) == torch.float32


@pytest.mark.parametrize("tangent", ["model", "conditional"])
def test_loss_terms_apply_the_adaptive_power(tangent):
    # adp(L) = L / sg(L + c)^p: p = 0 is the raw squared error, p = 1 is L / (L + c) (pMF).
    torch.manual_seed(0)
    model = ToyMLP(3, depth=2, width=8)
    u_fn, has_aux = make_u_fn(model, "x")
    x, e, t = torch.randn(6, 3), torch.randn(6, 3), torch.rand(6) * 0.9 + 0.1
    r = t * torch.rand(6)
    for p in (0.0, 0.5, 1.0):
        terms = loss_terms(u_fn, has_aux, x, e, r, t, tangent, p=p)
        torch.testing.assert_close(terms.loss, terms.raw / (terms.raw + P.ADAPTIVE_C) ** p)


def test_adaptive_power_reaches_the_training_step():
    weights = {}
    for p in (0.0, 1.0):
        run = train(ToyConfig(dim=3, adaptive_power=p, ema_decay=0.0, compute_dtype="float32", **TINY), progress=False)
        weights[p] = torch.cat([w.flatten() for w in run.model.parameters()])
    assert not torch.allclose(weights[0.0], weights[1.0])


def test_training_precision_runs_linear_layers_in_the_chosen_dtype():
    model = ToyMLP(3, depth=2, width=8)
    z, t = torch.randn(4, 3), torch.rand(4)
    with training_precision(ToyConfig(compute_dtype="bfloat16")):
        assert model(z, t, t).dtype == torch.bfloat16
    with training_precision(ToyConfig(compute_dtype="float32")):
        assert model(z, t, t).dtype == torch.float32


@pytest.mark.parametrize("field, value", [("dim", 1), ("dataset", "spiral"), ("prediction", "v"), ("steps", 0),
                                          ("uniform_fraction", 1.5), ("ema_decay", 1.0), ("compute_dtype", "fp8"),
                                          ("corner_fraction", -0.1), ("lr_schedule", "step"),
                                          ("adaptive_power", -0.5), ("warmup_steps", -1)])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match="ToyConfig"):
        ToyConfig(**{field: value})


def test_sweep_configs_apply_overrides_and_reject_repeats():
    configs = toy.sweep_configs(dims=(2, 8), predictions=("x",), seeds=(0, 1), steps=7)
    assert [(c.seed, c.dim, c.prediction, c.steps) for c in configs] == \
        [(0, 2, "x", 7), (0, 8, "x", 7), (1, 2, "x", 7), (1, 8, "x", 7)]
    assert configs[0].batch_size == toy.DEFAULT_RECIPE.batch_size
    with pytest.raises(ValueError, match="unknown ToyConfig field"):
        toy.sweep_configs(stepz=7)
    with pytest.raises(ValueError, match="seeds"):
        toy.sweep_configs(seeds=(0, 0))


def test_sweep_writes_files_and_json_schema(tmp_path):
    runs = toy.run_sweep(dims=(2, 6), predictions=("x", "u"), seeds=(0, 1), out=tmp_path, progress=False, **TINY)
    assert len(runs) == 8
    for name in ("metrics.json", "samples.png", "loss_curves.png", "table.md"):
        assert (tmp_path / name).stat().st_size > 0, name
    records = json.loads((tmp_path / "metrics.json").read_text())
    assert records == [run.record for run in runs]
    assert {(r["prediction"], r["dim"], r["seed"]) for r in records} == \
        {(p, d, s) for p in "xu" for d in (2, 6) for s in (0, 1)}
    table = (tmp_path / "table.md").read_text()
    assert "| x | 6 | 2 |" in table and "data vs data" in table and "x)" in table
    assert not [path.name for path in tmp_path.iterdir() if path.name.startswith(".")]   # no temp files left


def test_write_outputs_refuses_an_earlier_run_unless_overwrite(tmp_path):
    runs = toy.run_sweep(dims=(2,), predictions=("x",), progress=False, **TINY)
    (tmp_path / "table.md").write_text("someone else's table\n")
    with pytest.raises(FileExistsError, match="table.md"):
        toy.write_outputs(runs, tmp_path)
    assert (tmp_path / "table.md").read_text() == "someone else's table\n"
    assert not (tmp_path / "metrics.json").exists()          # refused before writing anything
    toy.write_outputs(runs, tmp_path, overwrite=True)
    assert "| x | 2 | 1 |" in (tmp_path / "table.md").read_text()


def test_run_sweep_parallel_workers_reproduce_serial_records():
    """Each run seeds itself, so training the runs in a process pool gives the serial records."""
    kwargs = dict(dims=(2, 4), predictions=("x",), steps=5, batch_size=32, eval_samples=64, progress=False)
    serial = [run.record for run in toy.run_sweep(workers=1, **kwargs)]
    parallel = [run.record for run in toy.run_sweep(workers=2, **kwargs)]
    assert [(r["dim"], r["prediction"]) for r in parallel] == [(r["dim"], r["prediction"]) for r in serial]
    for a, b in zip(serial, parallel):
        assert a["swd"] == pytest.approx(b["swd"], rel=1e-4, abs=1e-6)
        assert a["final_loss"] == pytest.approx(b["final_loss"], rel=1e-4)


def test_pool_workers_exit_once_the_sweep_that_started_them_is_gone(tmp_path):
    # A parent that starts a sweep-style pool (spawn + toy.sweep.exit_with_parent), reports its worker's
    # pid, and is then killed with SIGKILL: the orphaned worker must end within a few poll periods.
    script = tmp_path / "parent.py"
    script.write_text(
        "import multiprocessing, os, sys, time\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from toy.sweep import exit_with_parent\n"
        "if __name__ == '__main__':\n"
        "    pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn'),\n"
        "                               initializer=exit_with_parent, initargs=(os.getpid(),))\n"
        "    print(pool.submit(os.getpid).result(), flush=True)\n"
        "    pool.submit(time.sleep, 600)\n"
        "    time.sleep(600)\n")
    repo = str(Path(toy.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        worker = int(parent.stdout.readline())
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                os.kill(worker, 0)
            except ProcessLookupError:
                return
            if _is_zombie(worker):   # it exited; its new parent has not reaped it yet
                return
            time.sleep(0.2)
        os.kill(worker, signal.SIGKILL)
        raise AssertionError("the pool worker outlived its killed parent by 15 s")
    finally:
        if parent.poll() is None:
            parent.kill()


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def test_a_diverging_run_stops_at_the_first_non_finite_loss():
    config = toy.ToyConfig(lr=1e3, steps=50, dim=8, prediction="u", batch_size=64, eval_samples=64, warmup_steps=0)
    with pytest.raises(toy.ToyDivergenceError, match=r"u-pred D=8 seed 0: the raw loss is (nan|inf) at step \d+ of"):
        toy.train(config, progress=False)


@pytest.mark.parametrize("field", ["lr", "time_mean", "time_std", "adaptive_power"])
def test_config_refuses_non_finite_numbers(field):
    with pytest.raises(ValueError, match="must be finite"):
        toy.ToyConfig(**{field: float("inf")})


def test_a_diverging_run_in_a_process_pool_stops_the_sweep():
    with pytest.raises(toy.ToyDivergenceError, match="the raw loss is (nan|inf)"):
        toy.run_sweep(dims=(2, 8), predictions=("u",), lr=1e3, steps=50, batch_size=64, eval_samples=64,
                      warmup_steps=0, progress=False, workers=2)
