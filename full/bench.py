"""Benchmarks of pMF's cost: training step vs flow matching, JVP strategies, sampling speed, memory.

    python -m full.bench --quick --out bench.json      # < 5 min on 2 CPU cores
    python -m full.bench --device cuda --out bench_gpu.json

Three sections, each on the same networks (toy MLP, tiny ViT pMF-T/4, a small ViT: B/16 at 64 px):

1. steps -- forward + backward of a JiT-style flow-matching step, the pMF Alg. 1 step and the
   released-recipe step (guidance passes + JVP + v-head + backward; perceptual loss off), timed
   interleaved in one process; ratios to flow matching.
2. jvp -- the same Alg. 1 loss computed three ways (``full.bench_steps.ALG1_STRATEGIES``), each
   eager and under ``torch.compile`` (where it compiles), with peak memory.
3. sampling -- images/s of the bare network forward, 1-NFE sampling and a 50-step Euler sampler.

The JSON carries the headline ratios at the top level (measured on the small ViT):
``step_ratio_alg1``, ``step_ratio_released`` (step time / flow-matching step time),
``sampling_vs_forward`` (1-NFE images/s / bare forward images/s) and ``one_step_vs_euler50``.
Benchmarks are measurements, never tests: nothing here asserts a time.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import tempfile
import time

import torch
from tqdm.auto import tqdm

from .bench_nets import Workload, toy_workload, vit_workload
from .bench_steps import ALG1_STRATEGIES, flow_matching_loss, alg1_loss, sampling_calls, training_step
from .bench_timing import CLOCKS, interleaved_medians, machine_info, memory_method, peak_memory_bytes

TARGETS = {"step_ratio_alg1": ("<=", 2.0), "step_ratio_released": ("<=", 2.5),
           "sampling_vs_forward": (">=", 0.95)}
"""The issue's goals: Alg. 1 step <= 2x flow matching, released <= 2.5x, 1-NFE >= 0.95x forward."""
SECTIONS = ("steps", "jvp", "sampling")
MIN_REPEATS = 5  # the issue asks for the median of at least 5 repetitions
MB = 2 ** 20


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    device: str = "cpu"
    # torch.set_num_threads, fixed and reported. 1 by default: on a machine shared with other jobs
    # OpenMP workers wait for each other at every op, and a 2-thread run of small ops can be
    # hundreds of times slower than 1 thread (measured: 3.6 ms vs 9.5 us for a 16x64 @ 64x64 matmul).
    threads: int = 1
    warmup: int = 2
    repeats: int = 7
    min_sample_s: float = 0.05          # a timing sample averages calls over at least this long
    # Clock behind the medians and ratios: "process" (CPU time; steady on a shared CPU with one
    # thread) or "wall" (needed on GPU). Both are recorded in every row.
    clock: str = "process"
    sections: tuple[str, ...] = SECTIONS
    toy_dim: int = 512                  # D of the toy MLP (pMF Fig. 2's hardest case)
    toy_batch: int = 1024               # the toy trainer's batch
    tiny_preset: str = "pMF-T/4"
    tiny_batch: int = 32
    small_preset: str = "pMF-B/16"
    small_resolution: int = 64          # B/16 at 64 px: 16 patch tokens + 20 conditioning tokens
    small_batch: int = 8
    sample_batch: int = 8               # small ViT; the toy and tiny ViT use 8x this
    euler_steps: int = 50
    compile: bool = True                # also time torch.compile'd variants in the jvp section
    compile_tiny: bool = True           # ... on the tiny ViT too
    compile_small: bool = False         # ... and on the small ViT (minutes of compilation on CPU)
    memory: bool = True
    seed: int = 0


QUICK = dict(warmup=1, repeats=5, toy_batch=256, tiny_batch=16, small_batch=2, sample_batch=1, compile_tiny=False)
"""--quick: smaller batches, the minimum of 5 repetitions, torch.compile on the toy MLP only."""


# ----------------------------------------------------------------------------- sections

def _ms(stats: dict) -> dict:
    return {"median_ms": 1e3 * stats["median_s"], "min_ms": 1e3 * stats["min_s"],
            "iqr_ms": 1e3 * stats["iqr_s"], "wall_median_ms": 1e3 * stats["wall_median_s"],
            "process_median_ms": 1e3 * stats["process_median_s"], "clock": stats["clock"],
            "inner": stats["inner"], "repeats": len(stats["samples_s"])}


def _memory_mb(fn, device, enabled: bool) -> float | None:
    if not enabled:
        return None
    peak = peak_memory_bytes(fn, device)
    return None if peak is None else peak / MB


def step_rows(work: Workload, cfg: BenchConfig, device, bar) -> list[dict]:
    """Flow matching vs Alg. 1 vs released, interleaved, on one network."""
    steps = {"flow_matching": training_step(lambda: flow_matching_loss(work.x_fn, work.batch), work.parameters),
             "alg1": training_step(lambda: alg1_loss(work.x_fn, work.batch), work.parameters)}
    if work.released_loss is not None:
        steps["released"] = training_step(work.released_loss, work.parameters)
    stats = interleaved_medians(steps, device=device, warmup=cfg.warmup, repeats=cfg.repeats,
                                 min_sample_s=cfg.min_sample_s, clock=cfg.clock, progress=bar)
    base = stats["flow_matching"]["median_s"]
    return [{"network": work.name, "variant": name, **_ms(stats[name]),
             "ratio_vs_flow_matching": stats[name]["median_s"] / base,
             "peak_memory_mb": _memory_mb(steps[name], device, cfg.memory),
             "source": work.released_source if name == "released" else None} for name in steps]


def _compiled_step(loss_fn, parameters):
    """A training step whose loss (forward, JVP included) is ``torch.compile``d; backward eager."""
    compiled = torch.compile(lambda: loss_fn().mean())

    def step() -> None:
        for parameter in parameters:
            parameter.grad = None
        compiled().backward()
    return step


def jvp_rows(work: Workload, cfg: BenchConfig, device, bar, compile_here: bool) -> list[dict]:
    """Alg. 1 computed by each JVP strategy (plus flow matching as the unit), eager and compiled."""
    losses = {"flow_matching": flow_matching_loss, **ALG1_STRATEGIES}
    steps, compile_s, errors = {}, {}, {}
    for name, loss in losses.items():
        loss_fn = (lambda loss=loss: loss(work.x_fn, work.batch))
        steps[(name, "eager")] = training_step(loss_fn, work.parameters)
        if compile_here:
            step = _compiled_step(loss_fn, work.parameters)
            start = time.perf_counter()
            try:
                step()
                step()  # a second call catches a recompilation on the first backward
                steps[(name, "compiled")] = step
            except Exception as error:  # noqa: BLE001 -- "where it works": record why it did not
                errors[(name, "compiled")] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            compile_s[(name, "compiled")] = time.perf_counter() - start
    keyed = {f"{name}|{mode}": step for (name, mode), step in steps.items()}
    stats = interleaved_medians(keyed, device=device, warmup=cfg.warmup, repeats=cfg.repeats,
                                 min_sample_s=cfg.min_sample_s, clock=cfg.clock, progress=bar)
    rows = []
    for name in losses:
        for mode in ("eager", "compiled") if compile_here else ("eager",):
            key = (name, mode)
            row = {"network": work.name, "strategy": name, "mode": mode,
                   "compile_s": compile_s.get(key), "error": errors.get(key)}
            if key in steps:
                unit = stats[f"flow_matching|{mode}"]["median_s"] if ("flow_matching", mode) in steps else None
                row.update(_ms(stats[f"{name}|{mode}"]),
                           ratio_vs_flow_matching=None if unit is None else stats[f"{name}|{mode}"]["median_s"] / unit,
                           peak_memory_mb=_memory_mb(steps[key], device, cfg.memory))
            rows.append(row)
    return rows


def sampling_rows(work: Workload, cfg: BenchConfig, device, bar) -> list[dict]:
    """Images/s of the bare forward, the 1-NFE sampler and the Euler sampler."""
    calls = sampling_calls(work.sample_x_fn, work.sample_noise, euler_steps=cfg.euler_steps)
    stats = interleaved_medians(calls, device=device, warmup=cfg.warmup, repeats=cfg.repeats,
                                 min_sample_s=cfg.min_sample_s, clock=cfg.clock, progress=bar)
    n = work.sample_noise.shape[0]
    base = n / stats["bare_forward"]["median_s"]
    return [{"network": work.name, "variant": name, "batch": n, **_ms(stats[name]),
             "images_per_s": n / stats[name]["median_s"],
             "ratio_vs_bare_forward": n / stats[name]["median_s"] / base} for name in calls]


# ----------------------------------------------------------------------------- driver

def build_workloads(cfg: BenchConfig, device) -> list[Workload]:
    return [toy_workload(dim=cfg.toy_dim, batch_size=cfg.toy_batch, sample_batch=8 * cfg.sample_batch,
                         device=device),
            vit_workload(cfg.tiny_preset, batch_size=cfg.tiny_batch, sample_batch=8 * cfg.sample_batch,
                         device=device),
            vit_workload(cfg.small_preset, batch_size=cfg.small_batch, sample_batch=cfg.sample_batch,
                         device=device, resolution=cfg.small_resolution)]


def _headline(rows: list[dict], network: str, variant: str, key: str) -> float | None:
    for row in rows:
        if row["network"] == network and row.get("variant") == variant:
            return row[key]
    return None


def run(cfg: BenchConfig, progress: bool = True) -> dict:
    """Run the chosen sections and return the JSON-ready result dict."""
    device = torch.device(cfg.device)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, device, progress)
    finally:
        torch.set_num_threads(threads_before)


def _run(cfg: BenchConfig, device: torch.device, progress: bool) -> dict:
    torch.manual_seed(cfg.seed)
    started = time.perf_counter()
    info = machine_info(device)
    workloads = build_workloads(cfg, device)
    small = workloads[-1]
    result: dict = {name: None for name in ("step_ratio_alg1", "step_ratio_released", "sampling_vs_forward",
                                            "one_step_vs_euler50")}
    result.update(headline_network=small.name, targets={k: f"{op} {v}" for k, (op, v) in TARGETS.items()},
                  machine=info, config=dataclasses.asdict(cfg), memory_method=memory_method(device),
                  timing_method=("median over interleaved repetitions (rotating order) after warm-up; "
                                 "a repetition averages `inner` calls; step = zero grads + loss.mean() + backward, "
                                 "no optimizer update"),
                  networks=[{"name": w.name, "description": w.description, "param_count": w.param_count}
                            for w in workloads],
                  steps=[], jvp_strategies=[], sampling=[])
    per_network = {"steps": 3, "jvp": 2 * (1 + len(ALG1_STRATEGIES)), "sampling": 3}  # at most, per network
    total = cfg.repeats * len(workloads) * sum(per_network[section] for section in cfg.sections)
    with tqdm(desc="bench", unit="sample", total=total, disable=not progress, file=sys.stderr) as bar:
        for work in workloads:
            if "steps" in cfg.sections:
                bar.set_postfix_str(f"steps {work.name}")
                result["steps"] += step_rows(work, cfg, device, bar)
            if "jvp" in cfg.sections:
                bar.set_postfix_str(f"jvp {work.name}")
                compile_here = cfg.compile and (work is workloads[0] or (work is small and cfg.compile_small)
                                                or (work is workloads[1] and cfg.compile_tiny))
                result["jvp_strategies"] += jvp_rows(work, cfg, device, bar, compile_here)
            if "sampling" in cfg.sections:
                bar.set_postfix_str(f"sampling {work.name}")
                result["sampling"] += sampling_rows(work, cfg, device, bar)
    result["step_ratio_alg1"] = _headline(result["steps"], small.name, "alg1", "ratio_vs_flow_matching")
    result["step_ratio_released"] = _headline(result["steps"], small.name, "released", "ratio_vs_flow_matching")
    result["sampling_vs_forward"] = _headline(result["sampling"], small.name, "one_step", "ratio_vs_bare_forward")
    one_step = _headline(result["sampling"], small.name, "one_step", "images_per_s")
    euler = _headline(result["sampling"], small.name, f"euler{cfg.euler_steps}", "images_per_s")
    result["one_step_vs_euler50"] = None if one_step is None or euler is None else one_step / euler
    result["targets_met"] = {key: None if result[key] is None else
                             (result[key] <= bound if op == "<=" else result[key] >= bound)
                             for key, (op, bound) in TARGETS.items()}
    result["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result["elapsed_s"] = time.perf_counter() - started
    # CPU seconds actually used (compiler workers are child processes): on a machine shared with
    # other jobs this, not elapsed_s, estimates how long the run takes on an idle machine.
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    result["cpu_s"] = {"self": time.process_time(), "children": children.ru_utime + children.ru_stime}
    return result


# ----------------------------------------------------------------------------- report

def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def format_tables(result: dict) -> str:
    """Markdown tables of the three sections plus the headline ratios."""
    lines = [f"Machine: {result['machine']['cpu_model']}, {result['machine']['torch_threads']} torch threads, "
             f"clock: {result['config']['clock']}, "
             f"torch {result['machine']['torch_version']}, device {result['machine']['device']}; "
             f"load average at start {_fmt(result['machine']['load_average_1_5_15'][0], '.1f')}", ""]
    if result["steps"]:
        lines += ["| network | step | ms / step (median) | IQR ms | x flow matching | peak MB |",
                  "|---|---|---:|---:|---:|---:|"]
        lines += [f"| {r['network']} | {r['variant']} | {_fmt(r['median_ms'], '.1f')} | {_fmt(r['iqr_ms'], '.1f')} | "
                  f"{_fmt(r['ratio_vs_flow_matching'])} | {_fmt(r['peak_memory_mb'], '.0f')} |" for r in result["steps"]]
        lines.append("")
    if result["jvp_strategies"]:
        lines += ["| network | Alg. 1 loss via | mode | ms / step | x flow matching (same mode) | peak MB | compile s |",
                  "|---|---|---|---:|---:|---:|---:|"]
        for r in result["jvp_strategies"]:
            if r["error"]:
                lines.append(f"| {r['network']} | {r['strategy']} | {r['mode']} | failed: {r['error'][:60]} | | | |")
                continue
            lines.append(f"| {r['network']} | {r['strategy']} | {r['mode']} | {_fmt(r['median_ms'], '.1f')} | "
                         f"{_fmt(r['ratio_vs_flow_matching'])} | {_fmt(r['peak_memory_mb'], '.0f')} | "
                         f"{_fmt(r['compile_s'], '.0f')} |")
        lines.append("")
    if result["sampling"]:
        lines += ["| network | sampler | batch | images / s | x bare forward |", "|---|---|---:|---:|---:|"]
        lines += [f"| {r['network']} | {r['variant']} | {r['batch']} | {_fmt(r['images_per_s'], '.1f')} | "
                  f"{_fmt(r['ratio_vs_bare_forward'], '.3f')} |" for r in result["sampling"]]
        lines.append("")
    lines.append(f"Headline ({result['headline_network']}): " + ", ".join(
        f"{key} = {_fmt(result[key], '.3f')}" + ("" if key not in TARGETS or result[key] is None else
                                                 f" (target {result['targets'][key]}: "
                                                 f"{'met' if result['targets_met'][key] else 'missed'})")
        for key in ("step_ratio_alg1", "step_ratio_released", "sampling_vs_forward", "one_step_vs_euler50")))
    return "\n".join(lines)


def write_json_atomic(path: str, payload: dict) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False) as handle:
        json.dump(payload, handle, indent=2)
        temp_name = handle.name
    os.replace(temp_name, path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m full.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small batches, 5 repetitions, torch.compile on the toy only (< 5 min on 2 cores)")
    parser.add_argument("--out", default=None, help="write the JSON result to this file (atomically)")
    parser.add_argument("--device", default="cpu", help="'cpu' (default) or 'cuda' (or 'cuda:N')")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads, fixed for the whole run (default 1: see BenchConfig.threads)")
    parser.add_argument("--clock", choices=("auto",) + CLOCKS, default="auto",
                        help="clock of the medians: 'process' CPU time (steady on a shared CPU), 'wall', "
                             "or 'auto' (default) = process on CPU, wall on CUDA")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed repetitions per variant, >= {MIN_REPEATS} (default 7; 5 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per variant first (default 2; 1 with --quick)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS} (default: all)")
    parser.add_argument("--small-batch", type=int, default=None, help="training batch of the small ViT (default 8; 2 with --quick)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--compile-small", action="store_true", help="also compile on the small ViT (slow on CPU)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    args = parser.parse_args(argv)

    if args.device != "cpu" and not args.device.startswith("cuda"):
        parser.error(f"--device must be 'cpu' or 'cuda[:N]', got {args.device!r}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda requested but torch.cuda.is_available() is False")
    if not 1 <= args.threads <= (os.cpu_count() or 1):
        parser.error(f"--threads must lie in [1, {os.cpu_count()}], got {args.threads}")
    if args.repeats is not None and args.repeats < MIN_REPEATS:
        parser.error(f"--repeats must be >= {MIN_REPEATS}, got {args.repeats}")
    if args.warmup is not None and args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.small_batch is not None and args.small_batch < 1:
        parser.error(f"--small-batch must be >= 1, got {args.small_batch}")
    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    if not sections or set(sections) - set(SECTIONS):
        parser.error(f"--sections must be a comma-separated subset of {SECTIONS}, got {args.sections!r}")

    overrides = dict(QUICK) if args.quick else {}
    overrides.update({key: value for key, value in (("repeats", args.repeats), ("warmup", args.warmup),
                                                    ("small_batch", args.small_batch)) if value is not None})
    clock = args.clock if args.clock != "auto" else ("process" if args.device == "cpu" else "wall")
    cfg = BenchConfig(device=args.device, threads=args.threads, sections=sections, clock=clock,
                      compile=not args.no_compile, compile_small=args.compile_small,
                      memory=not args.no_memory, **overrides)
    result = run(cfg)
    result["config"]["quick"] = args.quick
    print(format_tables(result))
    if args.out:
        write_json_atomic(args.out, result)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
