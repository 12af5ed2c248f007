"""Toy training loop, sweep outputs and CLI: shapes, files, JSON schema, parametrisations, errors."""
import json

import pytest
import torch

import pmf_ref as P
import toy
from toy.__main__ import main
from toy.model import ToyMLP
from toy.train import ToyConfig, make_u_fn, train

SCHEMA = {"prediction": str, "dim": int, "dataset": str, "steps": int, "seed": int,
          "swd": float, "energy": float, "off_manifold": float, "final_loss": float}
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
def test_train_record_schema_and_shapes(prediction, tangent):
    run = train(ToyConfig(dim=4, prediction=prediction, tangent=tangent, **TINY), progress=False)
    assert set(run.record) == set(SCHEMA)
    for key, kind in SCHEMA.items():
        assert isinstance(run.record[key], kind), key
    assert run.samples_2d.shape == (256, 2)
    assert run.losses.shape == (3,)
    assert run.projection.shape == (4, 2)


def test_train_is_reproducible_from_seed():
    first = train(ToyConfig(dim=3, prediction="u", **TINY), progress=False)
    second = train(ToyConfig(dim=3, prediction="u", **TINY), progress=False)
    assert first.record == second.record


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
    assert "| x | 6 | 2 |" in table and "data vs data" in table
    assert not list(tmp_path.glob("*.tmp"))


def test_cli_writes_outputs(tmp_path, capsys):
    main(["--dims", "2", "3", "--predictions", "x", "--steps", "2", "--batch-size", "8", "--width", "8",
          "--depth", "2", "--eval-samples", "128", "--out", str(tmp_path), "--no-progress"])
    assert json.loads((tmp_path / "metrics.json").read_text())[1]["dim"] == 3
    assert str(tmp_path / "samples.png") in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--dims", "2", "1"], "--dims"),
    (["--dataset", "spiral"], "--dataset"),
    (["--steps", "0"], "--steps"),
    (["--lr", "-1"], "--lr"),
    (["--tangent", "v_head"], "--tangent"),
])
def test_cli_bad_flags_give_one_line_error(argv, message, capsys):
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error and "error:" in error


def test_run_sweep_parallel_workers_reproduce_serial_records():
    """Each run seeds itself, so training the runs in a process pool gives the serial records."""
    import toy
    kwargs = dict(dims=(2, 4), predictions=("x",), steps=5, batch_size=32, eval_samples=64, progress=False)
    serial = [run.record for run in toy.run_sweep(workers=1, **kwargs)]
    parallel = [run.record for run in toy.run_sweep(workers=2, **kwargs)]
    assert [(r["dim"], r["prediction"]) for r in parallel] == [(r["dim"], r["prediction"]) for r in serial]
    for a, b in zip(serial, parallel):
        assert a["swd"] == pytest.approx(b["swd"], rel=1e-4, abs=1e-6)
        assert a["final_loss"] == pytest.approx(b["final_loss"], rel=1e-4)
