"""The released training step at a preset's own shapes, per precision: images/s, peak memory, model FLOP
utilisation and host syncs (``python -m full.bench --sections precision``; ``--device cuda`` on a GPU).

A step is: gradients cleared, the trainer's objective (released recipe: the batched no-grad guidance pass,
the JVP pass, the losses; perceptual nets off) under the precision policy's autocast, and its backward.
The optimiser update is left out, as everywhere in ``full.bench``. Model FLOPs per image are
``full.params.training_gmacs`` (2 FLOPs per MAC); utilisation divides the achieved FLOP/s by the device's
peak for that precision (:data:`PEAK_TFLOPS`, dense, by GPU name; ``--peak-tflops`` overrides; unknown
devices -- every CPU -- report the achieved TFLOP/s only).
"""
from __future__ import annotations

from typing import Callable

import torch

from .syncs import count_host_syncs
from .timing import interleaved_medians, peak_memory_bytes, round_ratios
from ..model import PMFViT, build_model
from ..params import training_gmacs
from ..precision import PRECISIONS, apply_precision, autocast
from ..step import TrainingStep

NUM_CLASSES = 1000
SEED = 0
MB = 2 ** 20
PEAK_TFLOPS = {   # dense tensor-core peaks from the vendors' data sheets, by a substring of the device name
    "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
    "H100 PCIe": {"fp32": 51.2, "tf32": 378.0, "bf16": 756.0},
    "H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},     # SXM
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0},
}


def peak_tflops(device: torch.device, precision: str) -> float | None:
    """The device's dense peak TFLOP/s for ``precision`` from :data:`PEAK_TFLOPS`, or None if unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS.items():    # "H100 PCIe" is tried before "H100"
        if key in name:
            return peaks[precision]
    return None


def released_step(preset: str, batch: int, *, device: torch.device, precision: str = "fp32",
                  activation_checkpointing: bool = False, seed: int = SEED, keep_grads: bool = False,
                  **overrides) -> tuple[Callable[[], None], PMFViT]:
    """``(step, model)``: ``step(precision)`` is one released training step on fixed random data at the
    preset's shapes (``overrides`` go to ``build_model``, e.g. ``resolution=64`` or fewer blocks).
    ``keep_grads``: accumulate into the gradients instead of clearing them, so that after the first call a
    step allocates no gradient memory (a memory probe then sees the activations alone)."""
    torch.manual_seed(seed)
    model = build_model(preset, num_classes=NUM_CLASSES, activation_checkpointing=activation_checkpointing,
                        **overrides).to(device)
    objective = TrainingStep.from_preset(model, preset)
    generator = torch.Generator(device).manual_seed(seed)
    shape = (model.channels, model.resolution, model.resolution)
    randomness = objective.draw_randomness(torch.empty(batch, *shape, device=device), generator=generator)
    x = torch.rand(batch, *shape, generator=generator, device=device) * 2 - 1
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=generator, device=device)
    parameters = list(model.parameters())

    def step(policy: str = precision) -> None:
        for parameter in parameters if not keep_grads else ():
            parameter.grad = None
        with autocast(policy, device):          # every pass, the JVP's included (full.precision)
            loss = objective(x, y, randomness)["loss"]
        loss.backward()
    return step, model


def precision_rows(preset: str, batch: int, precisions: tuple[str, ...], *, device: torch.device, warmup: int,
                   repeats: int, clock: str, memory: bool = True, peak_tflops_override: float | None = None,
                   activation_checkpointing: bool = False, progress=None, **overrides) -> list[dict]:
    """One row per precision: ms / step, images / s, peak memory, TFLOP/s, utilisation, host syncs.
    The precisions run interleaved on one network (each call sets its TF32 switches and autocast)."""
    step, model = released_step(preset, batch, device=device, activation_checkpointing=activation_checkpointing,
                                **overrides)

    def with_precision(name: str) -> Callable[[], None]:
        def call() -> None:
            apply_precision(name, device)
            step(name)
        return call
    steps = {name: with_precision(name) for name in precisions}
    stats = interleaved_medians(steps, device=device, warmup=warmup, repeats=repeats, clock=clock, progress=progress)
    gmacs = training_gmacs(preset, **overrides)
    flops = 2e9 * gmacs["total"]
    rows = []
    for name in precisions:
        seconds = stats[name]["median_s"]
        images_per_s = batch / seconds
        achieved = flops * images_per_s / 1e12
        peak = peak_tflops_override if peak_tflops_override is not None else peak_tflops(device, name)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        peak_bytes = peak_memory_bytes(steps[name], device) if memory else None
        rows.append({"preset": preset, "resolution": model.resolution, "batch": batch, "precision": name,
                     "device": str(device), "activation_checkpointing": activation_checkpointing,
                     "median_ms": 1e3 * seconds, "iqr_ms": 1e3 * stats[name]["iqr_s"], "clock": clock,
                     "images_per_s": images_per_s, "training_gflops_per_image": flops / 1e9,
                     "step_in_forwards_counted": gmacs["total"] / gmacs["forward"],
                     "achieved_tflops": achieved, "peak_tflops": peak,
                     "model_flop_utilisation": None if peak is None else achieved / peak,
                     "peak_memory_mb": None if peak_bytes is None else peak_bytes / MB,
                     "peak_allocated_mb": (torch.cuda.max_memory_allocated(device) / MB
                                           if device.type == "cuda" and memory else None),
                     "host_syncs": count_host_syncs(steps[name])})
    for name, row in zip(precisions, rows):
        # round by round: the first precision's step over this one's, both timed in the same round
        speedup = round_ratios(stats, precisions[0], name)
        row["speedup_vs_" + precisions[0]] = speedup["median"]
        row["speedup_range"] = [speedup["min"], speedup["max"]]
    return rows


__all__ = ["PEAK_TFLOPS", "peak_tflops", "released_step", "precision_rows", "PRECISIONS"]
