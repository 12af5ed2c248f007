"""Run the tutorials in full mode and hold every number their prose quotes against what they printed.

    python tutorials/check_full_mode.py                 # all tutorials, ~10 CPU-minutes
    python tutorials/check_full_mode.py 05 06           # some of them
    python tutorials/check_full_mode.py --logs DIR      # re-check the logs of an earlier run (no rerun)
    python tutorials/check_full_mode.py --figures tutorials/figures   # also refresh the committed PNGs

A tutorial prints its numbers as ``name = value`` lines (``_common.report``). Its markdown states,
next to each number it quotes, a hidden check (an HTML comment, invisible in a rendered notebook)::

    # ... sliced W2 0.91 at one step ...
    # <!-- check: sliced W2 to data, x-pred, 1 steps = 0.91 -->
    # <!-- check: sliced W2 to data, seed * in [0.30, 0.36] -->     (a range over seeds: every match inside)
    # <!-- check: name one < name two -->                           (an ordering the prose claims)
    # <!-- given: 3.53 194.53 -->                                   (numbers from the paper, not the run)

Tolerance: a quoted value q with last digit of size d (0.91: d = 0.01; 88: d = 1; 94%: d = 0.01)
passes when |printed - q| <= max(d, 0.05 |q|) -- the rounding of the prose plus 5% for what changes
between machines (BLAS kernels, thread timing); a range [lo, hi] widens by d at each end.

Completeness: every decimal number and percentage in a markdown cell's prose (outside formulas,
code spans) must be one of that cell's check values, a number inside one of its checks' names (a
parameter of the measured quantity, like the 0.9 of "share of t above 0.9") or a ``given`` number;
otherwise it is reported as *unchecked* and the run fails. So a number cannot enter the prose
without a check, and a recipe change that moves a number fails here instead of going stale.
"""
from __future__ import annotations

import argparse
import fnmatch
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

TUTORIALS = Path(__file__).resolve().parent
REPO_ROOT = TUTORIALS.parent
RELATIVE_TOLERANCE = 0.05
NUMBER_LINE = re.compile(r"^(?P<name>.+?) = (?P<value>[-+0-9.eEinfa]+)$")
CELL_MARKER = re.compile(r"^# %%.*$", flags=re.MULTILINE)
CHECK = re.compile(r"<!--\s*check:\s*(?P<body>.+?)\s*-->", flags=re.DOTALL)
GIVEN = re.compile(r"<!--\s*given:\s*(?P<body>.+?)\s*-->", flags=re.DOTALL)
LITERAL = re.compile(r"(?<![\w.^/-])(\d+(?:\.\d+)?%|\d+\.\d+)")
RANGE = re.compile(r"^(?P<name>.+?) in \[(?P<low>[^,\]]+),\s*(?P<high>[^\]]+)\]$")
ORDER = re.compile(r"^(?P<left>.+?) (?P<op>[<>]) (?P<right>.+)$")
EQUAL = re.compile(r"^(?P<name>.+?) = (?P<value>\S+)$")


@dataclass
class Result:
    tutorial: str
    check: str
    printed: str
    ok: bool


def parse_quantity(text: str) -> tuple[float, float]:
    """'0.91' -> (0.91, 0.01); '94%' -> (0.94, 0.01); '88' -> (88, 1)."""
    text = text.strip()
    percent = text.endswith("%")
    digits = text.rstrip("%")
    decimals = len(digits.split(".")[1]) if "." in digits else 0
    value, unit = float(digits), 10.0 ** -decimals
    return (value / 100, unit / 100) if percent else (value, unit)


def markdown_cells(source: str) -> list[str]:
    """The markdown cells of a percent script, comment markers removed."""
    cells = []
    parts = re.split(r"^(# %%.*)$", source, flags=re.MULTILINE)
    for marker, body in zip(parts[1::2], parts[2::2]):
        if "[markdown]" in marker:
            cells.append("\n".join(line[2:] if line.startswith("# ") else line.lstrip("#") for line in body.splitlines()))
    return cells


def printed_numbers(log: str) -> dict[str, float]:
    numbers = {}
    for line in log.splitlines():
        match = NUMBER_LINE.match(line.strip())
        if match:
            numbers[match["name"]] = float(match["value"])
    return numbers


def matching(numbers: dict[str, float], pattern: str) -> dict[str, float]:
    if pattern in numbers:
        return {pattern: numbers[pattern]}
    return {name: value for name, value in numbers.items() if ("*" in pattern or "?" in pattern) and fnmatch.fnmatchcase(name, pattern)}


def within(printed: float, quoted: float, unit: float) -> bool:
    return abs(printed - quoted) <= max(unit, RELATIVE_TOLERANCE * abs(quoted)) + 1e-12


def evaluate(body: str, numbers: dict[str, float]) -> tuple[bool, str, list[str]]:
    """(passed, what was printed, the literals this check covers)."""
    body = " ".join(body.split())
    if match := RANGE.match(body):
        (low, unit_low), (high, unit_high) = parse_quantity(match["low"]), parse_quantity(match["high"])
        found = matching(numbers, match["name"])
        ok = bool(found) and all(low - unit_low - 1e-12 <= v <= high + unit_high + 1e-12 for v in found.values())
        return ok, ", ".join(f"{v:.4g}" for v in found.values()) or "not printed", [match["low"], match["high"]]
    if match := EQUAL.match(body):
        quoted, unit = parse_quantity(match["value"])
        found = matching(numbers, match["name"])
        ok = bool(found) and all(within(v, quoted, unit) for v in found.values())
        return ok, ", ".join(f"{v:.4g}" for v in found.values()) or "not printed", [match["value"]]
    if match := ORDER.match(body):
        left, right = numbers.get(match["left"]), numbers.get(match["right"])
        if left is None or right is None:
            return False, "not printed", []
        return (left < right) if match["op"] == "<" else (left > right), f"{left:.4g} {match['op']} {right:.4g}", []
    return False, "unreadable check", []


def prose_literals(cell: str) -> list[str]:
    text = re.sub(r"<!--.*?-->", " ", cell, flags=re.DOTALL)
    text = re.sub(r"\$\$.*?\$\$", " ", text, flags=re.DOTALL)
    text = re.sub(r"\$[^$]*\$", " ", text)
    text = re.sub(r"`[^`]*`", " ", text)
    return LITERAL.findall(text)


def check_tutorial(path: Path, log: str) -> tuple[list[Result], list[str]]:
    numbers = printed_numbers(log)
    results, unchecked = [], []
    for cell in markdown_cells(path.read_text()):
        covered: set[float] = set()
        for match in CHECK.finditer(cell):
            ok, printed, literals = evaluate(match["body"], numbers)
            results.append(Result(path.name[:2], " ".join(match["body"].split()), printed, ok))
            covered.update(parse_quantity(literal)[0] for literal in literals)
            # a number inside a check's name is a parameter of what is measured ("share of t above 0.9")
            covered.update(parse_quantity(literal)[0] for literal in LITERAL.findall(match["body"]))
        for match in GIVEN.finditer(cell):
            covered.update(parse_quantity(literal)[0] for literal in match["body"].replace(",", " ").split())
        for literal in prose_literals(cell):
            if not any(abs(parse_quantity(literal)[0] - value) < 1e-9 for value in covered):
                unchecked.append(f"{path.name[:2]}: {literal!r} in the prose has no check")
    return results, unchecked


def run_tutorial(path: Path, log_dir: Path, figure_dir: Path) -> tuple[str, float]:
    env = {**os.environ, "PMF_TUTORIAL_FAST": "0", "MPLBACKEND": "Agg", "PMF_TUTORIAL_OUT": str(figure_dir),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    completed = subprocess.run([sys.executable, str(path)], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    log = completed.stdout + completed.stderr
    (log_dir / f"{path.name[:2]}.log").write_text(log)
    if completed.returncode:
        raise SystemExit(f"{path.name} failed (exit {completed.returncode}):\n{log[-3000:]}")
    return log, seconds


def save_small_figures(source: Path, target: Path, number: str, max_width: int = 900) -> None:
    """Copy a run's figures into ``target`` as small palette PNGs named ``NN_<figure>.png``."""
    from PIL import Image
    target.mkdir(parents=True, exist_ok=True)
    for png in sorted(source.glob("*.png")):
        image = Image.open(png).convert("RGB")
        if image.width > max_width:
            image = image.resize((max_width, round(image.height * max_width / image.width)), Image.LANCZOS)
        temporary = target / f".{number}_{png.name}.tmp"
        image.quantize(colors=128).save(temporary, format="PNG", optimize=True)
        os.replace(temporary, target / f"{number}_{png.name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("numbers", nargs="*", help="tutorial numbers, e.g. 05 06 (default: all)")
    parser.add_argument("--logs", type=Path, help="check the NN.log files in this folder instead of running")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs" / "tutorials_full",
                        help="where logs and figures of this run go")
    parser.add_argument("--figures", type=Path, help="also write small copies of every figure here")
    args = parser.parse_args(argv)
    paths = sorted(TUTORIALS.glob("[0-9][0-9]_*.py"))
    if args.numbers:
        paths = [p for p in paths if p.name[:2] in args.numbers]
    results, unchecked, times = [], [], {}
    for path in paths:
        number = path.name[:2]
        if args.logs:
            log = (args.logs / f"{number}.log").read_text()
        else:
            (args.out / number).mkdir(parents=True, exist_ok=True)
            log, times[number] = run_tutorial(path, args.out, args.out / number)
            if args.figures:
                save_small_figures(args.out / number, args.figures, number)
        tutorial_results, tutorial_unchecked = check_tutorial(path, log)
        results += tutorial_results
        unchecked += tutorial_unchecked
        passed = sum(r.ok for r in tutorial_results)
        timing = f", {times[number]:.0f} s" if number in times else ""
        print(f"{path.name}: {passed}/{len(tutorial_results)} checks passed{timing}", flush=True)
        for r in tutorial_results:
            if not r.ok:
                print(f"  FAIL  {r.check}   (printed: {r.printed})")
    for line in unchecked:
        print(f"  UNCHECKED  {line}")
    passed = sum(r.ok for r in results)
    total_time = f" in {sum(times.values()):.0f} s" if times else ""
    print(f"full-mode check: {passed}/{len(results)} quoted numbers and claims hold "
          f"(tolerance max(last digit, {RELATIVE_TOLERANCE:.0%})), {len(unchecked)} unchecked{total_time}")
    return 0 if passed == len(results) and not unchecked else 1


if __name__ == "__main__":
    sys.exit(main())
