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
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save

from . import cli
from .checkpoint import CheckpointError, load_checkpoint, load_model, read_checkpoint_file
from .ema import format_half_life
from .io import atomic_write
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


class MissingEMAError(KeyError):
    """``--ema`` names an EMA the run did not keep; ``args[0]`` is a one-line message naming the flag."""


def choose_ema(preset: str, kept: list[str], asked: str | None = None) -> str:
    """The EMA to read from a checkpoint that kept the EMAs ``kept`` (keys such as "1000"; "raw" = raw weights).

    ``asked`` (the ``--ema`` value: a half-life in kimg or "raw") must be kept. Without it: the preset's
    best half-life (pMF App. A; B/16: 2000) when the run kept it, else the kept half-life nearest to it
    (in log scale; the longer on a tie), else the raw weights (a run that kept no EMA).

    Raises:
        MissingEMAError: ``asked`` is not among ``kept`` (the message lists them as ``--ema`` values).
        ValueError: ``asked`` is neither "raw" nor a positive number.
    """
    if asked is not None:
        if asked == "raw":
            return "raw"
        try:
            value = float(asked)
        except ValueError:
            raise ValueError(f"--ema must be a half-life in kimg or 'raw', got {asked!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"--ema must be a positive half-life in kimg or 'raw', got {asked!r}")
        key = format_half_life(value)
        if key not in kept:
            choices = ", ".join(f"--ema {name}" for name in kept) or "none (the run kept no EMA)"
            raise MissingEMAError(f"--ema {asked}: the checkpoint has no EMA {key!r}; it kept {choices}, "
                                  f"or pass --ema raw for the raw weights")
        return key
    best = SAMPLING[preset].ema_kimg
    if format_half_life(best) in kept:
        return format_half_life(best)
    if not kept:
        return "raw"
    return min(kept, key=lambda name: (abs(math.log(float(name) / best)), -float(name)))


def export(ckpt: str | Path, out: str | Path, *, ema: str | None = None, layout: str = "ours") -> dict:
    """Write the inference weights of ``ckpt`` (EMA ``ema``; "raw" for the raw weights; None: the preset's
    best) to ``out`` (``.safetensors`` or ``.pt``) and its JSON config beside it; returns the config.

    ``ema`` None picks with :func:`choose_ema` (the preset's best if the run kept it, else the nearest kept).

    Raises:
        CheckpointError: an unusable checkpoint, or weights holding NaN / inf.
        MissingEMAError: ``ema`` is not among the checkpoint's EMAs (the message lists them as --ema values).
    """
    out = Path(out)
    if out.suffix not in SUFFIXES:
        raise ValueError(f"{str(out)!r}: the file name must end in one of {SUFFIXES}")
    if layout == "ours" and out.suffix == ".pt":
        raise ValueError(f"{str(out)!r}: our layout is written as .safetensors (.pt is for --format official)")
    checkpoint = load_checkpoint(ckpt, mmap=True)   # the config and counters; tensors stay on disk
    preset = checkpoint["config"]["model"]["preset"]
    ema = choose_ema(preset, sorted(checkpoint.get("ema", {}), key=float), ema)
    model = load_model(ckpt, None if ema == "raw" else ema)   # drops the v-head, refuses NaN / inf
    state = export_state_dict(model, layout)
    parameters = sum(tensor.numel() for tensor in model.parameters())
    config = export_config(checkpoint, ema=ema, layout=layout, source=str(ckpt), parameters=parameters)
    text = json.dumps(config, indent=2) + "\n"
    if out.suffix == ".safetensors":
        payload = save(state, metadata={METADATA_KEY: json.dumps(config)})
        write_weights = lambda file: file.write(payload)   # noqa: E731
    else:
        write_weights = lambda file: torch.save(state, file)   # noqa: E731

    def write_pair(config_file) -> None:
        # The weights (the large write, the one a full disk stops) are written and renamed inside the
        # config's write: a failure leaves both earlier files as they were, never a mismatched pair.
        config_file.write(text.encode("utf-8"))
        atomic_write(out, write_weights)

    atomic_write(config_path(out), write_pair)
    return config


def _checked_config(config: object, source: str) -> dict:
    """``config`` if it is a full.export config naming a known preset, layout and EMA, else ExportError."""
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{source} is not a full.export config (no \"format\": \"{EXPORT_FORMAT}\")")
    model = config.get("model")
    preset = model.get("preset") if isinstance(model, dict) else None
    if preset not in PRESETS or config.get("layout") not in LAYOUTS or not isinstance(config.get("ema"), str):
        raise ExportError(f"{source}: the config names preset {preset!r}, layout {config.get('layout')!r} and EMA "
                          f"{config.get('ema')!r}; expected one of {sorted(PRESETS)}, one of {LAYOUTS} and a "
                          f"half-life key or 'raw'")
    return config


def read_export_config(path: str | Path) -> dict:
    """The config of an exported file: its safetensors metadata, else the JSON file beside it.

    Raises:
        ExportError: neither holds a readable export config (the message names the file and what is wrong).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
        except (SafetensorError, OSError) as error:
            raise ExportError(f"{str(path)!r} is not a readable safetensors file ({error})") from None
        if METADATA_KEY in metadata:
            try:
                config = json.loads(metadata[METADATA_KEY])
            except json.JSONDecodeError as error:
                raise ExportError(f"{str(path)!r}: its metadata entry {METADATA_KEY!r} is not JSON ({error})") from None
            return _checked_config(config, f"{str(path)!r} (metadata {METADATA_KEY!r})")
    sidecar = config_path(path)
    if not sidecar.is_file():
        raise ExportError(f"{str(path)!r} carries no export config and {str(sidecar)!r} does not exist "
                          f"(write both with `python -m full.export`)")
    try:
        config = json.loads(sidecar.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ExportError(f"{str(sidecar)!r} is not JSON ({error})") from None
    except OSError as error:
        raise ExportError(f"{str(sidecar)!r} cannot be read ({error.strerror or error})") from None
    return _checked_config(config, repr(str(sidecar)))


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
    try:
        state = load_file(str(path)) if path.suffix == ".safetensors" else read_checkpoint_file(path)
    except CheckpointError as error:   # garbage, truncated, or a pickle holding code (refused, never run)
        raise ExportError(str(error)) from None
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as error:
        raise ExportError(f"{str(path)!r} is not a readable weights file ({type(error).__name__})") from None
    if not isinstance(state, dict) or not all(
            isinstance(name, str) and isinstance(tensor, torch.Tensor) for name, tensor in state.items()):
        raise ExportError(f"{str(path)!r} is not a state dict {{name: tensor}}")
    bad = next((name for name, tensor in state.items() if tensor.is_floating_point()
                and not torch.isfinite(tensor).all()), None)
    if bad is not None:
        raise ExportError(f"{str(path)!r}: tensor {bad!r} holds NaN or inf")
    try:
        model = build_model(**{**config["model"], "v_head": False})
    except (TypeError, ValueError) as error:
        raise ExportError(f"{str(path)!r}: its config's model {config['model']} cannot be built "
                          f"({str(error).splitlines()[0]})") from None
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
                             "default: the preset's best (B/16: 2000) if the run kept it, else the kept EMA "
                             "nearest to it")
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
    official_pt = out.with_suffix(".pt")
    if out.suffix == ".safetensors" and official_pt.exists():
        # model.pt has no config of its own: replacing model.json would describe it as this export.
        # (A model.safetensors carries its config in its metadata, so the reverse is safe.)
        parser.error(f"--out: {str(official_pt)!r}, an export in the other --format, is described by "
                     f"{config_path(out).name}, which this export would replace (even with --force); "
                     f"choose another --out")
    if args.ema is not None and args.ema != "raw":
        try:
            if not (math.isfinite(float(args.ema)) and float(args.ema) > 0):
                raise ValueError
        except ValueError:
            parser.error(f"--ema must be a positive number (kimg) or 'raw', got {args.ema!r}")
    try:
        config = export(args.ckpt, out, ema=args.ema, layout=args.format)
    except MissingEMAError as error:          # an absent EMA; the message lists those kept, as --ema values
        parser.error(error.args[0])
    except CheckpointError as error:
        parser.error(f"CKPT: {error}")
    except OSError as error:   # a full disk: both earlier files (if any) are untouched, nothing half-written
        print(f"{parser.prog}: error: writing {str(out)!r} failed: {error.strerror or error}; nothing was "
              f"replaced", file=sys.stderr)
        sys.exit(1)
    best = format_half_life(SAMPLING[config["model"]["preset"]].ema_kimg)
    if args.ema is None and config["ema"] != best:
        print(f"note: the run did not keep EMA {best} (the preset's best); exported "
              f"{'the raw weights' if config['ema'] == 'raw' else 'EMA ' + config['ema']} (choose with --ema)",
              file=sys.stderr)
    print(f"wrote {out} ({config['parameters']:,} parameters, {config['model']['preset']}, EMA {config['ema']}, "
          f"step {config['step']}, layout {config['layout']}) and {config_path(out)}")


if __name__ == "__main__":
    main()
