"""The precision policy of a training step: ``fp32``, ``tf32`` or ``bf16``.

* ``fp32`` -- every matmul in IEEE float32 (PyTorch's default; the CPU default here).
* ``tf32`` -- float32 tensors, but CUDA matmuls and convolutions round their inputs to TensorFloat-32
  (10-bit mantissa) and accumulate in float32. The default on CUDA: the analogue of the authors' TPU
  default, where a float32 matmul is a bf16 pass. On a CPU there is no TF32: it is ``fp32`` there.
* ``bf16`` -- every pass of the step under ``torch.autocast(dtype=torch.bfloat16)``: the guidance passes,
  the JVP pass (primal and tangent) and the backward; matmuls run in bf16, while what autocast keeps in
  float32 stays there (softmax and the RMSNorm statistic: see ``full.model``). The tangent combination
  ``u + (t - r) du/dt``, the losses, the adaptive weights and the optimiser stay in float32: the network's
  outputs are cast back to float32 before ``pmf_ref`` sees them, and parameters and gradients are float32.

    apply_precision("tf32", device)           # once, at start-up: the global TF32 switches
    with autocast(precision, device): ...     # around each pass of the step (a no-op unless bf16)

What each policy costs in du/dt accuracy (against float64) is measured by ``python -m full.bench.precision``
and tested in tests/test_full_precision.py.
"""
from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "tf32", "bf16")
AUTOCAST_DTYPES = {"fp32": None, "tf32": None, "bf16": torch.bfloat16}


def check_precision(name: str) -> str:
    """``name`` if it is one of :data:`PRECISIONS`, else ValueError (one line)."""
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    return name


def default_precision(device: torch.device | str) -> str:
    """``"tf32"`` on CUDA (the authors' TPUs multiply float32 arrays in a bf16 pass by default), else ``"fp32"``."""
    return "tf32" if torch.device(device).type == "cuda" else "fp32"


def apply_precision(name: str, device: torch.device | str) -> None:
    """Set the global float32-matmul switches for ``name`` on ``device``'s backend.

    CUDA: TF32 for matmuls (cuBLAS) and convolutions (cuDNN) on under ``"tf32"``, off (IEEE float32) under
    ``"fp32"`` and ``"bf16"`` (under bf16 the float32 left over is the accurate part: keep it exact).
    CPU: nothing to set (no TF32 there). Uses the ``fp32_precision`` switches only; mixing them with the
    legacy ``allow_tf32`` flags is an error in PyTorch.
    """
    check_precision(name)
    if torch.device(device).type != "cuda":
        return
    mode = "tf32" if name == "tf32" else "ieee"
    torch.backends.cuda.matmul.fp32_precision = mode
    torch.backends.cudnn.conv.fp32_precision = mode


def autocast_dtype(name: str) -> torch.dtype | None:
    """The autocast dtype of a policy: ``torch.bfloat16`` for ``"bf16"``, else None (no autocast)."""
    return AUTOCAST_DTYPES[check_precision(name)]


def autocast(name: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """``torch.autocast(device.type, dtype=autocast_dtype(name))``, or a no-op context for fp32 / tf32."""
    dtype = autocast_dtype(name)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


__all__ = ["PRECISIONS", "check_precision", "default_precision", "apply_precision", "autocast_dtype", "autocast"]
