"""The trainer's settings: one frozen :class:`TrainConfig`, one :func:`check_config`, one parser.

Every bad value has one home: :func:`check_config` (and :func:`check_resume` for what a resumed run
may change). ``python -m full.train`` and ``full.train.train(TrainConfig(...))`` both go through it,
so the command line and the Python API refuse the same things with the same one-line message, which
names the flag (``--lr must be > 0, got -0.001``).

    cfg = config_from_argv(["--preset", "pMF-T/2", "--data", "synthetic", "--steps", "50"])

On ``--resume`` every flag not given on the command line comes from the checkpoint (its
``config.train``), except the machine's own (:data:`NOT_INHERITED`); the run folder is the
checkpoint's folder unless ``--out`` says otherwise.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

from . import cli
from .model import predicts_image
from .precision import PRECISIONS
from .presets import PRESETS, SAMPLING

TIME_SAMPLERS = ("full", "diagonal", "endpoint", "two_lines")
PERCEPTUAL_CHOICES = ("none", "lpips", "lpips+convnext")
MODEL_OVERRIDE_FIELDS = ("num_classes", "channels", "resolution", "patch", "noise_scale")
SEED_LIMIT = 2 ** 31   # numpy's and torch's seeds both accept [0, 2**31)
RESUME_FIXED = ("preset", *MODEL_OVERRIDE_FIELDS, "batch_size", "seed", "optimizer", "prediction", "time_sampler",
                "guidance", "ema_half_lives_kimg", "perceptual", "perceptual_pretrained", "convnext_arch",
                "perceptual_crop")
"""Fields a resumed run must share with its checkpoint: they fix the weights' shapes, the data order, the
per-step randomness, the EMA set, the optimiser state or the loss. Everything else may change on resume
(``--steps``, ``--lr`` -- applied and recorded --, ``--accum-steps``, the logging, watching and
checkpointing flags, ``--device``, ``--num-workers``, ``--fsdp``)."""
NOT_INHERITED = ("out", "resume", "overwrite", "device", "num_workers")
"""Fields a CLI resume does not take from the checkpoint: the machine's, and the run folder (a moved
folder resumes where it now is)."""
DESCRIPTION = "Train a pMF ViT on ImageNet (or any class-folder dataset): the released-code recipe, flat."
FLAG_OF = {"ema_half_lives_kimg": "--ema-kimg", "guidance": "--no-guidance", "fid_ref": "--ref"}


class UsageError(ValueError):
    """A setting, file or folder the user must fix; found before training. The message names it."""


@dataclass(frozen=True)
class TrainConfig:
    preset: str = "pMF-B/16"
    data: str | None = "synthetic"           # class-folder root, or "synthetic"
    num_classes: int | None = None           # model overrides (None: the data folder's classes, else the preset's)
    channels: int | None = None
    resolution: int | None = None
    patch: int | None = None
    noise_scale: float | None = None         # s of the noise e ~ N(0, s^2 I) (None: the preset's recipe)
    batch_size: int = 1024                   # global batch over all ranks (pMF: 1024)
    accum_steps: int = 1                     # micro-batches per rank per step (gradient accumulation)
    steps: int = 400_000
    lr: float = 1e-3                         # constant, no warm-up (pMF §6)
    seed: int = 0
    optimizer: str = "muon"                  # "muon" (pMF) | "adam" (ablation)
    prediction: str = "x"                    # "x" (pMF) | "u" (ablation: output read as u)
    time_sampler: str = "full"               # "full" (pMF) | "diagonal" | "endpoint" | "two_lines"
    guidance: bool = True                    # trained-in CFG (omega, interval, label drop)
    ema_half_lives_kimg: tuple[float, ...] = (500.0, 1000.0, 2000.0)
    perceptual: str = "lpips+convnext"       # "none" | "lpips" | "lpips+convnext" (pMF)
    perceptual_pretrained: bool = True       # False: random VGG / ConvNeXt (tests only)
    convnext_arch: str = "convnextv2_base"
    convnext_weights: str | None = None      # default: <torch hub dir>/checkpoints/convnextv2_base_22k_224_ema.pt
    perceptual_crop: int = 224
    bf16: bool = False                       # autocast the v-head passes and perceptual nets (JVP stays fp32)
    ckpt_every: int = 5000
    log_every: int = 100
    out: str = "runs/pmf"
    resume: str | None = None                # a checkpoint, a run folder (its newest), or "auto" (out's, if any)
    overwrite: bool = False                  # delete an earlier run's checkpoint / log in ``out`` (else refuse)
    num_workers: int = 8
    device: str | None = None                # None: CUDA when available
    # Watching the run (full.monitor); nothing here changes what is trained.
    sample_every: int = 0                    # steps between sample grids of every EMA and the raw weights (0: none)
    sample_omega: float | None = None        # grids' and FID's sampling settings (None: the preset's best)
    sample_t_min: float | None = None
    sample_t_max: float | None = None
    fid_every: int = 0                       # steps between FID / IS evaluations of one EMA (0: none)
    fid_num: int = 5000                      # samples per evaluation (the paper's FID-50K is offline)
    fid_ref: str | None = None               # reference statistics .npz (python -m full.evaluate ref-stats)
    inception_weights: str | None = None     # default: the torch hub cache
    tensorboard: bool = False                # scalars and grids into <out>/tensorboard
    keep_last: int = 0                       # numbered checkpoints kept (checkpoint.pt links the newest); 0: only the newest
    compile: bool = False                    # torch.compile the training step (forward, JVP and backward)
    # Sharded training (full.fsdp): FSDP2 instead of DDP; checkpoints are folders (checkpoint.dcp).
    fsdp: bool = False
    fsdp_mixed_precision: str | None = None  # None | "bf16": bf16 all-gather, fp32 reduce and compute
    # Precision, memory, first weights.
    precision: str | None = None             # "fp32" | "tf32" | "bf16" (full.precision; None: tf32 on CUDA, else fp32)
    activation_checkpointing: bool = False   # blocks keep only their input and recompute in the backward
    init_official: str | None = None         # start from the authors' released pMF-*.pt (full.finetune)

    def model_overrides(self) -> dict:
        return {name: getattr(self, name) for name in MODEL_OVERRIDE_FIELDS if getattr(self, name) is not None}


def flag_of(field: str) -> str:
    """The command-line flag of a TrainConfig field (``batch_size`` -> ``--batch-size``)."""
    return FLAG_OF.get(field, "--" + field.replace("_", "-"))


def _finite_positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def check_config(cfg: TrainConfig, world_size: int = 1) -> None:
    """Raise UsageError naming the flag and what it expects, for the first bad setting of ``cfg``."""
    at_least = {"steps": 1, "batch_size": 1, "accum_steps": 1, "ckpt_every": 1, "log_every": 1, "num_workers": 0,
                "sample_every": 0, "fid_every": 0, "keep_last": 0, "num_classes": 1}
    checks = [
        (cfg.preset in PRESETS, f"--preset: unknown preset {cfg.preset!r}; choose one of {sorted(PRESETS)}"),
        (cfg.data is not None or cfg.resume is not None,
         "--data is required (a class-folder root or 'synthetic'), unless --resume"),
        (cfg.data in (None, "synthetic") or Path(cfg.data).is_dir(),
         f"--data: folder {cfg.data!r} does not exist (expected root/<class>/<image>, or 'synthetic')"),
        *[(getattr(cfg, name) is None or getattr(cfg, name) >= minimum,
           f"{flag_of(name)} must be >= {minimum}, got {getattr(cfg, name)}") for name, minimum in at_least.items()],
        (cfg.batch_size % (world_size * max(cfg.accum_steps, 1)) == 0,
         f"--batch-size {cfg.batch_size} must be divisible by the number of processes ({world_size}) x "
         f"--accum-steps ({cfg.accum_steps})"),
        (_finite_positive(cfg.lr), f"--lr must be > 0 (and finite), got {cfg.lr}"),
        (0 <= cfg.seed < SEED_LIMIT, f"--seed must lie in [0, 2**31), got {cfg.seed}"),
        (cfg.optimizer in ("muon", "adam"), f"--optimizer must be 'muon' or 'adam', got {cfg.optimizer!r}"),
        (cfg.prediction in ("x", "u"), f"--prediction must be 'x' or 'u', got {cfg.prediction!r}"),
        (cfg.time_sampler in TIME_SAMPLERS, f"--time-sampler must be one of {TIME_SAMPLERS}, got {cfg.time_sampler!r}"),
        (cfg.perceptual in PERCEPTUAL_CHOICES, f"--perceptual must be one of {PERCEPTUAL_CHOICES}, got {cfg.perceptual!r}"),
        (len(cfg.ema_half_lives_kimg) > 0 and all(map(_finite_positive, cfg.ema_half_lives_kimg)),
         f"--ema-kimg: each half-life must be a number > 0, got {' '.join(map(str, cfg.ema_half_lives_kimg))}"),
        (cfg.fid_every == 0 or cfg.fid_ref is not None,
         "--fid-every needs --ref STATS.npz (make one with python -m full.evaluate ref-stats)"),
        (cfg.fid_every == 0 or cfg.fid_num >= 2, f"--fid-num must be >= 2, got {cfg.fid_num}"),
        *[(path is None or Path(path).is_file(), f"{flag}: {path!r} is not a file")
          for flag, path in (("--ref", cfg.fid_ref), ("--inception-weights", cfg.inception_weights))],
        (cfg.sample_omega is None or cfg.sample_omega >= 1, f"--sample-omega must be >= 1, got {cfg.sample_omega}"),
        *[(value is None or 0 <= value <= 1, f"{flag} must lie in [0, 1], got {value}")
          for flag, value in (("--sample-t-min", cfg.sample_t_min), ("--sample-t-max", cfg.sample_t_max))],
        (cfg.fsdp_mixed_precision in (None, "bf16"),
         f"--fsdp-mixed-precision must be 'bf16', got {cfg.fsdp_mixed_precision!r}"),
        (cfg.fsdp or cfg.fsdp_mixed_precision is None, "--fsdp-mixed-precision needs --fsdp"),
        (cfg.precision is None or cfg.precision in PRECISIONS,
         f"--precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}"),
        (cfg.init_official is None or cfg.resume is not None or Path(cfg.init_official).is_file(),
         f"--init-official: {cfg.init_official!r} is not a file (the authors' pMF-*.pt)"),
        (cfg.init_official is None or predicts_image(cfg.prediction),
         "--init-official needs --prediction x (the released networks predict x)"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    best = SAMPLING[cfg.preset]
    defaults = (best.omega, best.t_min, best.t_max) if cfg.guidance else (1.0, 0.0, 1.0)
    omega, t_min, t_max = (default if value is None else value for value, default in
                           zip((cfg.sample_omega, cfg.sample_t_min, cfg.sample_t_max), defaults))
    if not t_min <= t_max:
        raise UsageError(f"--sample-t-min {t_min} must not exceed --sample-t-max {t_max}")


def check_resume(cfg: TrainConfig, saved: dict, step: int) -> None:
    """UsageError unless ``cfg`` may continue a checkpoint at ``step`` trained with the settings ``saved``."""
    for name in RESUME_FIXED:
        if name not in saved:
            continue
        ours, theirs = getattr(cfg, name), saved[name]
        if name == "ema_half_lives_kimg":
            ours, theirs = tuple(map(float, ours)), tuple(map(float, theirs))
        if ours != theirs:
            raise UsageError(f"--resume: the checkpoint was trained with {name}={theirs!r} but this run asks for "
                             f"{ours!r}; {flag_of(name)} cannot change on resume (start a new run in another --out)")
    if cfg.steps <= step:
        raise UsageError(f"--steps {cfg.steps} is not beyond the checkpoint's step {step}: nothing to train "
                         f"(pass a larger --steps)")


# ----------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    defaults = TrainConfig()
    parser = cli.Parser("python -m full.train", DESCRIPTION)
    add = parser.add_argument
    add("--preset", default=defaults.preset, help=f"model preset, one of {' '.join(sorted(PRESETS))}")
    add("--data", default=None, help="ImageNet-style folder root/<class>/<image> (ADM center crop, no flip), or "
                                     "'synthetic' (required unless --resume)")
    add("--batch-size", type=int, default=defaults.batch_size, help="global batch over all processes (pMF: 1024)")
    add("--steps", type=int, default=defaults.steps, help="optimiser steps (320 epochs of ImageNet at 1024 = 400k)")
    add("--accum-steps", type=int, default=defaults.accum_steps,
        help="micro-batches per process per step (gradient accumulation; same global batch)")
    add("--lr", type=float, default=defaults.lr, help="constant learning rate of Muon and Adam (pMF: 1e-3)")
    add("--seed", type=int, default=defaults.seed, help="seed of weights, data order and per-step randomness")
    add("--optimizer", choices=("muon", "adam"), default=defaults.optimizer,
        help="muon: Muon for Linear weights + Nesterov Adam for the rest; adam: Nesterov Adam for all")
    add("--prediction", choices=("x", "u"), default=defaults.prediction,
        help="x: the network outputs x_hat (pMF); u: its output is read as u (ablation)")
    add("--time-sampler", choices=TIME_SAMPLERS, default=defaults.time_sampler,
        help="(r, t) sampler: full plane (pMF) or the paper's ablations")
    add("--no-guidance", action="store_true", help="train without CFG: omega = 1, no interval, no label drop")
    add("--ema-kimg", type=float, nargs="+", default=list(defaults.ema_half_lives_kimg), metavar="KIMG",
        help="EMA half-lives in kimg")
    add("--perceptual", choices=PERCEPTUAL_CHOICES, default=defaults.perceptual,
        help="perceptual terms on x_hat for rows with t < t_thr")
    add("--convnext-weights", default=None, help="local ConvNeXt-V2-Base checkpoint (default: <torch hub dir>/"
                                                 "checkpoints/convnextv2_base_22k_224_ema.pt)")
    add("--num-classes", type=int, default=None,
        help="classes of the model (default: the --data folder's class count; the preset's 1000 for synthetic)")
    add("--bf16", action="store_true", help="bf16 autocast for the v-head and perceptual passes (the JVP stays fp32)")
    add("--ckpt-every", type=int, default=defaults.ckpt_every, help="steps between (atomic) checkpoints")
    add("--log-every", type=int, default=defaults.log_every, help="steps between log.jsonl records (means over them)")
    cli.add_out(parser, defaults.out, "checkpoint.pt, log.jsonl and config.json (and what the watch flags write); "
                                      "on --resume: the checkpoint's folder")
    add("--resume", default=None, metavar="CKPT|RUN_DIR|auto",
        help="continue a checkpoint exactly (weights, EMAs, optimiser, RNG, data position) up to --steps in total; "
             "a run folder: its newest checkpoint; auto: --out's newest checkpoint if there is one, else start "
             "(the same command starts and continues a run); flags not given come from the checkpoint")
    add("--overwrite", action="store_true", help="start a new run in an --out that holds an earlier run's "
                                                 "checkpoint.pt / log.jsonl (deletes them; default: refuse)")
    add("--num-workers", type=int, default=defaults.num_workers, help="data-loading processes per GPU")
    add("--no-progress", action="store_true",
        help="neither a progress bar nor periodic lines (log.jsonl is still written); without it, a run whose stderr "
             "is not a terminal (SLURM) prints a plain line every --log-every steps instead of a bar")
    cli.add_device(parser)
    add("--fsdp", action="store_true",
        help="shard weights, gradients, optimiser state and EMAs over the processes (FSDP2; for pMF-H); "
             "checkpoints become folders <out>/checkpoint.dcp, resumable on any number of processes and read "
             "directly by full.sample and full.export")
    add("--fsdp-mixed-precision", choices=("bf16",), default=None,
        help="with --fsdp: all-gather the weights in bf16 (half the traffic), reduce gradients in fp32; every "
             "forward, the JVP included, still computes in fp32")
    add("--precision", choices=PRECISIONS, default=None,
        help="fp32; tf32 (CUDA matmuls round inputs to TF32); bf16 (every pass of the step under bf16 autocast, "
             "the JVP's included; losses and optimiser in fp32); default: tf32 on CUDA, fp32 on CPU (full.precision)")
    add("--activation-checkpointing", action="store_true",
        help="each block keeps only its input and recomputes the rest in the backward (less memory, ~1 more "
             "forward); the JVP's tangent included")
    add("--init-official", default=None, metavar="PATH",
        help="start from the authors' released weights pMF-*.pt (the v-head starts as a copy of the u-head; with "
             "fewer classes the label table keeps the first K rows and the null row; full.finetune)")
    watch = parser.add_argument_group("watching the run (full.monitor; none of these changes what is trained)")
    watch.add_argument("--sample-every", type=int, default=0, metavar="N",
                       help="steps between sample grids (fixed noise and classes) of every EMA and the raw "
                            "weights, written as <out>/samples/step<N>-ema<K>.png; 0: none")
    watch.add_argument("--sample-omega", type=float, default=None, metavar="OMEGA",
                       help="omega of the grids and the FID (default: the preset's best; 1 without guidance)")
    watch.add_argument("--sample-t-min", type=float, default=None, metavar="T",
                       help="guidance interval start (default: the preset's)")
    watch.add_argument("--sample-t-max", type=float, default=None, metavar="T",
                       help="guidance interval end (default: the preset's)")
    watch.add_argument("--fid-every", type=int, default=0, metavar="N",
                       help="steps between FID / IS of the preset's sampling EMA (all processes sample), printed "
                            "and appended to log.jsonl and <out>/fid.jsonl; needs --ref; 0: none")
    watch.add_argument("--fid-num", type=int, default=defaults.fid_num, metavar="K", help="samples per FID evaluation")
    watch.add_argument("--ref", dest="fid_ref", default=None, metavar="STATS.npz",
                       help="reference statistics .npz for --fid-every (python -m full.evaluate ref-stats)")
    watch.add_argument("--inception-weights", default=None, metavar="PATH",
                       help="torch-fidelity's Inception weights for --fid-every (default: the torch hub cache)")
    watch.add_argument("--tensorboard", action="store_true",
                       help="write every logged value, lr and the grids to <out>/tensorboard")
    watch.add_argument("--keep-last", type=int, default=0, metavar="K",
                       help="keep the K newest numbered checkpoints checkpoint-<step>.pt / .dcp (checkpoint.pt / "
                            ".dcp links the newest); 0: only the newest")
    watch.add_argument("--compile", action="store_true",
                       help="torch.compile the training step (on CPU it paid off after ~1,000 steps; "
                            "measure yours with python -m full.bench.compile)")
    return parser


DEST_OF = {"no_guidance": "guidance", "ema_kimg": "ema_half_lives_kimg"}
"""argparse destination -> TrainConfig field, where the names differ."""
_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _join_negative_numbers(argv: list[str]) -> list[str]:
    """``--lr -1e-3`` -> ``--lr=-1e-3``: argparse reads ``-1e-3`` as a flag (it knows only ``-1`` and ``-.5``),
    so the value would never reach :func:`check_config`'s message."""
    joined, index = [], 0
    while index < len(argv):
        if argv[index].startswith("--") and "=" not in argv[index] and index + 1 < len(argv) \
                and _NUMBER.match(argv[index + 1]):
            joined.append(f"{argv[index]}={argv[index + 1]}")
            index += 2
        else:
            joined.append(argv[index])
            index += 1
    return joined


def _given_fields(argv: list[str]) -> set[str]:
    """The TrainConfig fields actually given on the command line (not filled in by defaults)."""
    probe = build_parser()
    for action in probe._actions:
        action.default, action.required = argparse.SUPPRESS, False
    return {DEST_OF.get(dest, dest) for dest in vars(probe.parse_known_args(argv)[0])}


def config_from_argv(argv: list[str]) -> tuple[TrainConfig, bool]:
    """(config, progress bar wanted) from the command line; a resumed run's missing flags from its checkpoint.

    Raises:
        UsageError / CheckpointError: an unusable --resume target (the values are checked by train()).
    """
    from .checkpoint import read_resume_config, resolve_resume

    argv = _join_negative_numbers(argv)
    args = build_parser().parse_args(argv)
    fields = {name: getattr(args, name) for name in TrainConfig.__dataclass_fields__ if hasattr(args, name)}
    fields.update(guidance=not args.no_guidance, ema_half_lives_kimg=tuple(args.ema_kimg),
                  device=None if args.device == "auto" else args.device)
    cfg = TrainConfig(**fields)
    given = _given_fields(argv)
    resume, overwrite = resolve_resume(cfg.resume, cfg.out)
    cfg = dataclasses.replace(cfg, resume=resume, overwrite=cfg.overwrite or overwrite)
    if cfg.resume is not None:   # what the command line does not say comes from the checkpoint
        saved = read_resume_config(cfg.resume)
        inherited = {name: value for name, value in saved.items()
                     if name in TrainConfig.__dataclass_fields__ and name not in given and name not in NOT_INHERITED}
        if "ema_half_lives_kimg" in inherited:
            inherited["ema_half_lives_kimg"] = tuple(inherited["ema_half_lives_kimg"])
        if "out" not in given:   # the folder the checkpoint is in now, wherever the run was started
            inherited["out"] = str(Path(cfg.resume).parent)
        cfg = dataclasses.replace(cfg, **inherited)
    return cfg, not args.no_progress
