"""Check the external files a user must fetch: found / missing / wrong shape, without running a network.

    python -m full.weights                                   # VGG16, ConvNeXt-V2, Inception in the hub folder
    python -m full.weights --official ~/w/pMF-B-16.pt --ref jit_in256_stats.npz

Each file is opened memory-mapped with ``weights_only=True`` (nothing in it can run) and its tensor
shapes are compared with the network that reads it, built on the ``meta`` device (no memory, no
compute). Where each file is published and where it goes: ``full/README.md``, "External files".
Exit 0 when every checked file is usable, 1 when one is missing or wrong.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from . import cli

FID_DIM = 2048
OFFICIAL_NAME = re.compile(r"pMF-([BLH])-(16|32)")


def _shapes(state) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state.items()}


def _read_torch(path: Path) -> dict:
    from .checkpoint import read_checkpoint_file

    import torch

    state = read_checkpoint_file(path, mmap=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]              # the official ConvNeXt release wraps its weights
    if not isinstance(state, dict) or not state or not all(
            isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()):
        raise ValueError("not a state dict {name: tensor}")
    return state


def _differences(found: dict, expected: dict) -> str | None:
    """None if the shapes agree, else the first difference in words."""
    for key, shape in expected.items():
        if key not in found:
            return f"lacks {key!r}"
        if found[key] != shape:
            return f"{key!r} has shape {found[key]}, expected {shape}"
    extra = sorted(set(found) - set(expected))
    return f"unexpected key {extra[0]!r}" if extra else None


def check_vgg16(path: Path) -> str | None:
    import torch
    import torchvision

    with torch.device("meta"):
        expected = _shapes(torchvision.models.vgg16().state_dict())
    return _differences(_shapes(_read_torch(path)), expected)


def check_convnext(path: Path) -> str | None:
    import timm
    import torch
    from timm.models.convnext import checkpoint_filter_fn

    with torch.device("meta"):
        network = timm.create_model("convnextv2_base", pretrained=False, num_classes=0)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:   # shapes from the header; no tensor is read
            state = {key: torch.empty(handle.get_slice(key).get_shape(), device="meta") for key in handle.keys()}
    else:
        state = _read_torch(path)
    state = {key: value for key, value in checkpoint_filter_fn(state, network).items() if not key.startswith("head.fc.")}
    return _differences(_shapes(state), _shapes(network.state_dict()))


def check_inception(path: Path) -> str | None:
    state = _read_torch(path)
    expected = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "fc.weight": (1008, FID_DIM)}
    problems = [f"{key!r} should be {shape}" for key, shape in expected.items() if
                key not in state or tuple(state[key].shape) != shape]
    return f"not torch-fidelity's Inception: {problems[0]}" if problems else None


def check_official(path: Path) -> str | None:
    from .official import PREFIX, fitting_presets

    state = {key[len(PREFIX):] if key.startswith(PREFIX) else key: value for key, value in _read_torch(path).items()}
    fits = fitting_presets(state)
    named = OFFICIAL_NAME.search(path.name)
    expected = f"pMF-{named[1]}/{named[2]}" if named else None
    if expected in fits or (expected is None and fits):
        return None
    return f"its shapes fit {', '.join(fits) or 'no preset'}" + (f", not {expected}" if expected else "")


def check_reference(path: Path) -> str | None:
    import numpy as np

    data = np.load(path, allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError("a single array (.npy), expected an .npz archive holding mu and sigma")
    with data:
        keys = set(data.files)
        if {"ref_mu", "ref_sigma"} <= keys and not {"mu", "sigma"} <= keys:
            return "holds ref_mu / ref_sigma (the authors' TPU file): save them as mu / sigma (full/README.md)"
        if not {"mu", "sigma"} <= keys:
            return f"lacks mu and sigma; it holds {sorted(keys)}"
        mu, sigma = data["mu"], data["sigma"]
    if mu.shape != (FID_DIM,) or sigma.shape != (FID_DIM, FID_DIM):
        return f"mu {mu.shape} and sigma {sigma.shape}, expected ({FID_DIM},) and ({FID_DIM}, {FID_DIM})"
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError("mu or sigma holds NaN or inf (statistics of a diverged or broken pass)")
    return None


def check(what: str, path: Path, checker) -> dict:
    """One file's record: ``status`` found / missing / wrong shape / unreadable, and ``detail``."""
    record = {"file": what, "path": str(path)}
    if path.is_dir():
        return {**record, "status": "unreadable", "detail": "is a folder, expected a file"}
    if not path.is_file():
        return {**record, "status": "missing", "detail": f"put {path.name} in {path.parent}"}
    try:
        problem = checker(path)
    except Exception as error:   # any unreadable file is one line in the report, never a traceback
        return {**record, "status": "unreadable", "detail": str(error).splitlines()[0] if str(error) else repr(error)}
    return {**record, "status": "wrong shape" if problem else "found", "detail": problem or ""}


def build_parser():
    parser = cli.Parser("python -m full.weights", __doc__.split("\n\n")[0])
    parser.add_argument("--official", nargs="+", default=[], metavar="PATH",
                        help="the authors' checkpoints (pMF-B-16.pt, ...): each must fit the preset its name says")
    parser.add_argument("--ref", nargs="+", default=[], metavar="PATH",
                        help="reference statistics .npz for FID (mu (2048,), sigma (2048, 2048))")
    parser.add_argument("--convnext-weights", default=None, metavar="PATH",
                        help="ConvNeXt-V2-Base file to check instead of the hub folder's convnextv2_base_22k_224_ema.pt")
    parser.add_argument("--inception-weights", default=None, metavar="PATH",
                        help="Inception file to check instead of the hub folder's "
                             "weights-inception-2015-12-05-6726825d.pth")
    cli.add_json(parser, "the records")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    from .fid import default_inception_weights_path
    from .perceptual import CONVNEXT_V2_BASE_FILE, VGG16_FILE, weights_dir

    records = [
        check("VGG16 (LPIPS)", weights_dir() / VGG16_FILE, check_vgg16),
        check("ConvNeXt-V2-Base", Path(args.convnext_weights or weights_dir() / CONVNEXT_V2_BASE_FILE), check_convnext),
        check("Inception (FID, IS)", Path(args.inception_weights or default_inception_weights_path()), check_inception),
        *(check("authors' checkpoint", Path(path).expanduser(), check_official) for path in args.official),
        *(check("reference statistics", Path(path).expanduser(), check_reference) for path in args.ref),
    ]
    if args.json:
        print(json.dumps(records, indent=2))
    else:
        for record in records:
            print(f"{record['status']:<12} {record['file']:<22} {record['path']}"
                  + (f"\n{'':<12} {record['detail']}" if record["detail"] else ""))
    sys.exit(0 if all(record["status"] == "found" for record in records) else 1)


if __name__ == "__main__":
    main()
