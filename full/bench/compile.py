"""When does ``full.train --compile`` pay off? Eager vs ``torch.compile``d training step, and the break-even.

    python -m full.bench.compile --preset pMF-T/4 --batch 16                 # CPU, ~10 min (compilation)
    python -m full.bench.compile --preset pMF-B/16 --batch 64 --device cuda --out bench_gpu/     # bench_gpu/compile.json

The step is the trainer's: :class:`full.step.TrainingStep` (released recipe, perceptual loss off)
forward, JVP included, and backward, compiled the way ``--compile`` does it (``torch.compile`` of the
objective module, so Dynamo / AOTAutograd compile forward and backward). The optimiser update, the
same in both, is left out. Eager and compiled steps are timed interleaved in one process
(full.bench.timing); compilation time is the first compiled call's wall time minus an eager call's.

    break-even steps = compile seconds / (eager s per step - compiled s per step)

-- compiling pays off for runs longer than that (never, when the compiled step is not faster).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

from .timing import interleaved_medians, machine_info, synchronize
from .. import cli
from ..io import write_json
from ..model import build_model
from ..presets import PRESETS
from ..step import TrainingStep

NUM_CLASSES = 10   # the label count does not change the step's cost beyond one embedding row


def break_even_steps(compile_s: float, eager_s: float, compiled_s: float) -> float | None:
    """Steps after which compiling has saved its own compilation time; None if the compiled step is not faster."""
    saved_per_step = eager_s - compiled_s
    return compile_s / saved_per_step if saved_per_step > 0 else None


def training_step(objective: Callable, parameters: list[torch.nn.Parameter], x: torch.Tensor, y: torch.Tensor,
                  randomness) -> Callable[[], None]:
    """``() -> None``: clear gradients, the objective's batch-mean loss, backward."""
    def step() -> None:
        for parameter in parameters:
            parameter.grad = None
        objective(x, y, randomness)["loss"].backward()
    return step


def compile_row(preset: str, batch: int, *, device: torch.device, warmup: int = 2, repeats: int = 5,
                clock: str = "wall", compiler: Callable = torch.compile, seed: int = 0) -> dict:
    """Time one preset's training step eager and compiled (``compiler(objective)``); one result row."""
    torch.manual_seed(seed)
    model = build_model(preset, num_classes=NUM_CLASSES).to(device)
    objective = TrainingStep.from_preset(model, preset).to(device).train()
    generator = torch.Generator(device).manual_seed(seed)
    shape = (model.channels, model.resolution, model.resolution)
    x = torch.rand(batch, *shape, generator=generator, device=device) * 2 - 1
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=generator, device=device)
    randomness = objective.draw_randomness(x, generator=generator)
    parameters = list(model.parameters())
    steps = {"eager": training_step(objective, parameters, x, y, randomness),
             "compiled": training_step(compiler(objective), parameters, x, y, randomness)}
    first = {}
    for name in ("eager", "compiled"):       # the compiled step's first call compiles
        synchronize(device)
        start = time.perf_counter()
        steps[name]()
        synchronize(device)
        first[name] = time.perf_counter() - start
    timings = interleaved_medians(steps, device=device, warmup=warmup, repeats=repeats, clock=clock)
    eager_s, compiled_s = timings["eager"]["median_s"], timings["compiled"]["median_s"]
    compile_s = max(first["compiled"] - first["eager"], 0.0)
    return {"preset": preset, "batch": batch, "device": str(device), "clock": clock,
            "eager_ms": 1e3 * eager_s, "compiled_ms": 1e3 * compiled_s, "speedup": eager_s / compiled_s,
            "compile_s": compile_s, "break_even_steps": break_even_steps(compile_s, eager_s, compiled_s),
            "timings": timings}


def markdown_row(row: dict) -> str:
    """``| preset | batch | device | eager ms | compiled ms | speed-up | compile s | pays off after |``."""
    steps = "never" if row["break_even_steps"] is None else f"{row['break_even_steps']:,.0f} steps"
    return (f"| {row['preset']} | {row['batch']} | {row['device']} | {row['eager_ms']:.1f} | {row['compiled_ms']:.1f} "
            f"| {row['speedup']:.2f}x | {row['compile_s']:.0f} | {steps} |")


RESULT_NAME = "compile.json"
MARKDOWN_HEADER = ("| preset | batch | device | eager ms / step | compiled ms / step | speed-up | compile s | "
                   "pays off after |\n|---|---:|---|---:|---:|---:|---:|---:|")


def main(argv: list[str] | None = None) -> None:
    parser = cli.Parser("python -m full.bench.compile", __doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="pMF-T/4", help=f"one of {' '.join(sorted(PRESETS))}")
    parser.add_argument("--batch", type=int, default=16, help="images per step")
    cli.add_device(parser, default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads on CPU")
    parser.add_argument("--repeats", type=int, default=5, help="timing samples per variant (median)")
    parser.add_argument("--clock", choices=("wall", "process"), default="wall",
                        help="process: CPU time of this process (steadier on a shared CPU; not for GPU)")
    parser.add_argument("--out", default=None, metavar="DIR",
                        help=f"output folder: {RESULT_NAME}, the row and the machine (the table is printed either way)")
    cli.add_json(parser, "the row and the machine")
    args = parser.parse_args(argv)
    if args.preset not in PRESETS:
        parser.error(f"--preset: unknown preset {args.preset!r}; choose one of {sorted(PRESETS)}")
    for flag, value in (("--batch", args.batch), ("--threads", args.threads), ("--repeats", args.repeats)):
        if value < 1:
            parser.error(f"{flag} must be >= 1, got {value}")
    device = cli.resolve_device(parser, args.device)
    if args.out is not None:
        cli.check_out(parser, args.out)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    row = compile_row(args.preset, args.batch, device=device, repeats=args.repeats, clock=args.clock)
    record = {**row, "machine": machine_info(device), "threads": args.threads}
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        print(MARKDOWN_HEADER)
        print(markdown_row(row))
    if args.out:
        write_json(Path(args.out) / RESULT_NAME, record)



if __name__ == "__main__":
    main()
