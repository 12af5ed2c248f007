"""Where the time of a pass goes, op by op, against the pass it is measured in units of.

A missed ratio target (``full.bench.harness.TARGETS``) is printed with one of these tables: the pass in
question (the JVP, the released step, the bf16 step) and its unit (the forward, the fp32 step) each run once
under ``torch.profiler`` (CPU activities) after one warm-up call, and every op's self CPU time is listed with
its *excess*: the pass's time minus what the target allows for that op, ``bound x unit`` (a ``<=`` target in
units of the unit pass) or ``unit / bound`` (a ``>=`` speed-up). The ops with the largest excess are where the
target is lost. Profiler times include the profiler's own overhead (a few us per op), so the totals read
higher than the timed medians; the split between ops is what the table is for. The minor page faults of each
profiled call are counted too: memory glibc handed back to the OS and takes again is zeroed page by page by the
kernel, a cost no op's self time shows.
"""
from __future__ import annotations

from typing import Callable

try:
    import resource
except ImportError:          # not on Windows: no page-fault count there
    resource = None

import torch
from torch.profiler import ProfilerActivity, profile

TOP_OPS = 10


def minor_page_faults() -> int | None:
    """This process's minor page faults so far (a fresh page of memory touched for the first time), or None."""
    return None if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def op_self_ms(fn: Callable[[], object]) -> tuple[dict[str, tuple[float, int]], int | None]:
    """(op name -> (self CPU ms, calls), minor page faults) of one call of ``fn`` (after one untimed call)."""
    fn()
    faults = minor_page_faults()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    faults = None if faults is None else minor_page_faults() - faults
    return {event.key: (event.self_cpu_time_total / 1e3, event.count) for event in prof.key_averages()}, faults


def excess_profile(pass_name: str, pass_fn: Callable[[], object], unit_name: str, unit_fn: Callable[[], object],
                   allowed: float, top: int = TOP_OPS) -> dict:
    """Profile ``pass_fn`` and ``unit_fn``; per op ``excess_ms = pass_ms - allowed * unit_ms``.

    Returns:
        ``{"pass", "unit", "allowed", "total": {...}, "minor_page_faults": {...}, "ops": [...]}``: one row per op among the ``top`` of the
        pass by self time and the ``top`` by excess (each row: op, pass_ms, pass_calls, unit_ms, unit_calls,
        excess_ms), sorted by excess, largest first; ``total`` sums every op.
    """
    (passed, pass_faults), (unit, unit_faults) = op_self_ms(pass_fn), op_self_ms(unit_fn)
    rows = []
    for name in set(passed) | set(unit):
        pass_ms, pass_calls = passed.get(name, (0.0, 0))
        unit_ms, unit_calls = unit.get(name, (0.0, 0))
        rows.append({"op": name, "pass_ms": pass_ms, "pass_calls": pass_calls, "unit_ms": unit_ms,
                     "unit_calls": unit_calls, "excess_ms": pass_ms - allowed * unit_ms})
    by_time = sorted(rows, key=lambda row: -row["pass_ms"])[:top]
    by_excess = sorted(rows, key=lambda row: -row["excess_ms"])[:top]
    chosen = sorted({id(row): row for row in by_time + by_excess}.values(), key=lambda row: -row["excess_ms"])
    total_pass, total_unit = sum(row["pass_ms"] for row in rows), sum(row["unit_ms"] for row in rows)
    return {"pass": pass_name, "unit": unit_name, "allowed": allowed,
            "total": {"pass_ms": total_pass, "unit_ms": total_unit, "excess_ms": total_pass - allowed * total_unit},
            "minor_page_faults": {"pass": pass_faults, "unit": unit_faults},
            "ops": chosen}


def format_profile(target: str, profile_: dict) -> str:
    """A markdown table of :func:`excess_profile`'s result for a missed ``target``."""
    p, allowed = profile_, profile_["allowed"]
    lines = [f"Profile for the missed target {target}: {p['pass']} vs {allowed:.3g} x {p['unit']} "
             f"(self CPU ms by op, one call each under torch.profiler; excess = {p['pass']} - "
             f"{allowed:.3g} x {p['unit']})", "",
             f"| op | {p['pass']} ms | calls | {p['unit']} ms | calls | excess ms |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {row['op']} | {row['pass_ms']:.1f} | {row['pass_calls']} | {row['unit_ms']:.1f} | "
              f"{row['unit_calls']} | {row['excess_ms']:+.1f} |" for row in p["ops"]]
    total = p["total"]
    lines.append(f"| all ops | {total['pass_ms']:.1f} | | {total['unit_ms']:.1f} | | {total['excess_ms']:+.1f} |")
    faults = p.get("minor_page_faults") or {}
    if faults.get("pass") is not None:
        lines += ["", f"Minor page faults in that call (fresh 4 KiB pages the allocator took from the OS, each "
                      f"zeroed by the kernel): {p['pass']} {faults['pass']}, {p['unit']} {faults['unit']}."]
    return "\n".join(lines)


__all__ = ["TOP_OPS", "op_self_ms", "excess_profile", "format_profile"]
