"""Inference weights out of a training checkpoint: one EMA, no v-head, no optimiser, as safetensors.

    python -m full.export runs/pmf/checkpoint.pt --ema 2000 --out export/     # export/model.safetensors
    python -m full.export runs/pmf/checkpoint.pt --format official --out official/   # official/model.pt
    python -m full.sample --ckpt export/model.safetensors --per-class 50 --out samples/

Writes the weights and, beside them, a small JSON config (``model.json``): the model preset and
overrides, the EMA, step and images seen, the trainer's prediction mode and the preset's sampling
settings. A ``.safetensors`` file also carries that config in its metadata, so it stands alone.

Layouts (``--format``):
  ours      our parameter names (``PMFViT.state_dict()`` without ``v_head.*``);
  official  the authors' released layout (``net.*`` keys and ``net.rope_freqs``, full.official),
            as ``.pt`` (their file type: ``python -m full.sample --official-ckpt`` reads it too) or
            ``.safetensors``.
Both load back with :func:`load_exported`, which is what full.sample uses for an exported file.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save

from . import cli
from .checkpoint import CheckpointError, load_checkpoint, load_model
from .ema import format_half_life
from .io import atomic_write, write_text
from .model import build_model
from .presets import PRESETS, SAMPLING
from .official import OfficialCheckpointError, load_official_state_dict, to_official_state_dict

EXPORT_FORMAT = "pmf-export"
EXPORT_VERSION = 1
METADATA_KEY = "pmf_config"    # safetensors metadata entry holding the JSON config
LAYOUTS = ("ours", "official")
SUFFIXES = (".safetensors", ".pt")
EXPORT_NAME = "model"          # the CLI writes --out/model.safetensors (or model.pt) and model.json


class ExportError(ValueError):
    """An exported file that cannot be read; the one-line message names the file and what is wrong."""


def config_path(weights: str | Path) -> Path:
    """The JSON config beside an exported file: ``model.safetensors`` -> ``model.json``."""
    return Path(weights).with_suffix(".json")


def export_state_dict(model: torch.nn.Module, layout: str) -> dict[str, torch.Tensor]:
    """The weights of an inference PMFViT (built with ``v_head=False``) in ``layout``, contiguous."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    state = model.state_dict() if layout == "ours" else to_official_state_dict(model)
    return {name: tensor.detach().contiguous().clone() for name, tensor in state.items()}


def export_config(checkpoint: dict, *, ema: str, layout: str, source: str, parameters: int) -> dict:
    """The JSON config of an export of ``checkpoint`` (a full.train checkpoint dict)."""
    config = checkpoint["config"]
    preset = config["model"]["preset"]
    best = SAMPLING[preset]
    return {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "layout": layout,
            "model": {**config["model"], "v_head": False}, "ema": ema,
            "step": checkpoint.get("step"), "images_seen": checkpoint.get("images_seen"),
            "parameters": parameters, "prediction": config.get("train", {}).get("prediction", "x"),
            "sampling": {"omega": best.omega, "t_min": best.t_min, "t_max": best.t_max},
            "source": source}


def export(ckpt: str | Path, out: str | Path, *, ema: str | None = None, layout: str = "ours") -> dict:
    """Write the inference weights of ``ckpt`` (EMA ``ema``; "raw" for the raw weights; None: the preset's
    best) to ``out`` (``.safetensors`` or ``.pt``) and its JSON config beside it; returns the config.

    Raises:
        CheckpointError: an unusable checkpoint, or weights holding NaN / inf.
        KeyError: ``ema`` is not among the checkpoint's EMAs (the message lists them).
    """
    out = Path(out)
    if out.suffix not in SUFFIXES:
        raise ValueError(f"{str(out)!r}: the file name must end in one of {SUFFIXES}")
    if layout == "ours" and out.suffix == ".pt":
        raise ValueError(f"{str(out)!r}: our layout is written as .safetensors (.pt is for --format official)")
    checkpoint = load_checkpoint(ckpt, mmap=True)   # the config and counters; tensors stay on disk
    preset = checkpoint["config"]["model"]["preset"]
    ema = format_half_life(SAMPLING[preset].ema_kimg) if ema is None else (
        ema if ema == "raw" else format_half_life(float(ema)))
    model = load_model(ckpt, None if ema == "raw" else ema)   # drops the v-head, refuses NaN / inf
    state = export_state_dict(model, layout)
    parameters = sum(tensor.numel() for tensor in model.parameters())
    config = export_config(checkpoint, ema=ema, layout=layout, source=str(ckpt), parameters=parameters)
    text = json.dumps(config, indent=2)
    if out.suffix == ".safetensors":
        payload = save(state, metadata={METADATA_KEY: json.dumps(config)})
        atomic_write(out, lambda file: file.write(payload))
    else:
        atomic_write(out, lambda file: torch.save(state, file))
    write_text(config_path(out), text)
    return config


def read_export_config(path: str | Path) -> dict:
    """The config of an exported file: its safetensors metadata, else the JSON file beside it.

    Raises:
        ExportError: neither holds an export config.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
        except (SafetensorError, OSError) as error:
            raise ExportError(f"{str(path)!r} is not a readable safetensors file ({error})") from None
        if METADATA_KEY in metadata:
            return json.loads(metadata[METADATA_KEY])
    sidecar = config_path(path)
    if not sidecar.is_file():
        raise ExportError(f"{str(path)!r} carries no export config and {str(sidecar)!r} does not exist "
                          f"(write both with `python -m full.export`)")
    try:
        config = json.loads(sidecar.read_text())
    except json.JSONDecodeError as error:
        raise ExportError(f"{str(sidecar)!r} is not JSON ({error})") from None
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{str(sidecar)!r} is not a full.export config (no \"format\": \"{EXPORT_FORMAT}\")")
    return config


def is_export(path: str | Path) -> bool:
    """True for a ``.safetensors`` file, or a file with a full.export JSON config beside it."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return True
    try:
        return json.loads(config_path(path).read_text()).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def load_exported(path: str | Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict]:
    """(inference PMFViT in eval mode on ``device``, its export config) from a file of :func:`export`.

    Raises:
        ExportError: missing / unreadable file or config, weights that do not fit the config,
        or weights holding NaN / inf.
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{str(path)!r} does not exist or is not a file")
    config = read_export_config(path)
    preset = config.get("model", {}).get("preset")
    if preset not in PRESETS or config.get("layout") not in LAYOUTS:
        raise ExportError(f"{str(path)!r}: config names preset {preset!r} / layout {config.get('layout')!r}; "
                          f"expected one of {sorted(PRESETS)} / {LAYOUTS}")
    try:
        state = (load_file(str(path)) if path.suffix == ".safetensors"
                 else torch.load(path, map_location="cpu", weights_only=True))
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as error:
        raise ExportError(f"{str(path)!r} is not a readable weights file ({type(error).__name__})") from None
    bad = next((name for name, tensor in state.items() if tensor.is_floating_point()
                and not torch.isfinite(tensor).all()), None)
    if bad is not None:
        raise ExportError(f"{str(path)!r}: tensor {bad!r} holds NaN or inf")
    model = build_model(**{**config["model"], "v_head": False})
    try:
        if config["layout"] == "ours":
            model.load_state_dict(state, strict=True)
        else:
            load_official_state_dict(model, state, source=str(path))
    except (RuntimeError, OfficialCheckpointError) as error:
        raise ExportError(f"{str(path)!r}: weights do not fit {config['model']}: "
                          f"{str(error).strip().splitlines()[0]}") from None
    return model.to(device).eval().requires_grad_(False), config


# ----------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> None:
    parser = cli.Parser("python -m full.export", __doc__.split("\n\n")[0])
    parser.add_argument("ckpt", metavar="CKPT", help="checkpoint written by full.train")
    parser.add_argument("--ema", default=None,
                        help="EMA half-life in kimg (a key of the checkpoint's EMAs, e.g. 2000) or 'raw'; "
                             "default: the preset's best (B/16: 2000)")
    cli.add_out(parser, None, f"{EXPORT_NAME}.safetensors (our layout) or {EXPORT_NAME}.pt (the authors'), "
                              f"and {EXPORT_NAME}.json")
    parser.add_argument("--format", choices=LAYOUTS, default="ours",
                        help="ours: our parameter names; official: the authors' released layout (net.* keys)")
    parser.add_argument("--force", action="store_true", help="replace an earlier export in --out")
    args = parser.parse_args(argv)
    if not (Path(args.ckpt).is_file() or (Path(args.ckpt) / "meta.pt").is_file()):   # a file, or --fsdp's folder
        parser.error(f"CKPT: {args.ckpt!r} is not a file (or a sharded checkpoint folder)")
    cli.check_out(parser, args.out)
    out = Path(args.out) / (EXPORT_NAME + (".safetensors" if args.format == "ours" else ".pt"))
    if (out.exists() or config_path(out).exists()) and not args.force:
        parser.error(f"--out: {str(out)!r} (or its {config_path(out).name}) exists; pass --force to replace it")
    if args.ema is not None and args.ema != "raw":
        try:
            if not (math.isfinite(float(args.ema)) and float(args.ema) > 0):
                raise ValueError
        except ValueError:
            parser.error(f"--ema must be a positive number (kimg) or 'raw', got {args.ema!r}")
    try:
        config = export(args.ckpt, out, ema=args.ema, layout=args.format)
    except KeyError as error:                 # an absent EMA; the message lists those present
        parser.error(f"--ema: {error.args[0]}")
    except CheckpointError as error:
        parser.error(f"CKPT: {error}")
    print(f"wrote {out} ({config['parameters']:,} parameters, {config['model']['preset']}, EMA {config['ema']}, "
          f"step {config['step']}, layout {config['layout']}) and {config_path(out)}")


if __name__ == "__main__":
    main()
