"""Measurement tools of the benchmarks: interleaved medians, peak memory, machine description.

Timing: every variant of a comparison runs in the same process, interleaved in a rotating order
reversed every other time (ABC, ACB, CAB, BAC, ...: each variant follows each neighbour), after warm-up; a sample is the mean of ``inner`` calls (chosen so a sample
lasts at least ``min_sample_s``) and the reported number is the median over samples, so slow
drifts of a shared machine hit all variants alike and outliers do not move the result. A ratio of two
variants is taken round by round (:func:`round_ratios`: both samples of a round ran within seconds of each
other) and quoted as the median with its spread, min to max.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above the allocation before the call.
On CPU PyTorch keeps no allocator statistics, so we read the process's resident set: reset the
kernel's high-water mark (``/proc/self/clear_refs``), run the call once, and report
``VmHWM - VmRSS(before)``. Freed heap is first handed back to the OS (``malloc_trim``) so the
baseline holds no reusable free memory, and during the probe glibc serves every block above 64 KiB
by ``mmap`` (``mallopt(M_MMAP_THRESHOLD)``), so a freed tensor leaves the resident set at once: without
that, blocks freed by one variant and reused by the next made the figures depend on the order of
the probes (measured: the same step 360 or 428 MB). One untimed call under that setting comes first.
This counts every byte the step touches above what is live before it (activations, workspace; the
gradients of the previous call are live before and are freed and re-allocated inside), at page
granularity, and it is Linux + glibc only (else ``None``).
"""
from __future__ import annotations

import ctypes
import gc
import os
import platform
import statistics
import time
from typing import Callable

import torch

CLOCKS = ("wall", "process")
MIN_SAMPLE_S = 0.05
"""A timing sample spans at least this long (many calls of a fast step are averaged into one)."""
MAX_INNER = 1000
"""Cap on the calls averaged into one sample."""
M_MMAP_THRESHOLD = -3                # glibc mallopt parameter
PROBE_MMAP_THRESHOLD = 64 * 2 ** 10  # during a memory probe: every block above this is its own mapping
DEFAULT_MMAP_THRESHOLD = 32 * 2 ** 20  # afterwards: glibc's own upper limit for its dynamic threshold
CPU_MEMORY_METHOD = ("rss_high_water (VmHWM after /proc/self/clear_refs=5, minus VmRSS before; malloc_trim first; "
                     "blocks > 64 KiB mmap-ed during the probe, after one untimed call)")
CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated minus memory_allocated before"


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a wall-clock interval covers the work it launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_calls(fn: Callable[[], object], calls: int, device: torch.device) -> tuple[float, float]:
    """Seconds per call of ``fn``: (wall clock, this process's CPU time)."""
    synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - wall) / calls, (time.process_time() - cpu) / calls


def interleaved_medians(fns: dict[str, Callable[[], object]], *, device: torch.device, warmup: int,
                        repeats: int, min_sample_s: float = MIN_SAMPLE_S, clock: str = "wall",
                        progress=None) -> dict[str, dict]:
    """Time several variants interleaved; per variant the median seconds per call.

    Both clocks are recorded; ``clock`` picks the one behind ``median_s``: "wall", or "process"
    (CPU time of this process: on a CPU shared with other jobs it leaves out the time the OS gave
    to them, so with one torch thread it is far steadier than the wall clock; it is meaningless
    for GPU work, which runs outside the process's CPU time).

    Args:
        fns: name -> zero-argument callable (one training step, one sampling call, ...).
        warmup: untimed calls of each variant first (allocator, caches, compilation); at least
            one is made, the last one timed to choose ``inner``.
        repeats: timed samples per variant (>= 5 for a median worth quoting).
        progress: optional tqdm bar, advanced once per sample.
    Returns:
        name -> {"median_s", "min_s", "iqr_s", "samples_s", "inner"}.
    """
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    names = list(fns)
    inner = {}
    for name in names:
        for _ in range(warmup - 1):
            fns[name]()
        once = _time_calls(fns[name], 1, device)[0]  # the last warm-up call also sizes `inner`
        inner[name] = int(min(MAX_INNER, max(1, round(min_sample_s / max(once, 1e-9)))))
    samples: dict[str, dict[str, list[float]]] = {name: {"wall": [], "process": []} for name in names}
    for rep in range(repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]  # rotate: no variant always first
        if rep % 2:
            # and reverse every other repetition: with rotation alone a variant always follows the same
            # one (an old-path step always came after the heavier new-path step of the previous pair)
            order.reverse()
        for name in order:
            wall, cpu = _time_calls(fns[name], inner[name], device)
            samples[name]["wall"].append(wall)
            samples[name]["process"].append(cpu)
            if progress is not None:
                progress.update(1)
    result = {}
    for name in names:
        values = sorted(samples[name][clock])
        quartiles = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
        result[name] = {"median_s": statistics.median(values), "min_s": values[0],
                        "iqr_s": quartiles[2] - quartiles[0], "samples_s": samples[name][clock],
                        "wall_median_s": statistics.median(samples[name]["wall"]),
                        "process_median_s": statistics.median(samples[name]["process"]),
                        "inner": inner[name], "clock": clock}
    return result


def round_ratios(stats: dict[str, dict], numerator: str, denominator: str) -> dict:
    """The ratio of two variants of one :func:`interleaved_medians` call, repetition by repetition (both ran in
    the same round, so a slow minute of a shared machine hits both): ``{"median", "min", "max", "rounds"}``."""
    ratios = [a / b for a, b in zip(stats[numerator]["samples_s"], stats[denominator]["samples_s"])]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": len(ratios)}


# ----------------------------------------------------------------------------- memory

def _proc_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _release_free_heap() -> None:
    gc.collect()
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)  # not glibc: the baseline may then include cached free memory


def _set_mmap_threshold(libc, size: int) -> None:
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(M_MMAP_THRESHOLD, size)


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Extra memory at the peak of one call of ``fn`` (see the module docstring), or None."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    libc = _libc()
    _set_mmap_threshold(libc, PROBE_MMAP_THRESHOLD)
    try:
        fn()                       # the live state (e.g. gradients) now sits in mappings of its own
        _release_free_heap()
        before = _proc_status_kib("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # "5" resets the peak-RSS counter (Linux >= 4.0)
        except OSError:
            return None
        fn()
        peak = _proc_status_kib("VmHWM")
    finally:
        _set_mmap_threshold(libc, DEFAULT_MMAP_THRESHOLD)
    if before is None or peak is None:
        return None
    return max(0, peak - before) * 1024


def memory_method(device: torch.device) -> str:
    return CUDA_MEMORY_METHOD if device.type == "cuda" else CPU_MEMORY_METHOD


# ----------------------------------------------------------------------------- machine

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device) -> dict:
    """What the numbers were measured on (a shared machine's load average included)."""
    info = {"cpu_model": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch_version": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "device": str(device),
            "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda_version"] = torch.version.cuda
    return info
