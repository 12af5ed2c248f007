"""Benchmarks (full/bench/): the JVP strategies it compares compute the same loss and
gradient, the timer interleaves and counts what it claims, the memory probe sees an allocation,
and a tiny end-to-end run yields the documented JSON schema; the --compile benchmark's break-even
formula and plumbing (an identity "compiler" that records what it was given stands in for
torch.compile). No timing assertions."""
import json

import pytest
import torch

import pmf_ref as P
from full.bench import compile as BC
from full.bench import harness as bench
from full.bench.steps import ALG1_STRATEGIES, Batch, alg1_loss
from full.bench.profiles import excess_profile, format_profile
from full.bench.timing import interleaved_medians, peak_memory_bytes, round_ratios
from full.io import write_json
from full.step import TrainingStep
from toy.model import ToyMLP

TINY = bench.BenchConfig(warmup=0, repeats=1, min_sample_s=0.0, toy_dim=4, toy_batch=8,
                         tiny_preset="pMF-T/2", tiny_batch=2, small_preset="pMF-T/4", small_resolution=16,
                         small_batches=(2,), sample_batch=1, euler_steps=2, compile=False,
                         memory=False)  # the memory probe has its own test; gc.collect() costs 0.5 s a call here


def _grads(loss_fn, parameters):
    for parameter in parameters:
        parameter.grad = None
    loss = loss_fn()
    loss.mean().backward()
    return loss.detach(), [parameter.grad.clone() for parameter in parameters]


@pytest.mark.parametrize("strategy", ["jvp_nograd_plus_forward", "jvp_func_route", "double_backward"])
def test_alg1_strategies_match_core_loss_and_gradient(strategy):
    """Second formulation as oracle: every strategy equals pmf_ref.pmf_loss, value and gradient (float64)."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = ToyMLP(3, depth=3, width=16).double()
    n = 6
    x = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    e = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    r, t = P.sample_time_pair(n, generator=generator, dtype=torch.float64)
    batch = Batch(x, e, r, t)
    parameters = list(model.parameters())
    loss_core, grads_core = _grads(lambda: alg1_loss(model, batch), parameters)
    loss_alt, grads_alt = _grads(lambda: ALG1_STRATEGIES[strategy](model, batch), parameters)
    torch.testing.assert_close(loss_alt, loss_core, rtol=1e-10, atol=1e-12)
    for grad_alt, grad_core in zip(grads_alt, grads_core):
        torch.testing.assert_close(grad_alt, grad_core, rtol=1e-9, atol=1e-11)


def test_interleaved_medians_rotates_order_and_counts_calls():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    stats = interleaved_medians(fns, device=torch.device("cpu"), warmup=2, repeats=3, min_sample_s=0.0)
    timed = calls[-9:]                      # 3 repetitions x 3 variants, one call each (inner = 1)
    assert timed == list("abc" "acb" "cab")  # rotated, every other repetition reversed
    assert calls.count("a") == 2 + 3        # warm-up (the last call sizes `inner`) + timed
    assert all(len(s["samples_s"]) == 3 and s["inner"] == 1 for s in stats.values())
    assert all(s["min_s"] <= s["median_s"] for s in stats.values())


def test_round_ratios_pair_the_samples_of_one_round():
    """Ratio per round, then the median: 2, 4, 3 -> 3 (the ratio of the medians would be 4 / 1)."""
    stats = {"a": {"samples_s": [2.0, 4.0, 9.0]}, "b": {"samples_s": [1.0, 1.0, 3.0]}}
    assert round_ratios(stats, "a", "b") == {"median": 3.0, "min": 2.0, "max": 4.0, "rounds": 3}


def test_excess_profile_counts_the_ops_of_both_passes():
    a, b = torch.randn(32, 32), torch.randn(32, 32)
    result = excess_profile("two", lambda: (a @ b, a @ b), "one", lambda: a @ b, allowed=2.0)
    mm = next(row for row in result["ops"] if row["op"] == "aten::mm")
    assert (mm["pass_calls"], mm["unit_calls"]) == (2, 1)
    assert mm["excess_ms"] == pytest.approx(mm["pass_ms"] - 2.0 * mm["unit_ms"])
    assert result["total"]["excess_ms"] == pytest.approx(result["total"]["pass_ms"] - 2.0 * result["total"]["unit_ms"])
    table = format_profile("some_target", result)
    assert "| aten::mm | " in table and "| all ops |" in table and "some_target" in table


def test_peak_memory_sees_a_transient_allocation():
    size_mb = 64
    peak = peak_memory_bytes(lambda: torch.ones(size_mb * 2 ** 20 // 4).sum(), torch.device("cpu"))
    if peak is None:
        pytest.skip("no /proc/self/clear_refs on this platform")
    assert peak >= 0.9 * size_mb * 2 ** 20


def test_bench_run_has_headline_ratios_and_rows(tmp_path):
    threads = torch.get_num_threads()
    result = bench.run(TINY, progress=False)
    assert torch.get_num_threads() == threads  # the run restores the caller's setting
    for key in bench.HEADLINE_KEYS:
        assert result[key] > 0
    assert {"step_ratio_alg1", "step_ratio_released", "sampling_vs_forward", "one_step_vs_euler50",
            "jvp_forwards", "steps", "jvp_strategies", "sampling", "targets", "targets_met"} <= set(result)
    assert set(result["targets_met"]) == set(bench.TARGETS)
    assert {"cpu_model", "cpu_count", "torch_threads", "torch_version"} <= set(result["machine"])
    rows = {(row["network"], row["variant"], row["path"]) for row in result["steps"]}
    assert len(rows) == 2 * (4 + 5 + 5)     # old and new; the toy has no released recipe (no v-head)
    assert {row["strategy"] for row in result["jvp_strategies"]} == {"flow_matching", *ALG1_STRATEGIES}
    assert set(result["target_ranges"]) <= set(bench.TARGETS)
    for key, (pass_name, unit_name) in bench.PROFILED_TARGETS.items():   # every missed timed target is explained
        if result["targets_met"][key] is False:
            assert (result["profiles"][key]["pass"], result["profiles"][key]["unit"]) == (pass_name, unit_name)
            assert f"missed target {key}" in bench.format_tables(result)
        else:
            assert key not in result["profiles"]
    for row in result["steps"]:
        low, high = row["ratio_vs_forward_range"]
        assert low <= row["ratio_vs_forward"] <= high
        assert row["ratio_vs_old"] == 1.0 if row["path"] == "old" else row["ratio_vs_old"] > 0
        if row["variant"] == "flow_matching":
            assert row["ratio_vs_flow_matching"] == 1.0
        if row["variant"] == "forward":
            assert row["ratio_vs_forward"] == 1.0
    sampling = {(row["variant"], row["path"]) for row in result["sampling"] if row["network"] == "pMF-T/4 @16px"}
    assert sampling == {("bare_forward", "old"), ("bare_forward", "new"), ("one_step", "old"), ("one_step", "new"),
                        ("euler2", "new")}
    table = bench.format_tables(result)
    assert "| network | batch | step | old ms | new ms |" in table and "jvp_forwards = " in table
    path = tmp_path / "bench.json"
    write_json(path, result)
    assert json.loads(path.read_text())["step_ratio_alg1"] == result["step_ratio_alg1"]


@pytest.mark.parametrize("argv", [["--repeats", "3"], ["--threads", "0"], ["--sections", "steps", "nope"],
                                  ["--device", "tpu"], ["--warmup", "-1"], ["--small-batch", "2", "0"]])
def test_bench_cli_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    assert argv[0] in capsys.readouterr().err


@pytest.mark.usefixtures("one_thread")
def test_break_even_steps_closed_form():
    assert BC.break_even_steps(100.0, 0.3, 0.1) == pytest.approx(500.0)
    assert BC.break_even_steps(0.0, 0.3, 0.1) == 0.0
    assert BC.break_even_steps(100.0, 0.1, 0.1) is None      # no faster: never pays off
    assert BC.break_even_steps(100.0, 0.1, 0.2) is None


@pytest.mark.usefixtures("one_thread")
def test_compile_row_compiles_the_trainers_objective():
    given = []

    def identity_compiler(module):
        given.append(module)
        return module

    row = BC.compile_row("pMF-T/2", 2, device=torch.device("cpu"), warmup=1, repeats=2, compiler=identity_compiler)
    assert len(given) == 1 and isinstance(given[0], TrainingStep) and given[0].training
    assert row["eager_ms"] > 0 and row["compiled_ms"] > 0
    assert row["speedup"] == pytest.approx(row["eager_ms"] / row["compiled_ms"])
    expected = BC.break_even_steps(row["compile_s"], row["eager_ms"] / 1e3, row["compiled_ms"] / 1e3)
    assert row["break_even_steps"] == (pytest.approx(expected) if expected is not None else None)
    assert BC.markdown_row(row).startswith("| pMF-T/2 | 2 | cpu |")
    assert BC.markdown_row({**row, "break_even_steps": None}).endswith("| never |")


# ----------------------------------------------------------------------------- host syncs, precision, memory

def test_host_sync_counter_counts_what_reads_device_values():
    from full.bench.syncs import HostSyncCounter, count_host_syncs

    x = torch.randn(6)
    assert count_host_syncs(lambda: (x * 2 + 1).softmax(0).sum()) == {"total": 0, "by_op": {}}
    with HostSyncCounter() as syncs:
        x.sum().item()
        bool(x[0] > 0)
        x[x > 0]
        torch.nonzero(x)
        x[torch.tensor([0, 2])]        # integer indexing: no sync
    assert syncs.counts == {"aten._local_scalar_dense": 2, "aten.index (boolean mask)": 1, "aten.nonzero": 1}
    assert syncs.total == 4


@pytest.mark.usefixtures("one_thread")
def test_precision_section_rows_and_json(tmp_path, capsys):
    """The CPU path of ``--device cuda``'s command: one row per precision with images/s, peak memory, FLOP/s,
    utilisation (given a peak) and host syncs, printed and written to the JSON."""
    from full.params import training_gmacs

    bench.main(["--sections", "precision", "--preset", "pMF-T/2", "--precision", "fp32", "bf16", "--batch", "2",
                "--repeats", "5", "--warmup", "0", "--peak-tflops", "2.5", "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    result = json.loads((tmp_path / "out" / bench.RESULT_NAME).read_text())
    rows = result["precision"]
    assert [row["precision"] for row in rows] == ["fp32", "bf16"]
    flops = 2 * training_gmacs("pMF-T/2")["total"] * 1e9
    for row in rows:
        assert row["preset"] == "pMF-T/2" and row["resolution"] == 16 and row["batch"] == 2
        assert row["images_per_s"] == pytest.approx(2 / (row["median_ms"] / 1e3))
        assert row["achieved_tflops"] == pytest.approx(flops * row["images_per_s"] / 1e12)
        assert row["model_flop_utilisation"] == pytest.approx(row["achieved_tflops"] / 2.5)
        assert row["peak_memory_mb"] is None or row["peak_memory_mb"] >= 0
        assert row["host_syncs"]["total"] == sum(row["host_syncs"]["by_op"].values())
    assert rows[0]["speedup_vs_fp32"] == 1.0 and rows[0]["speedup_range"] == [1.0, 1.0]
    assert rows[1]["speedup_range"][0] <= rows[1]["speedup_vs_fp32"] <= rows[1]["speedup_range"][1]
    assert result["steps"] == [] and result["networks"] == []          # no other section ran
    assert "| precision | ms / step | images / s |" in printed and "| bf16 |" in printed


def test_bench_cli_refuses_tf32_on_cpu_and_unknown_presets(capsys):
    for argv, expected in ((["--precision", "tf32"], "--precision"), (["--preset", "pMF-X/1"], "--preset")):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert expected in err and "Traceback" not in err


def test_memory_fit_closed_form_and_static_bytes():
    from full.bench import memory
    from full.model import build_model

    gib = memory.GIB
    # 40 GiB, 90% usable = 36 GiB; 4 GiB static; 1 GiB per image -> 32 images; 1024 / 8 GPUs = 128 per GPU
    assert memory.fit(4 * gib, 1 * gib, 40) == {"max_images": 32, "micro_batch": 32, "accum_steps": 4}
    assert memory.fit(4 * gib, 0.0625 * gib, 80) == {"max_images": 1088, "micro_batch": 128, "accum_steps": 1}
    assert memory.fit(4 * gib, 3 * gib, 40) == {"max_images": 10, "micro_batch": 8, "accum_steps": 16}
    assert memory.fit(40 * gib, 1 * gib, 40)["micro_batch"] is None
    static = memory.static_bytes("pMF-T/4")
    params = build_model("pMF-T/4").param_count()
    assert static["weights"] == static["gradients"] == 4 * params
    assert static["emas"] == 3 * 4 * params
    assert 4 * params <= static["optimizer"] <= 8 * params
    assert static["total"] == sum(value for key, value in static.items() if key != "total")


@pytest.mark.usefixtures("one_thread")
def test_memory_rows_measure_slopes_and_fit():
    from full.bench import memory

    rows = memory.memory_rows(("pMF-T/2",), device=torch.device("cpu"), checkpointing=(True,))
    assert [row["activation_checkpointing"] for row in rows] == [True]
    for row in rows:
        assert row["measured_whole"] is not None and row["slope_source"] == "measured whole"
        assert set(row["reduced"]) == {"3", "6"}
        assert set(row["fits"]) == {"40", "80"}
    table = memory.format_memory_table(rows)
    assert "| pMF-T/2 | 16 | on |" in table
