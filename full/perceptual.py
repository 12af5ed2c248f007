"""Perceptual losses of pMF (Sec. 4): LPIPS-VGG and a ConvNeXt-V2 feature distance.

Both compare the u-head's denoised image ``x_hat`` with the clean image ``x`` after the *same*
random resized crop of both (area 0.08-1, aspect 3/4-4/3, resized to 224x224):

    d_lpips(x_hat, x)    = LPIPS_vgg(crop(x_hat), crop(x))                       (B,)
    d_convnext(x_hat, x) = || f(crop(x_hat)) - f(crop(x)) ||^2  (sum over 1024 dims)   (B,)

with f the globally pooled, layer-normed feature of ConvNeXt-V2-Base (images fed in [-1, 1], no
ImageNet normalisation, as in the released code). The training step (``full/step.py``) weights them
``0.4 adp(d_lpips) + 0.1 adp(d_convnext)`` on rows with t < t_thr.

Pretrained weights are read only from local files -- nothing is downloaded:
* LPIPS: torchvision's VGG16 ``vgg16-397923af.pth`` in ``<torch hub dir>/checkpoints/`` (the
  lpips package ships its own linear heads).
* ConvNeXt-V2-Base: a local checkpoint, by default ``convnextv2_base_22k_224_ema.pt`` (the
  official ImageNet-22k fine-tuned release) in the same folder; timm-format state dicts and
  ``.safetensors`` files load too. The network definition comes from the ``timm`` package.
"""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CROP_SIZE = 224
CROP_SCALE = (0.08, 1.0)           # area fraction of the crop (torchvision RandomResizedCrop default)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10                 # tries before falling back to the largest central crop (as torchvision)
LPIPS_WEIGHT = 0.4                 # pMF: 0.4 adp(LPIPS)
CONVNEXT_WEIGHT = 0.1              # pMF: 0.1 adp(ConvNeXt feature distance)
VGG16_FILE = "vgg16-397923af.pth"
CONVNEXT_V2_BASE_FILE = "convnextv2_base_22k_224_ema.pt"


def weights_dir() -> Path:
    """Where pretrained files are looked for: ``$TORCH_HOME/hub/checkpoints`` (default ``~/.cache/torch/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


class PretrainedWeightsError(FileNotFoundError):
    """A pretrained-weights file that is missing or unusable (garbage, foreign, NaN, or holding code).

    The message is one line naming the file. A FileNotFoundError, so that every caller that treats a
    missing weights file as a user error (exit 2) treats an unusable one the same way.
    """


def require_file(path: Path, what: str, flag: str | None = None) -> Path:
    """Raise a PretrainedWeightsError naming ``path`` and how to provide it, unless it exists."""
    if not path.is_file():
        hint = f" or pass {flag} PATH" if flag else ""
        raise PretrainedWeightsError(
            f"{what} weights not found: expected the file {str(path)!r}. Nothing is downloaded at run time: "
            f"copy {path.name} into {str(path.parent)!r} (set $TORCH_HOME to move that folder){hint}.")
    return path


def read_state_dict(path: Path, what: str) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of a ``.pt``/``.pth`` or ``.safetensors`` file, read without running anything in it.

    Raises:
        PretrainedWeightsError: a garbage, truncated or non-state-dict file, or a pickle that holds code.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .checkpoint import CheckpointError, read_checkpoint_file

    try:
        state = load_file(str(path)) if path.suffix == ".safetensors" else read_checkpoint_file(path, "cpu")
    except CheckpointError as error:          # names the file; says "holds code and was refused" for a payload
        raise PretrainedWeightsError(f"{what} weights: {error}") from None
    except (SafetensorError, OSError) as error:
        raise PretrainedWeightsError(f"{what} weights: {str(path)!r} is not a readable safetensors file "
                                     f"({str(error).splitlines()[0] if str(error) else type(error).__name__})"
                                     ) from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]                # the official ConvNeXt release wraps its weights
    if not isinstance(state, dict) or not state or not all(
            isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()):
        raise PretrainedWeightsError(f"{what} weights: {str(path)!r} is not a state dict {{name: tensor}}")
    bad = next((key for key, value in state.items() if value.is_floating_point() and not value.isfinite().all()),
               None)
    if bad is not None:
        raise PretrainedWeightsError(f"{what} weights: {str(path)!r}: tensor {bad!r} holds NaN or inf")
    return state


# ----------------------------------------------------------------------------- paired random resized crop

def sample_crop_boxes(n: int, height: int, width: int, *, generator: torch.Generator | None = None,
                      scale: tuple[float, float] = CROP_SCALE, ratio: tuple[float, float] = CROP_RATIO,
                      attempts: int = CROP_ATTEMPTS) -> torch.Tensor:
    """Random-resized-crop boxes (torchvision's ``RandomResizedCrop.get_params``, vectorised).

    Per row: up to ``attempts`` draws of area ``s * H * W`` (s ~ U(scale)) and aspect ``a``
    (log a ~ U(log ratio)); the first whose ``w = round(sqrt(s H W a))``, ``h = round(sqrt(s H W / a))``
    fit is used, at a uniform offset; rows where none fits get the largest central crop within
    ``ratio``. A fixed number of numbers is drawn per row, so the generator advances the same
    amount whatever the outcome (exact resume, equal draws on 1 or N processes).

    Args:
        n: rows.  height, width: image size.
    Returns:
        boxes, (n, 4) int64 rows ``(top, left, h, w)``.
    """
    area = height * width
    device = generator.device if generator is not None else None
    uniforms = torch.rand(n, attempts, 4, generator=generator, device=device, dtype=torch.float64).cpu()
    target_area = area * (scale[0] + (scale[1] - scale[0]) * uniforms[..., 0])
    log_ratio = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * uniforms[..., 1]
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(target_area * aspect)).long()
    h = torch.round(torch.sqrt(target_area / aspect)).long()
    fits = (w > 0) & (h > 0) & (w <= width) & (h <= height)                      # (n, attempts)
    first = torch.argmax(fits.int(), dim=1)                                       # first fitting try
    rows = torch.arange(n)
    h, w, fits = h[rows, first], w[rows, first], fits[rows, first]
    top = torch.floor(uniforms[rows, first, 2] * (height - h + 1).double()).long()
    left = torch.floor(uniforms[rows, first, 3] * (width - w + 1).double()).long()
    # Fallback (no attempt fits): the central crop, clipped to the aspect-ratio range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fallback_w, fallback_h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fallback_w, fallback_h = int(round(height * ratio[1])), height
    else:
        fallback_w, fallback_h = width, height
    fallback = torch.tensor([(height - fallback_h) // 2, (width - fallback_w) // 2, fallback_h, fallback_w])
    boxes = torch.stack([top, left, h, w], dim=1)
    return torch.where(fits[:, None], boxes, fallback.expand(n, 4))


def paired_resized_crop(x_hat: torch.Tensor, x: torch.Tensor, boxes: torch.Tensor,
                        size: int = CROP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop row i of both images to ``boxes[i]`` and resize it to ``size`` x ``size`` (bilinear, antialiased).

    Args:
        x_hat, x: (B, C, H, W).  boxes: (B, 4) ``(top, left, h, w)``.
    Returns:
        (crop of x_hat, crop of x), each (B, C, size, size); differentiable w.r.t. x_hat.
    """
    if x_hat.shape != x.shape or boxes.shape != (x.shape[0], 4):
        raise ValueError(f"need x_hat, x of one shape and boxes (B, 4); got {tuple(x_hat.shape)}, "
                         f"{tuple(x.shape)}, {tuple(boxes.shape)}")
    crops_hat, crops = [], []
    for i, (top, left, h, w) in enumerate(boxes.tolist()):
        pair = torch.stack([x_hat[i, :, top:top + h, left:left + w], x[i, :, top:top + h, left:left + w]])
        pair = F.interpolate(pair, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        crops_hat.append(pair[0])
        crops.append(pair[1])
    return torch.stack(crops_hat), torch.stack(crops)


# ----------------------------------------------------------------------------- the two networks

def lpips_heads_file() -> Path:
    """The lpips package's calibrated linear heads for VGG (``weights/v0.1/vgg.pth`` inside the package)."""
    import lpips

    return Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"


def build_lpips_vgg(*, pretrained_backbone: bool = True) -> nn.Module:
    """``lpips.LPIPS(net="vgg")`` with the package's calibrated linear heads.

    Every file is read here with ``weights_only=True`` and handed over as tensors: lpips and
    torchvision would load them with a full unpickler, so a planted payload would run. The VGG16
    file's ``features.<i>.*`` tensors fill lpips's ``net.slice<k>.<i>.*`` (same index ``i``); its
    classifier is unused. ``pretrained_backbone=False`` gives a randomly initialised VGG (tests).

    Raises:
        PretrainedWeightsError: naming ``vgg16-397923af.pth`` and its folder when it is absent, or the
        file and what is wrong when it is garbage, foreign, non-finite or holds code.
    """
    import lpips

    vgg_path = require_file(weights_dir() / VGG16_FILE, "LPIPS VGG16 (torchvision ImageNet)") \
        if pretrained_backbone else None
    with warnings.catch_warnings():   # lpips passes torchvision the deprecated ``pretrained=False``
        warnings.simplefilter("ignore", UserWarning)
        network = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)   # reads no file
    heads = read_state_dict(lpips_heads_file(), "LPIPS linear heads")
    network.load_state_dict({**network.state_dict(), **heads}, strict=True)
    if vgg_path is not None:
        state = read_state_dict(vgg_path, "LPIPS VGG16")
        backbone = {}
        for name, tensor in network.net.state_dict().items():     # "slice3.10.weight" <- "features.10.weight"
            theirs = "features." + name.split(".", 1)[1]
            if theirs not in state:
                raise PretrainedWeightsError(f"LPIPS VGG16 weights: {str(vgg_path)!r} is not torchvision's VGG16 "
                                             f"(it lacks {theirs!r})")
            if state[theirs].shape != tensor.shape:
                raise PretrainedWeightsError(f"LPIPS VGG16 weights: {str(vgg_path)!r}: {theirs!r} has shape "
                                             f"{tuple(state[theirs].shape)}, expected {tuple(tensor.shape)}")
            backbone[name] = state[theirs]
        network.net.load_state_dict(backbone, strict=True)
    return network.eval()


def build_convnext_v2(*, arch: str = "convnextv2_base", weights: str | os.PathLike | None = None,
                      pretrained: bool = True) -> nn.Module:
    """ConvNeXt-V2 from ``timm`` with weights read from a local file.

    Args:
        arch: timm model name (``convnextv2_base`` in pMF; tests use ``convnextv2_atto``).
        weights: checkpoint path; default ``<torch hub dir>/checkpoints/convnextv2_base_22k_224_ema.pt``.
            Official (``{"model": ...}``, facebookresearch key names) and timm state dicts are accepted.
        pretrained: False gives random weights (tests).
    """
    import timm
    from timm.models.convnext import checkpoint_filter_fn

    if pretrained:   # check the file before building the network (Base has 88M parameters)
        path = require_file(Path(weights) if weights else weights_dir() / CONVNEXT_V2_BASE_FILE,
                            "ConvNeXt-V2", "--convnext-weights")
    network = timm.create_model(arch, pretrained=False, num_classes=0)
    if pretrained:
        state = read_state_dict(path, "ConvNeXt-V2")
        try:
            state = checkpoint_filter_fn(state, network)
            state = {key: value for key, value in state.items() if not key.startswith("head.fc.")}  # unused
            network.load_state_dict(state, strict=True)
        except (RuntimeError, KeyError, ValueError) as error:
            raise PretrainedWeightsError(f"ConvNeXt-V2 weights: {str(path)!r} does not fit {arch} "
                                         f"({str(error).strip().splitlines()[0]})") from None
    return network


def convnext_feature(network: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """f(x): globally average-pooled, layer-normed last-stage feature (timm ``pre_logits``), (B, 1024) for Base."""
    return network.forward_head(network.forward_features(images), pre_logits=True)


class PerceptualDistances(nn.Module):
    """Frozen LPIPS-VGG and (optionally) ConvNeXt-V2 distances on paired random resized crops.

    ``forward(x_hat, x, boxes) -> {"lpips": (B,), "convnext": (B,)}`` (raw distances; a missing net
    gives no key). The nets stay in eval mode (LPIPS's heads hold dropout) and never train.
    """

    def __init__(self, lpips_net: nn.Module, convnext: nn.Module | None = None, *, crop_size: int = CROP_SIZE):
        super().__init__()
        self.lpips_net, self.convnext, self.crop_size = lpips_net, convnext, crop_size
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "PerceptualDistances":
        return super().train(False)   # frozen feature extractors: dropout / norms always in eval mode

    def forward(self, x_hat: torch.Tensor, x: torch.Tensor, boxes: torch.Tensor) -> dict[str, torch.Tensor]:
        crop_hat, crop = paired_resized_crop(x_hat, x, boxes, self.crop_size)
        distances = {"lpips": self.lpips_net(crop_hat, crop).flatten()}      # inputs in [-1, 1]
        if self.convnext is not None:
            f_hat = convnext_feature(self.convnext, crop_hat).float()
            with torch.no_grad():
                f = convnext_feature(self.convnext, crop).float()
            distances["convnext"] = (f_hat - f).square().sum(dim=1)
        return distances
