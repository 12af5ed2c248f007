"""Process-group set-up for ``torchrun`` (or an already initialised group, as in the tests).

One process per device. ``torchrun --nproc_per_node=N -m full.train ...`` sets RANK, WORLD_SIZE
and LOCAL_RANK; a plain ``python -m full.train`` runs as rank 0 of 1 without a process group.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


class DistInfo(NamedTuple):
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def world_size_from_env() -> int:
    """The process group's size, else WORLD_SIZE set by torchrun (1 without it): known before start-up,
    so the batch size is checked before any process group is joined."""
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: str | None = None) -> DistInfo:
    """Join (or reuse) the default process group: NCCL on CUDA, gloo on CPU.

    Args:
        device: "cpu", "cuda" or "cuda:N" to force a device; default (None or "auto") CUDA when available.
            Under torchrun every process takes the GPU of its LOCAL_RANK; "cuda:N" picks GPU N only
            in a single process.
    Returns:
        ``DistInfo``; world_size 1 and no process group outside torchrun.
    """
    device = None if device == "auto" else device
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if not dist.is_initialized() and world_size_from_env() > 1:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        host_group()   # made now, at set-up, on every rank together
    else:
        rank, world_size, local_rank = 0, 1, 0
        if device is not None and device.startswith("cuda:"):
            local_rank = int(device.split(":")[1])
    if use_cuda:
        torch.cuda.set_device(local_rank)
        return DistInfo(rank, world_size, local_rank, torch.device("cuda", local_rank))
    return DistInfo(rank, world_size, local_rank, torch.device("cpu"))


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Average a tensor over all ranks (identity without a process group); for logging. On the tensor's
    device: with NCCL the all-reduce is queued on the stream, the host does not wait for it."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= dist.get_world_size()
    return values


_HOST_GROUP = None   # (the default group it belongs to, the gloo group)


def host_group():
    """The group to agree on host values (a CPU tensor) over, without touching a device: None (the default
    group) when that is gloo or there is no group, else a gloo group over the same processes, made once per
    default group -- a collective, so every rank makes it at set-up in :func:`init_distributed`."""
    global _HOST_GROUP
    if not (dist.is_initialized() and dist.get_world_size() > 1) or dist.get_backend() == "gloo":
        return None
    if _HOST_GROUP is None or _HOST_GROUP[0] is not dist.group.WORLD:   # a new default group (tests make several)
        _HOST_GROUP = (dist.group.WORLD, dist.new_group(backend="gloo"))
    return _HOST_GROUP[1]


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any: an all-reduce of a CPU int over gloo (no device sync,
    so it can run every step); ``flag`` itself with one process."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int32)
    dist.all_reduce(value, group=host_group())
    return bool(value.numpy()[0] > 0)     # a CPU tensor: numpy() reads host memory, no dispatch


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def parallelize(step: torch.nn.Module, *, world_size: int, device: torch.device, fsdp: bool = False,
                fsdp_mixed_precision: str | None = None, compile: bool = False) -> torch.nn.Module:
    """The training step as the loop calls it: FSDP2-sharded (``fsdp``), DDP-wrapped (several processes)
    or as it is; then ``torch.compile``d (``compile``: forward, JVP and backward; the first step compiles).

    DDP and FSDP wrap the whole step, not the network: the JVP runs inside the wrapper's ``forward``, so
    every use of the parameters is covered by its gradient all-reduce / reduce-scatter (full.fsdp).
    """
    if fsdp:
        from .fsdp import shard_objective

        step = shard_objective(step, mixed_precision=fsdp_mixed_precision)
    elif world_size > 1:
        step = DistributedDataParallel(step, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(step) if compile else step

