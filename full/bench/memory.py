"""What fits on a GPU: the released step's peak memory per image, and the per-GPU batch and ``--accum-steps``
that reach the global batch 1024 on 40 and 80 GB (``python -m full.bench --sections memory``).

Measured, on the machine the bench runs on (a CPU: the resident set's high-water mark, see
``full.bench.timing``; a GPU: ``torch.cuda.max_memory_allocated``), for every preset at its own resolution:
the released step (float32, perceptual nets off) at batch 1 and 2; the difference is the **per-image
slope**, what one more image costs in activations. A preset too large for the machine is measured with
fewer blocks (3 and 6: trunk + u-head + v-head of 1+1+1 and 2+2+2) and extrapolated along the block count
(:func:`estimate_slope`: linearly without checkpointing, where every block keeps the same tensors per image;
with it, the 6-block figure plus each further block's saved input); the presets
measured whole (:data:`MEASURE_WHOLE`, and those no deeper than 6 blocks) are measured both ways, which checks
the extrapolation.

The fit adds what does not grow with the batch, counted from the parameter count (:func:`static_bytes`):
float32 weights, gradients, DDP's gradient buckets, Muon's momentum (2-D matrices) and NAdam's two moments
(the rest), and the three EMA copies; then ``micro-batch = the largest power of two with
static + micro-batch x slope <= USABLE_FRACTION x GPU memory`` and ``--accum-steps = (1024 / GPUs) / micro-batch``.
"""
from __future__ import annotations

import gc

import torch
from torch import nn

from .timing import peak_memory_bytes
from .training import released_step
from ..model import NUM_PREFIX_TOKENS, build_model
from ..presets import ARCHITECTURES

GLOBAL_BATCH = 1024            # pMF's global batch
GPU_GIB = (40, 80)
GPUS = 8                       # one node
USABLE_FRACTION = 0.9          # CUDA context, the allocator's fragmentation, kernel workspaces
NUM_EMAS = 3                   # half-lives 500, 1000, 2000 kimg (full.train's default)
REDUCED_DEPTHS = ((2, 1), (4, 2))   # (depth = trunk + u-head, head_depth): 3 and 6 blocks with the v-head
MEASURE_WHOLE = ("pMF-B/16",)       # measured whole too (checks the extrapolation); the rest: minutes to hours
MIB, GIB = 2 ** 20, 2 ** 30
FLOAT32 = 4


def static_bytes(preset: str) -> dict[str, int]:
    """Bytes per GPU that do not grow with the batch (DDP, float32), from the parameter shapes."""
    with torch.device("meta"):
        model = build_model(preset)
    total = sum(p.numel() for p in model.parameters())
    muon = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    parts = {"weights": FLOAT32 * total, "gradients": FLOAT32 * total, "ddp_buckets": FLOAT32 * total,
             "optimizer": FLOAT32 * (muon + 2 * (total - muon)), "emas": FLOAT32 * NUM_EMAS * total}
    parts["total"] = sum(parts.values())
    return parts


def blocks(depth: int, head_depth: int) -> int:
    """Blocks of the training network: trunk + u-head (``depth``) and the v-head."""
    return depth + head_depth


def step_peak_bytes(preset: str, batch: int, *, device: torch.device, activation_checkpointing: bool,
                    **overrides) -> int | None:
    """Peak bytes of one released step above the live model and its gradients (the probe of ``full.bench.timing``,
    whose first, untimed call allocates the gradients; later calls accumulate into them)."""
    step, model = released_step(preset, batch, device=device, activation_checkpointing=activation_checkpointing,
                                keep_grads=True, **overrides)
    peak = peak_memory_bytes(step, device)
    del step, model
    gc.collect()
    return peak


def per_image(preset: str, *, device: torch.device, activation_checkpointing: bool, batches=(1, 2),
              **overrides) -> dict:
    """``{"peak_mib": {batch: MiB}, "slope_mib": MiB per image}`` of one configuration."""
    peaks = {b: step_peak_bytes(preset, b, device=device, activation_checkpointing=activation_checkpointing,
                                **overrides) for b in batches}
    if any(p is None for p in peaks.values()):
        return {"peak_mib": None, "slope_mib": None}
    low, high = batches[0], batches[-1]
    return {"peak_mib": {b: p / MIB for b, p in peaks.items()},
            "slope_mib": (peaks[high] - peaks[low]) / (high - low) / MIB}


def fit(static: int, slope_bytes: float, gpu_gib: float, *, gpus: int = GPUS,
        global_batch: int = GLOBAL_BATCH) -> dict:
    """The largest power-of-two micro-batch that fits, and the accumulation that reaches the global batch."""
    per_gpu = global_batch // gpus
    room = USABLE_FRACTION * gpu_gib * GIB - static
    max_images = int(room // slope_bytes) if room > 0 else 0
    micro = 1
    while micro * 2 <= min(max_images, per_gpu):
        micro *= 2
    if max_images < 1:
        return {"max_images": max_images, "micro_batch": None, "accum_steps": None}
    return {"max_images": max_images, "micro_batch": micro, "accum_steps": per_gpu // micro}


def block_input_mib(preset: str) -> float:
    """MiB one checkpointed block keeps per image: its float32 input, (20 + N) tokens x width."""
    arch = ARCHITECTURES[preset]
    return (NUM_PREFIX_TOKENS + (arch.resolution // arch.patch) ** 2) * arch.width * FLOAT32 / MIB


def estimate_slope(preset: str, reduced: dict, recompute: bool) -> float | None:
    """MiB per image of the whole network from the 3- and 6-block measurements (``reduced``: blocks -> per_image).

    Without checkpointing every block keeps the same activations: linear in the block count through the two
    points. With checkpointing a block's activations live only while it is recomputed, so the peak is one
    block's transient plus the saved block inputs: the 6-block slope plus :func:`block_input_mib` per further
    block (the line through 3 and 6 blocks is the wrong model there: measured on B/16, 32 blocks took less
    than 6, within the probe's noise of tens of MiB).
    """
    points = sorted((int(b), value) for b, value in reduced.items())
    arch = ARCHITECTURES[preset]
    full_blocks = blocks(arch.depth, arch.head_depth)
    if recompute:
        b_high, high = points[-1]
        return None if high["slope_mib"] is None else high["slope_mib"] + (full_blocks - b_high) * block_input_mib(preset)
    (b_low, low), (b_high, high) = points
    if low["slope_mib"] is None or high["slope_mib"] is None:
        return None
    per_block = (high["slope_mib"] - low["slope_mib"]) / (b_high - b_low)
    return low["slope_mib"] + (full_blocks - b_low) * per_block


def summarise(preset: str, recompute: bool, reduced: dict, measured: dict | None, device: str) -> dict:
    """One table row from the measurements: the slope (measured whole, else estimated) and the fits."""
    arch = ARCHITECTURES[preset]
    static = static_bytes(preset)
    estimated = estimate_slope(preset, reduced, recompute)
    slope = measured["slope_mib"] if measured is not None else estimated
    return {"preset": preset, "resolution": arch.resolution, "activation_checkpointing": recompute,
            "blocks": blocks(arch.depth, arch.head_depth), "device": device,
            "reduced": {str(b): value for b, value in reduced.items()}, "slope_mib_extrapolated": estimated,
            "measured_whole": measured, "slope_mib": slope,
            "slope_source": "measured whole" if measured is not None else "from 3 and 6 blocks",
            "static_gib": static["total"] / GIB,
            "fits": {str(gib): (None if slope is None else fit(static["total"], slope * MIB, gib)) for gib in GPU_GIB}}


def memory_rows(presets: tuple[str, ...], *, device: torch.device, measure_whole: tuple[str, ...] = MEASURE_WHOLE,
                checkpointing: tuple[bool, ...] = (False, True), progress=None) -> list[dict]:
    """Per preset and checkpointing setting: the measured peaks, the per-image slope and the fits."""
    rows = []
    for preset in presets:
        arch = ARCHITECTURES[preset]
        whole = preset in measure_whole or blocks(arch.depth, arch.head_depth) <= max(map(sum, REDUCED_DEPTHS))
        for recompute in checkpointing:
            depths = REDUCED_DEPTHS if whole or not recompute else REDUCED_DEPTHS[-1:]   # estimate_slope's needs
            reduced = {blocks(d, h): per_image(preset, device=device, activation_checkpointing=recompute,
                                               depth=d, head_depth=h) for d, h in depths}
            measured = per_image(preset, device=device, activation_checkpointing=recompute) if whole else None
            rows.append(summarise(preset, recompute, reduced, measured, str(device)))
            if progress is not None:
                progress.update(1)
    return rows


def format_memory_table(rows: list[dict]) -> str:
    """Markdown: per preset and checkpointing, MiB per image, the static GiB and the 40 / 80 GB fits."""
    lines = [f"Released step (float32, perceptual nets off), peak memory per image measured on {rows[0]['device']}; "
             f"fits for {GPUS} GPUs of 40 / 80 GiB at global batch {GLOBAL_BATCH} (micro-batch x --accum-steps per GPU), "
             f"{USABLE_FRACTION:.0%} of the GPU usable", "",
             "| preset | res | checkpointing | MiB / image | how | static GiB | 40 GB: micro x accum | "
             "80 GB: micro x accum |", "|---|---:|---|---:|---|---:|---:|---:|"]
    for row in rows:
        def cell(key):
            fitted = row["fits"][key]
            if fitted is None:
                return "-"
            if fitted["micro_batch"] is None:
                return "does not fit"
            return f"{fitted['micro_batch']} x {fitted['accum_steps']} (max {fitted['max_images']})"
        slope = "-" if row["slope_mib"] is None else f"{row['slope_mib']:.0f}"
        check = ("" if row["measured_whole"] is None or row["slope_mib_extrapolated"] is None
                 else f" (from 3 and 6 blocks: {row['slope_mib_extrapolated']:.0f})")
        lines.append(f"| {row['preset']} | {row['resolution']} | {'on' if row['activation_checkpointing'] else 'off'} "
                     f"| {slope} | {row['slope_source']}{check} | {row['static_gib']:.1f} | {cell('40')} | {cell('80')} |")
    return "\n".join(lines)


__all__ = ["GLOBAL_BATCH", "GPU_GIB", "GPUS", "static_bytes", "per_image", "fit", "estimate_slope", "summarise",
           "memory_rows",
           "format_memory_table"]
