"""Benchmarks of pMF's cost: the JVP, training steps vs flow matching, sampling speed, memory.

    python -m full.bench --quick --out bench/          # bench/bench.json; a few minutes on 2 CPU cores
    python -m full.bench --device cuda --out bench_gpu/

Every comparison runs the old and the new path side by side, interleaved in one process
(``full.bench.steps.PATHS``: old = the reference route, inside ``full.fast_jvp.reference_ops()``; new =
the trainers' engine, ``full.fast_jvp.jvp``; both described by ``full.fast_jvp.ENGINE_DESCRIPTIONS``). Three sections, each on the same networks (toy MLP, tiny
ViT pMF-T/4, a small ViT: B/16 at 64 px, at one or more batch sizes):

1. steps -- the no-grad forward of the u path, the no-grad JVP (primal + tangent), forward + backward
   of a JiT-style flow-matching step, the pMF Alg. 1 step and the released-recipe step (guidance
   passes + JVP through both heads + backward; perceptual loss off), each on both paths, with peak
   memory; ratios to the forward (JVP, flow matching), to flow matching (steps) and to the old path.
2. jvp -- the same Alg. 1 loss computed several ways (``full.bench.steps.ALG1_STRATEGIES``) on the
   new path, each eager and under ``torch.compile`` (where it compiles), with peak memory.
3. sampling -- images/s of the bare network forward and 1-NFE sampling (both paths) and a 50-step
   Euler sampler.

The JSON carries the headline ratios of the new path at the top level (the small ViT at its first
batch size): ``jvp_forwards`` (JVP time / forward time), ``step_ratio_alg1``, ``step_ratio_released``
(step time / flow-matching step time), ``sampling_vs_forward`` (1-NFE images/s / bare forward
images/s) and ``one_step_vs_euler50``; ``targets_met`` adds the new-vs-old targets (plain forward
speed, released-step peak memory) read from the rows. Every ratio is taken round by round (both variants ran in
the same round of the interleaving) and quoted as the median with its min-max (``target_ranges``); every missed
target of :data:`PROFILED_TARGETS` is printed with an op-by-op profile of its pass against its unit
(``full.bench.profiles``). Benchmarks are measurements, never tests: nothing here asserts a time.
"""
from __future__ import annotations

import json
import dataclasses
import os
import resource
import sys
import time

import torch
from tqdm.auto import tqdm


from .. import cli, fast_jvp
from ..io import write_json
from .nets import Workload, toy_workload, vit_workload
from .memory import format_memory_table, memory_rows
from .steps import (ALG1_STRATEGIES, PATHS, alg1_loss, flow_matching_loss, on_path, sampling_calls,
                          training_step, u_forward, u_jvp)
from .syncs import count_host_syncs
from .profiles import excess_profile, format_profile
from .timing import CLOCKS, interleaved_medians, machine_info, memory_method, peak_memory_bytes, round_ratios
from .training import precision_rows, released_step
from ..precision import PRECISIONS, apply_precision
from ..presets import PRESETS

TARGETS = {"jvp_forwards": ("<=", 2.0), "step_ratio_alg1": ("<=", 1.9), "step_ratio_released": ("<=", 2.9),
           "released_forwards": ("<=", 7.3), "released_host_syncs": ("<=", 0), "bf16_speedup": (">=", 1.8),
           "sampling_vs_forward": (">=", 0.95), "forward_speed_vs_old": (">=", 0.98),
           "released_peak_memory_vs_old": ("<=", 0.7)}
"""The goals, on the headline network: a JVP <= 2.0 forwards (the authors' JAX: 1.7-1.8), Alg. 1 <= 1.9x and
the released step <= 2.9x a flow-matching step (no worse than the authors' JAX ratio) and <= 7.3 forwards
(the authors' JAX: 7.95-8.54), no host sync in a released step, bf16 >= 1.8x faster than fp32 (precision
section), 1-NFE sampling
>= 0.95x a bare forward, the plain forward >= 0.98x as fast as the old path, and the released step's
peak memory <= 0.7x the old path's."""
HEADLINE_KEYS = ("jvp_forwards", "step_ratio_alg1", "step_ratio_released", "sampling_vs_forward",
                 "one_step_vs_euler50")
SECTIONS = ("steps", "jvp", "sampling", "precision", "memory")
DEFAULT_SECTIONS = ("steps", "jvp", "sampling", "precision")
WORKLOAD_SECTIONS = ("steps", "jvp", "sampling")              # those that run on build_workloads' networks   # memory: minutes per preset, on request
MEMORY_PRESETS = ("pMF-B/16", "pMF-L/16", "pMF-H/16", "pMF-B/32", "pMF-L/32", "pMF-H/32")
STEP_VARIANTS = ("forward", "jvp", "flow_matching", "alg1", "released")
RESULT_NAME = "bench.json"
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
    sections: tuple[str, ...] = DEFAULT_SECTIONS
    toy_dim: int = 512                  # D of the toy MLP (pMF Fig. 2's hardest case)
    toy_batch: int = 1024               # the toy trainer's batch
    tiny_preset: str = "pMF-T/4"
    tiny_batch: int = 32
    small_preset: str = "pMF-B/16"
    small_resolution: int = 64          # B/16 at 64 px: 16 patch tokens + 20 conditioning tokens
    small_batches: tuple[int, ...] = (2, 8)  # the headline is the first
    sample_batch: int = 8               # small ViT; the toy and tiny ViT use 8x this
    euler_steps: int = 50
    compile: bool = True                # also time torch.compile'd variants in the jvp section
    compile_tiny: bool = True           # ... on the tiny ViT too
    compile_small: bool = False         # ... and on the small ViT (minutes of compilation on CPU)
    jvp_small: bool = True              # the jvp section on the small ViT too (its steps section has Alg. 1)
    memory: bool = True
    seed: int = 0
    # precision section: the released step at one preset, per precision policy (full.precision)
    precisions: tuple[str, ...] = ()    # () = fp32 and bf16 on a CPU (no TF32 there), all three on CUDA
    preset: str | None = None           # None = the small ViT on a CPU (B/16 at 64 px), B/16 at 256 px on CUDA
    precision_batch: int | None = None  # None = the small ViT's first batch on a CPU, 32 on CUDA
    activation_checkpointing: bool = False
    peak_tflops: float | None = None    # the device's peak for the utilisation (default: full.bench.training)
    memory_presets: tuple[str, ...] = MEMORY_PRESETS
    profile_missed: bool = True         # print where the time goes for every missed timed target (PROFILED_TARGETS)


QUICK = dict(warmup=1, repeats=7, toy_batch=256, tiny_batch=16, small_batches=(2,), sample_batch=1,
             compile_tiny=False, jvp_small=False)
"""--quick: smaller batches (B/16 at batch 2 only), 7 interleaved rounds (the headline ratios are medians of
per-round ratios, quoted with their min-max), torch.compile on the toy only, the jvp section on the toy and
the tiny ViT only."""


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


def _step_calls(work: Workload) -> dict[tuple[str, str], object]:
    """(variant, path) -> zero-argument call, for the variants this network has."""
    calls = {"forward": lambda: u_forward(work.x_fn, work.batch),
             "jvp": lambda: u_jvp(work.x_fn, work.batch),
             "flow_matching": training_step(lambda: flow_matching_loss(work.x_fn, work.batch), work.parameters),
             "alg1": training_step(lambda: alg1_loss(work.x_fn, work.batch), work.parameters)}
    if work.released_loss is not None:
        calls["released"] = training_step(work.released_loss, work.parameters)
    return {(variant, path): on_path(call, path) for variant, call in calls.items() for path in PATHS}


def step_rows(work: Workload, cfg: BenchConfig, device, bar) -> list[dict]:
    """Forward, JVP, flow matching, Alg. 1 and released, on both paths, interleaved, on one network."""
    calls = _step_calls(work)
    stats = interleaved_medians({f"{v}|{p}": call for (v, p), call in calls.items()}, device=device,
                                 warmup=cfg.warmup, repeats=cfg.repeats, min_sample_s=cfg.min_sample_s,
                                 clock=cfg.clock, progress=bar)
    memory = {key: _memory_mb(call, device, cfg.memory) for key, call in calls.items()}
    rows = []
    for (variant, path), call in calls.items():
        old_memory = memory[(variant, "old")]
        syncs = count_host_syncs(call) if path == "new" else None   # device-to-host syncs in one call
        # every ratio round by round (both variants ran in the same round): its median, and min-max as the spread
        ratios = {f"ratio_vs_{unit}": round_ratios(stats, f"{variant}|{path}", f"{unit_variant}|{unit_path}")
                  for unit, unit_variant, unit_path in (("forward", "forward", path),
                                                        ("flow_matching", "flow_matching", path),
                                                        ("old", variant, "old"))}
        rows.append({"network": work.name, "batch": work.batch.x.shape[0], "variant": variant, "path": path,
                     **_ms(stats[f"{variant}|{path}"]),
                     **{key: ratio["median"] for key, ratio in ratios.items()},
                     **{f"{key}_range": [ratio["min"], ratio["max"]] for key, ratio in ratios.items()},
                     "peak_memory_mb": memory[(variant, path)],
                     "peak_memory_vs_old": (None if memory[(variant, path)] is None or not old_memory
                                            else memory[(variant, path)] / old_memory),
                     "host_syncs": syncs,
                     "source": work.released_source if variant == "released" else None})
    return rows


def _precision_setup(cfg: BenchConfig, device: torch.device) -> tuple[str, int, dict]:
    """(preset, batch, build_model overrides) of the precision section (see :class:`BenchConfig`)."""
    if cfg.preset is not None:
        preset, overrides = cfg.preset, {}
    elif device.type == "cuda":
        preset, overrides = "pMF-B/16", {}
    else:
        preset, overrides = cfg.small_preset, {"resolution": cfg.small_resolution}
    return preset, cfg.precision_batch or (32 if device.type == "cuda" else cfg.small_batches[0]), overrides


def precision_section(cfg: BenchConfig, device: torch.device, bar=None) -> list[dict]:
    """The released step per precision policy at ``cfg.preset`` (see :class:`BenchConfig`)."""
    precisions = cfg.precisions or (PRECISIONS if device.type == "cuda" else ("fp32", "bf16"))
    preset, batch, overrides = _precision_setup(cfg, device)
    return precision_rows(preset, batch, tuple(precisions), device=device, warmup=cfg.warmup, repeats=cfg.repeats,
                          clock=cfg.clock, memory=cfg.memory, peak_tflops_override=cfg.peak_tflops,
                          activation_checkpointing=cfg.activation_checkpointing, progress=bar, **overrides)


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
    """Images/s of the bare forward and the 1-NFE sampler (both paths) and the Euler sampler (new)."""
    samplers = sampling_calls(work.sample_x_fn, work.sample_noise, euler_steps=cfg.euler_steps)
    calls = {(name, path): on_path(call, path) for name, call in samplers.items() for path in PATHS
             if path == "new" or name in ("bare_forward", "one_step")}
    stats = interleaved_medians({f"{v}|{p}": call for (v, p), call in calls.items()}, device=device,
                                 warmup=cfg.warmup, repeats=cfg.repeats, min_sample_s=cfg.min_sample_s,
                                 clock=cfg.clock, progress=bar)
    n = work.sample_noise.shape[0]
    rate = {key: n / stats[f"{key[0]}|{key[1]}"]["median_s"] for key in calls}
    return [{"network": work.name, "variant": name, "path": path, "batch": n, **_ms(stats[f"{name}|{path}"]),
             "images_per_s": rate[(name, path)],
             "ratio_vs_bare_forward": rate[(name, path)] / rate[("bare_forward", path)],
             "ratio_vs_old": rate[(name, path)] / rate[(name, "old")] if (name, "old") in rate else None}
            for (name, path) in calls]


# ----------------------------------------------------------------------------- driver

def build_workloads(cfg: BenchConfig, device) -> list[Workload]:
    """Toy, tiny ViT, then the small ViT at each of ``cfg.small_batches`` (the headline is the first)."""
    return [toy_workload(dim=cfg.toy_dim, batch_size=cfg.toy_batch, sample_batch=8 * cfg.sample_batch,
                         device=device),
            vit_workload(cfg.tiny_preset, batch_size=cfg.tiny_batch, sample_batch=8 * cfg.sample_batch,
                         device=device)] + [
            vit_workload(cfg.small_preset, batch_size=batch, sample_batch=cfg.sample_batch,
                         device=device, resolution=cfg.small_resolution) for batch in cfg.small_batches]


def _headline(rows: list[dict], network: str, batch: int, variant: str, key: str) -> float | None:
    """``row[key]`` of the new path's row for (network, batch, variant), or None."""
    for row in rows:
        if (row["network"], row["batch"], row["variant"], row["path"]) == (network, batch, variant, "new"):
            return row[key]
    return None


def target_values(result: dict) -> dict[str, float | None]:
    """The value of every :data:`TARGETS` key: the headline ratios, plus the new path's plain-forward
    speed and released-step peak memory relative to the old path (headline network and batch)."""
    network = result["networks"][2]["name"] if result["networks"] else None
    batch = result["config"]["small_batches"][0]
    step = (result["steps"], network, batch)
    forward_time_vs_old = _headline(*step, "forward", "ratio_vs_old")
    syncs = _headline(*step, "released", "host_syncs")
    bf16 = [row for row in result.get("precision", []) if row["precision"] == "bf16"]
    return {**{key: result[key] for key in HEADLINE_KEYS},
            "released_forwards": result.get("released_forwards"),
            "released_host_syncs": None if syncs is None else syncs["total"],
            "bf16_speedup": bf16[0].get("speedup_vs_fp32") if bf16 else None,
            "forward_speed_vs_old": None if forward_time_vs_old is None else 1 / forward_time_vs_old,
            "released_peak_memory_vs_old": _headline(*step, "released", "peak_memory_vs_old")}


def target_ranges(result: dict) -> dict[str, list[float] | None]:
    """The spread (min, max over the interleaved rounds) of every :data:`TARGETS` ratio that has one."""
    network = result["networks"][2]["name"] if result["networks"] else None
    step = (result["steps"], network, result["config"]["small_batches"][0])
    forward_vs_old = _headline(*step, "forward", "ratio_vs_old_range")
    bf16 = [row for row in result.get("precision", []) if row["precision"] == "bf16"]
    return {"jvp_forwards": _headline(*step, "jvp", "ratio_vs_forward_range"),
            "released_forwards": _headline(*step, "released", "ratio_vs_forward_range"),
            "step_ratio_alg1": _headline(*step, "alg1", "ratio_vs_flow_matching_range"),
            "step_ratio_released": _headline(*step, "released", "ratio_vs_flow_matching_range"),
            "bf16_speedup": bf16[0].get("speedup_range") if bf16 else None,
            "forward_speed_vs_old": None if forward_vs_old is None else [1 / forward_vs_old[1], 1 / forward_vs_old[0]]}


PROFILED_TARGETS = {"jvp_forwards": ("jvp", "forward"), "released_forwards": ("released", "forward"),
                    "step_ratio_alg1": ("alg1", "flow_matching"), "step_ratio_released": ("released", "flow_matching"),
                    "bf16_speedup": ("bf16", "fp32")}
"""The timed targets a missed value is explained for: (the pass in question, the pass it is measured in)."""


def missed_target_profiles(cfg: BenchConfig, device: torch.device, result: dict, small: Workload | None) -> dict:
    """For every missed target of :data:`PROFILED_TARGETS`: ``full.bench.profiles.excess_profile`` of its pass
    against its unit (new path, headline network; the bf16 step against the fp32 step of the precision section)."""
    profiles = {}
    for key, (pass_name, unit_name) in PROFILED_TARGETS.items():
        if result["targets_met"].get(key) is not False:
            continue
        op, bound = TARGETS[key]
        if key == "bf16_speedup":
            preset, batch, overrides = _precision_setup(cfg, device)
            step, _ = released_step(preset, batch, device=device, activation_checkpointing=cfg.activation_checkpointing,
                                    **overrides)
            calls = {name: (lambda name=name: (apply_precision(name, device), step(name))) for name in ("fp32", "bf16")}
        elif small is not None:
            calls = {variant: call for (variant, path), call in _step_calls(small).items() if path == "new"}
        else:
            continue
        allowed = bound if op == "<=" else 1 / bound
        profiles[key] = excess_profile(pass_name, calls[pass_name], unit_name, calls[unit_name], allowed)
    return profiles


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
    # the precision and memory sections build their own networks
    workloads = build_workloads(cfg, device) if set(cfg.sections) & set(WORKLOAD_SECTIONS) else []
    small = workloads[2] if workloads else None
    result: dict = {name: None for name in HEADLINE_KEYS}
    result.update(headline_network=None if small is None else f"{small.name} batch {small.batch.x.shape[0]}",
                  targets={k: f"{op} {v}" for k, (op, v) in TARGETS.items()},
                  machine=info, memory_method=memory_method(device),
                  config={**dataclasses.asdict(cfg), "paths": {
                      "old": f"full.fast_jvp.reference_ops(): {fast_jvp.ENGINE_DESCRIPTIONS['func']}",
                      "new": f"the trainers' engine: {fast_jvp.ENGINE_DESCRIPTIONS['forward_ad']}"}},
                  timing_method=("median over interleaved repetitions (rotating order) after warm-up; "
                                 "a repetition averages `inner` calls; step = zero grads + loss.mean() + backward, "
                                 "no optimizer update; old and new paths interleaved in the same run"),
                  networks=[{"name": w.name, "description": w.description, "param_count": w.param_count}
                            for w in workloads],
                  steps=[], jvp_strategies=[], sampling=[], precision=[], memory=[])
    per_network = {"steps": 2 * len(STEP_VARIANTS), "jvp": 2 * (1 + len(ALG1_STRATEGIES)), "sampling": 5,
                   "precision": 0, "memory": 0}  # at most
    total = cfg.repeats * len(workloads) * sum(per_network[section] for section in cfg.sections)  # an upper bound
    with tqdm(desc="bench", unit="sample", total=total, disable=not progress, file=sys.stderr) as bar:
        for work in workloads:
            if "steps" in cfg.sections:
                bar.set_postfix_str(f"steps {work.name}")
                result["steps"] += step_rows(work, cfg, device, bar)
            if "jvp" in cfg.sections and (cfg.jvp_small or work in workloads[:2]):
                bar.set_postfix_str(f"jvp {work.name}")
                compile_here = cfg.compile and (work is workloads[0] or (work in workloads[2:] and cfg.compile_small)
                                                or (work is workloads[1] and cfg.compile_tiny))
                result["jvp_strategies"] += jvp_rows(work, cfg, device, bar, compile_here)
            if "sampling" in cfg.sections:
                bar.set_postfix_str(f"sampling {work.name}")
                result["sampling"] += sampling_rows(work, cfg, device, bar)
        if "precision" in cfg.sections:
            bar.set_postfix_str("precision")
            result["precision"] = precision_section(cfg, device, bar)
        if "memory" in cfg.sections:
            bar.set_postfix_str("memory")
            result["memory"] = memory_rows(cfg.memory_presets, device=device)
    step = (result["steps"], small and small.name, small and small.batch.x.shape[0])
    result["released_forwards"] = _headline(*step, "released", "ratio_vs_forward")
    sample = (result["sampling"], small and small.name, small and small.sample_noise.shape[0])
    result["jvp_forwards"] = _headline(*step, "jvp", "ratio_vs_forward")
    result["step_ratio_alg1"] = _headline(*step, "alg1", "ratio_vs_flow_matching")
    result["step_ratio_released"] = _headline(*step, "released", "ratio_vs_flow_matching")
    result["sampling_vs_forward"] = _headline(*sample, "one_step", "ratio_vs_bare_forward")
    one_step = _headline(*sample, "one_step", "images_per_s")
    euler = _headline(*sample, f"euler{cfg.euler_steps}", "images_per_s")
    result["one_step_vs_euler50"] = None if one_step is None or euler is None else one_step / euler
    values = target_values(result)
    result["targets_met"] = {key: None if values[key] is None else
                             (values[key] <= bound if op == "<=" else values[key] >= bound)
                             for key, (op, bound) in TARGETS.items()}
    result["target_ranges"] = target_ranges(result)
    result["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result["profiles"] = missed_target_profiles(cfg, device, result, small) if cfg.profile_missed else {}
    result["elapsed_s"] = time.perf_counter() - started
    # CPU seconds actually used (compiler workers are child processes): on a machine shared with
    # other jobs this, not elapsed_s, estimates how long the run takes on an idle machine.
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    result["cpu_s"] = {"self": time.process_time(), "children": children.ru_utime + children.ru_stime}
    return result


# ----------------------------------------------------------------------------- report

def _fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


STEP_UNITS = {"forward": None, "jvp": "forward", "flow_matching": "forward", "alg1": "flow_matching",
              "released": "flow_matching"}
"""The unit each step variant is quoted in (``ratio_vs_<unit>``, same path)."""


def format_tables(result: dict) -> str:
    """Markdown tables of the three sections (old and new paths side by side) plus the headline."""
    lines = [f"Machine: {result['machine']['cpu_model']}, {result['machine']['torch_threads']} torch threads, "
             f"clock: {result['config']['clock']}, "
             f"torch {result['machine']['torch_version']}, device {result['machine']['device']}; "
             f"load average at start {_fmt(result['machine']['load_average_1_5_15'][0], '.1f')}",
             f"Paths: old = {result['config']['paths']['old']}; new = {result['config']['paths']['new']}", ""]
    if result["steps"]:
        by_key = {(r["network"], r["batch"], r["variant"], r["path"]): r for r in result["steps"]}
        lines += ["| network | batch | step | old ms | new ms | new / old | unit | old x unit | new x unit "
                  "| old peak MB | new peak MB | memory new / old |",
                  "|---|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
        for (network, batch, variant, path), new in by_key.items():
            if path != "new":
                continue
            old, unit = by_key[(network, batch, variant, "old")], STEP_UNITS[variant]
            ratio_key = f"ratio_vs_{unit}" if unit else None
            lines.append(f"| {network} | {batch} | {variant} | {_fmt(old['median_ms'], '.1f')} | "
                         f"{_fmt(new['median_ms'], '.1f')} | {_fmt(new['ratio_vs_old'])} | {unit or '-'} | "
                         f"{_fmt(old[ratio_key]) if unit else '-'} | {_fmt(new[ratio_key]) if unit else '-'} | "
                         f"{_fmt(old['peak_memory_mb'], '.0f')} | {_fmt(new['peak_memory_mb'], '.0f')} | "
                         f"{_fmt(new['peak_memory_vs_old'])} |")
        lines.append("")
    if result["jvp_strategies"]:
        lines += ["| network | Alg. 1 loss via (new path) | mode | ms / step | x flow matching (same mode) | peak MB "
                  "| compile s |", "|---|---|---|---:|---:|---:|---:|"]
        for r in result["jvp_strategies"]:
            if r["error"]:
                lines.append(f"| {r['network']} | {r['strategy']} | {r['mode']} | failed: {r['error'][:60]} | | | |")
                continue
            lines.append(f"| {r['network']} | {r['strategy']} | {r['mode']} | {_fmt(r['median_ms'], '.1f')} | "
                         f"{_fmt(r['ratio_vs_flow_matching'])} | {_fmt(r['peak_memory_mb'], '.0f')} | "
                         f"{_fmt(r['compile_s'], '.0f')} |")
        lines.append("")
    if result["sampling"]:
        lines += ["| network | sampler | path | batch | images / s | x bare forward (same path) | new / old |",
                  "|---|---|---|---:|---:|---:|---:|"]
        lines += [f"| {r['network']} | {r['variant']} | {r['path']} | {r['batch']} | {_fmt(r['images_per_s'], '.1f')} | "
                  f"{_fmt(r['ratio_vs_bare_forward'], '.3f')} | {_fmt(r['ratio_vs_old'], '.3f')} |"
                  for r in result["sampling"]]
        lines.append("")
    absolute = [r for r in result["steps"] if r["path"] == "new" and r["network"] == result["networks"][2]["name"]]
    absolute = [r for r in absolute if r["batch"] == result["config"]["small_batches"][0]]
    if absolute:
        lines += [f"Absolute rows, new path, {result['headline_network']} (hold them against the authors' JAX run the "
                  "same hour; ratios divide the GEMM library out):", "",
                  "| step | ms | forwards | min-max over rounds | host syncs |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['variant']} ({r['batch']}) | {_fmt(r['median_ms'], '.1f')} | {_fmt(r['ratio_vs_forward'])} | "
                  f"{_fmt(r['ratio_vs_forward_range'][0])}-{_fmt(r['ratio_vs_forward_range'][1])} | "
                  f"{'-' if r['host_syncs'] is None else r['host_syncs']['total']} |" for r in absolute]
        lines.append("")
    if result.get("precision"):
        first = result["precision"][0]
        lines += [f"Released step per precision: {first['preset']} at {first['resolution']} px, batch {first['batch']}, "
                  f"{first['device']}, {first['training_gflops_per_image']:.1f} training GFLOPs per image "
                  f"({first['step_in_forwards_counted']:.2f} forwards counted)", "",
                  "| precision | ms / step | images / s | speed-up | min-max over rounds | TFLOP/s | MFU | peak MB "
                  "| host syncs |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['precision']} | {_fmt(r['median_ms'], '.1f')} | {_fmt(r['images_per_s'], '.2f')} | "
                  f"{_fmt(r['speedup_vs_' + first['precision']])} | "
                  f"{_fmt(r['speedup_range'][0])}-{_fmt(r['speedup_range'][1])} | {_fmt(r['achieved_tflops'], '.3f')} | "
                  f"{_fmt(r['model_flop_utilisation'], '.1%')} | "
                  f"{_fmt(r['peak_allocated_mb'] if r['peak_allocated_mb'] is not None else r['peak_memory_mb'], '.0f')} | "
                  f"{r['host_syncs']['total']} |" for r in result["precision"]]
        lines.append("")
    if result.get("memory"):
        lines += [format_memory_table(result["memory"]), ""]
    values, ranges = target_values(result), result.get("target_ranges", {})

    def spread(key):
        low_high = ranges.get(key)
        return "" if not low_high else f" [{low_high[0]:.3f}-{low_high[1]:.3f}]"
    lines.append(f"Headline, new path ({result['headline_network']}; ratios: median [min-max] of the per-round ratio "
                 f"over {result['config']['repeats']} interleaved rounds; load average at start "
                 f"{_fmt(result['machine']['load_average_1_5_15'][0], '.2f')}, at end "
                 f"{_fmt((result['machine'].get('load_average_end') or [None])[0], '.2f')}): " + ", ".join(
        f"{key} = {_fmt(values[key], '.3f')}{spread(key)}" + ("" if key not in TARGETS or values[key] is None else
                                                             f" (target {result['targets'][key]}: "
                                                             f"{'met' if result['targets_met'][key] else 'missed'})")
        for key in values))
    for key, profile_ in result.get("profiles", {}).items():
        lines += ["", format_profile(key, profile_)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = cli.Parser("python -m full.bench", __doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="small batches, 7 interleaved rounds, torch.compile on the toy only (< 5 min on 2 cores)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help=f"output folder: {RESULT_NAME} (the tables are printed either way)")
    cli.add_json(parser, "the whole result")
    cli.add_device(parser, default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads, fixed for the whole run (see BenchConfig.threads)")
    parser.add_argument("--clock", choices=("auto",) + CLOCKS, default="auto",
                        help="clock of the medians: 'process' CPU time (steady on a shared CPU), 'wall', "
                             "or 'auto' = process on CPU, wall on CUDA")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"timed repetitions per variant, >= {MIN_REPEATS} (default 7, also with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls per variant first (default 2; 1 with --quick)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(DEFAULT_SECTIONS), metavar="SECTION",
                        help=f"which of {' '.join(SECTIONS)} to run (default: all but memory, which measures "
                             f"every preset at its resolution: tens of CPU-minutes)")
    parser.add_argument("--preset", default=None, metavar="NAME",
                        help="the precision section's network at its own resolution (default: B/16 at 64 px on a CPU, "
                             "pMF-B/16 on CUDA)")
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS, default=None, metavar="P",
                        help="precision policies of the precision section (full.precision; default fp32 bf16 on a CPU, "
                             "fp32 tf32 bf16 on CUDA)")
    parser.add_argument("--batch", type=int, default=None,
                        help="the precision section's batch (default: the small ViT's first on a CPU, 32 on CUDA)")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="the precision section's network recomputes each block in the backward")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak TFLOP/s for the utilisation (default: known GPUs by name)")
    parser.add_argument("--memory-presets", nargs="+", default=None, metavar="NAME",
                        help=f"presets of the memory section (default: {' '.join(MEMORY_PRESETS)})")
    parser.add_argument("--small-batch", type=int, nargs="+", default=None, metavar="B",
                        help="training batches of the small ViT, the headline first (default 2 8; 2 with --quick)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--compile-small", action="store_true", help="also compile on the small ViT (slow on CPU)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    args = parser.parse_args(argv)

    device = str(cli.resolve_device(parser, args.device))
    if not 1 <= args.threads <= (os.cpu_count() or 1):
        parser.error(f"--threads must lie in [1, {os.cpu_count()}], got {args.threads}")
    if args.repeats is not None and args.repeats < MIN_REPEATS:
        parser.error(f"--repeats must be >= {MIN_REPEATS}, got {args.repeats}")
    if args.warmup is not None and args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    small_batches = tuple(args.small_batch) if args.small_batch is not None else None
    if small_batches is not None and min(small_batches) < 1:
        parser.error(f"--small-batch: each batch must be >= 1, got {' '.join(map(str, small_batches))}")
    sections = tuple(dict.fromkeys(args.sections))
    for name in ([args.preset] if args.preset else []) + (args.memory_presets or []):
        if name not in PRESETS:
            parser.error(f"--preset / --memory-presets: unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    if args.batch is not None and args.batch < 1:
        parser.error(f"--batch must be >= 1, got {args.batch}")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        parser.error(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    if device == "cpu" and args.precision and "tf32" in args.precision:
        parser.error("--precision: tf32 is a CUDA mode; on a CPU choose fp32 or bf16")
    if args.out is not None:
        cli.check_out(parser, args.out)

    overrides = dict(QUICK) if args.quick else {}
    overrides.update({key: value for key, value in (("repeats", args.repeats), ("warmup", args.warmup),
                                                    ("small_batches", small_batches)) if value is not None})
    clock = args.clock if args.clock != "auto" else ("process" if device == "cpu" else "wall")
    cfg = BenchConfig(device=device, threads=args.threads, sections=sections, clock=clock,
                      compile=not args.no_compile, compile_small=args.compile_small,
                      memory=not args.no_memory, precisions=tuple(dict.fromkeys(args.precision or ())),
                      preset=args.preset, precision_batch=args.batch,
                      activation_checkpointing=args.activation_checkpointing, peak_tflops=args.peak_tflops,
                      **({"memory_presets": tuple(args.memory_presets)} if args.memory_presets else {}), **overrides)
    result = run(cfg)
    result["config"]["quick"] = args.quick
    print(json.dumps(result, indent=2) if args.json else format_tables(result))
    if args.out:
        path = write_json(os.path.join(args.out, RESULT_NAME), result)
        print(f"wrote {path}", file=sys.stderr if args.json else sys.stdout)

