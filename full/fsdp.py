"""Sharded training of the pMF objective (FSDP2): the sharding plan, Muon on shards, sharded EMAs, and
sharded checkpoints that are atomic, exactly resumable and readable on any number of processes.

    objective = shard_objective(TrainingStep.from_preset(model, preset), mixed_precision=None)   # after .to(device)
    optimizer = use_gathered_muon(build_optimizer(model, kind="muon", lr=1e-3))  # after sharding
    emas = ShardedEMA(model, (500, 1000, 2000))                                   # every rank
    save_sharded_checkpoint(out / "checkpoint.dcp", model=model, optimizer=optimizer, emas=emas, meta=meta)
    python -m full.fsdp export runs/pmf/checkpoint.dcp            # runs/pmf/checkpoint.pt, for full.sample

Sharding plan. ``fully_shard`` on every transformer ``Block`` (each is all-gathered just before it runs
and freed after) and on :class:`full.step.TrainingStep` as the root, which holds the rest (embedders,
tokens, heads' norms and output layers). The root must be the objective, not the ViT: the objective's
``forward`` runs the whole loss (the no-grad guidance pass and the JVP pass), while the ViT's
``__call__`` is never used (its trunk and heads are, through ``full.model.core_fns``), so FSDP's hooks
on it would never fire.
The frozen perceptual networks are left out of the sharding (replicated, as with DDP).

Gradients are reduce-scattered after every micro-batch's backward (no ``no_sync``): skipping the sync
would keep whole unsharded gradients alive between micro-batches, the memory FSDP is there to save.

Muon. Newton-Schulz needs the whole matrix. ``torch.optim.Muon`` given DTensor shards does compute
on the whole matrix (DTensor redistributes), but through bf16 partial sums, so its update differs
from the unsharded one by up to ~20% of some elements (measured on pMF-T/2). :class:`GatheredMuon`
instead all-gathers each momentum-updated matrix, runs torch's own Newton-Schulz on it and keeps its
rows: the update is bit-identical to an unsharded ``torch.optim.Muon`` step (tests/test_full_fsdp.py).

Checkpoints. ``torch.distributed.checkpoint`` writes every rank's shards into a temp folder, rank 0
adds ``meta.pt`` (step, RNG, data position, config, optimiser hyper-parameters: plain containers,
read with ``weights_only=True``); the folder is renamed to ``checkpoint-<step>.dcp`` (the step in 9 digits,
as the single-file ``checkpoint-<step>.pt``) and the link ``checkpoint.dcp`` is moved onto it with one
``os.replace``; then all but the ``keep_last`` newest folders are deleted. A kill at any point leaves the
link on the previous complete folder. Loading reshards, so a run saved on N processes resumes on M. Every
rank writes into the same folder: on several nodes it must be on a shared file system. DCP writes its
``.metadata`` file with pickle; it is read here by :func:`read_dcp_metadata`, an unpickler that builds
only DCP's metadata classes, ``torch.Size``, dtypes and paths and refuses anything else (a planted payload
never runs).

Mixed precision (``mixed_precision="bf16"``): parameters are all-gathered in bf16 and gradients
reduce-scattered in fp32, but every forward -- the JVP pass included -- computes in fp32 from the
gathered weights upcast at the point of use (the README's rule: the JVP pass stays fp32; bf16 rounding
in du/dt would enter the target through (t - r) du/dt): a step is the fp32 computation of the network with
bf16-rounded weights, and the gradients carry one bf16 rounding. What it buys: half the all-gather traffic.
What it costs: the fp32 copies the backward needs stay alive until it runs (one fp32 copy of the
block weights per micro-batch, 4.1 GiB for pMF-H/16). ``--bf16`` autocast still governs the no-grad
passes.
"""
from __future__ import annotations

import inspect
import os
import pickle
import resource
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp._fully_shard import _fsdp_param_group
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

from . import cli
from .checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_NAME, CheckpointError, read_checkpoint_file, save_checkpoint
from .ema import ema_decay, format_half_life
from .model import Block

SHARDED_NAME = "checkpoint.dcp"      # the link to the newest complete sharded checkpoint folder
META_NAME = "meta.pt"                # everything but the shards, written by rank 0
TEMP_PREFIX = ".tmp-"
MIXED_PRECISION = {None: None, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------- the sharding plan

def ensure_process_group(device: torch.device) -> None:
    """FSDP needs a process group even on one process: make a 1-rank one if none exists."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)


def _jvp_returning_views(ctx, param_group_tangent, *tangents):
    return tuple(t.view_as(t) if isinstance(t, torch.Tensor) else t for t in tangents)


def allow_jvp_through_fsdp() -> None:
    """Let forward-mode AD pass FSDP2's per-module input hook (torch 2.14 raises without this).

    FSDP2 routes a module's inputs through ``RegisterPostBackwardFunction``, whose forward returns them
    as they are; its ``jvp`` returns the tangents as they are too, and autograd then refuses ("forward is
    returning a view ... but the jvp is not returning a view") whenever a block input carries the JVP's
    tangent. Returning views of the tangents is what autograd asks for; nothing else changes.
    """
    _fsdp_param_group.RegisterPostBackwardFunction.jvp = staticmethod(_jvp_returning_views)


def shard_objective(objective: nn.Module, *, mixed_precision: str | None = None) -> nn.Module:
    """Apply the plan in place: ``fully_shard`` every ``Block``, then the objective as the root.

    Args:
        objective: a :class:`full.step.TrainingStep` on its device; a process group must exist.
        mixed_precision: None (fp32 everywhere) or "bf16" (bf16 all-gather, fp32 reduce and compute).
    Returns:
        the same objective, now an FSDP module whose parameters are DTensor shards.
    """
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision must be one of {list(MIXED_PRECISION)}, got {mixed_precision!r}")
    allow_jvp_through_fsdp()
    param_dtype = MIXED_PRECISION[mixed_precision]
    # cast_forward_inputs=False: the inputs (images, times, tangents) stay fp32; the weights are upcast.
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    frozen = set(objective.perceptual.parameters()) if getattr(objective, "perceptual", None) is not None else set()
    sharded = [module for module in objective.modules() if isinstance(module, Block)]
    for block in sharded:
        fully_shard(block, mp_policy=policy)
    fully_shard(objective, mp_policy=policy, ignored_params=frozen)
    if param_dtype is not None:
        frozen_ids = {id(param) for param in frozen}
        in_blocks = {id(module) for block in sharded for module in block.modules()}
        for block in sharded:
            _compute_in_fp32(block, _parameter_slots(block.modules(), frozen_ids))
        _compute_in_fp32(objective, _parameter_slots(
            (module for module in objective.modules() if id(module) not in in_blocks), frozen_ids))
    return objective


def _parameter_slots(modules, frozen: set[int]) -> list[tuple[nn.Module, str]]:
    return [(module, name) for module in modules for name, param in module._parameters.items()
            if param is not None and id(param) not in frozen]


def _compute_in_fp32(fsdp_module: nn.Module, owned: list[tuple[nn.Module, str]]) -> None:
    """Before each forward of an FSDP module, swap the bf16 weights it gathered for fp32 copies.

    The hook runs after FSDP's own pre-forward hook (registered first), when the weights are gathered;
    FSDP puts its own parameters back when it reshards. The copy's backward (a cast) sends the
    gradient to the gathered bf16 weight, from which FSDP reduce-scatters it in fp32.
    """
    def upcast(module, args):
        for owner, name in owned:
            param = owner._parameters[name]
            if param is not None and param.dtype == torch.bfloat16:
                owner._parameters[name] = param.float()

    fsdp_module.register_forward_pre_hook(upcast)


# ----------------------------------------------------------------------------- Muon on shards

class GatheredMuon(torch.optim.Muon):
    """``torch.optim.Muon`` whose Newton-Schulz step sees each whole matrix of a sharded parameter.

    Per 2-D parameter (Muon, Jordan et al. 2024; torch's ``_single_tensor_muon``, weight decay 0):

        B <- momentum B + (1 - momentum) G;   U = lerp(G, B, momentum) (Nesterov) or B
        W <- W - lr sqrt(max(1, A / B)) NewtonSchulz(U)       (W: (A, B), the *global* shape)

    The momentum buffer stays sharded; only U is all-gathered, one matrix at a time, and every rank
    keeps its own rows of NewtonSchulz(U). Plain tensors (no sharding) take the same path unchanged.
    """

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("GatheredMuon does not support closures")
        for group in self.param_groups:
            params, grads, buffers = [], [], []
            self._init_group(group, params, grads, buffers)
            for param, grad, buffer in zip(params, grads, buffers):
                buffer.lerp_(grad, 1 - group["momentum"])
                update = grad.lerp(buffer, group["momentum"]) if group["nesterov"] else buffer
                whole = update.full_tensor() if isinstance(update, DTensor) else update
                whole = _zeropower_via_newtonschulz(whole, group["ns_coefficients"], group["ns_steps"], group["eps"])
                if isinstance(param, DTensor):   # src_data_rank=None: slice locally, no communication
                    whole = distribute_tensor(whole, param.device_mesh, param.placements, src_data_rank=None)
                param.mul_(1 - group["lr"] * group["weight_decay"])
                param.add_(whole, alpha=-_adjust_lr(group["lr"], group["adjust_lr_fn"], param.shape))


def use_gathered_muon(optimizer):
    """Replace the Muon part of a :class:`full.optim.MuonWithNAdam` by :class:`GatheredMuon` (same
    parameters, hyper-parameters and state-dict layout); returns the optimiser."""
    muon = optimizer.optimizers.get("muon")
    if muon is not None and not isinstance(muon, GatheredMuon):
        if muon.state:
            raise ValueError("use_gathered_muon: swap the optimiser before its first step")
        group = muon.param_groups[0]
        accepted = inspect.signature(torch.optim.Muon.__init__).parameters
        optimizer.optimizers["muon"] = GatheredMuon(group["params"], **{key: value for key, value in group.items()
                                                                        if key in accepted and key != "params"})
    return optimizer


# ----------------------------------------------------------------------------- sharded EMAs

class ShardedEMA:
    """The EMAs of :class:`full.ema.EMASet` (same decay, same keys), kept as shards like the weights.

    Every rank averages its own shards: ``ema <- decay * ema + (1 - decay) * weights`` is elementwise,
    so no communication is needed. ``state_dict()`` holds DTensors (for DCP); the model has no
    persistent buffers, so parameters are the whole state.
    """

    def __init__(self, model: nn.Module, half_lives_kimg: tuple[float, ...]):
        if not half_lives_kimg or any(hl <= 0 for hl in half_lives_kimg):
            raise ValueError(f"half-lives must be a non-empty tuple of positive kimg, got {half_lives_kimg}")
        self.half_lives = {format_half_life(hl): float(hl) for hl in half_lives_kimg}
        self.averages = {key: {name: param.detach().clone() for name, param in model.named_parameters()}
                         for key in self.half_lives}

    @torch.no_grad()
    def update(self, model: nn.Module, *, batch: int, images_seen: int) -> None:
        weights = [_local(param.detach()) for param in model.parameters()]
        for key, average in self.averages.items():
            decay = ema_decay(batch, self.half_lives[key], images_seen)
            torch._foreach_lerp_([_local(value) for value in average.values()], weights, 1.0 - decay)

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return self.averages

    def full_state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        """Whole tensors on every rank (a collective: every rank must call it)."""
        return {key: {name: whole(value) for name, value in average.items()} for key, average in self.averages.items()}


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a DTensor shard (a collective); a plain tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's whole tensors on every rank (a collective)."""
    return {name: whole(value.detach()) for name, value in model.state_dict().items()}


# ----------------------------------------------------------------------------- sharded checkpoints

def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _parameter_names(model: nn.Module) -> dict[int, str]:
    return {id(param): name for name, param in model.named_parameters()}


def _optimizer_layout(model: nn.Module, optimizer) -> dict:
    """Per sub-optimiser: the parameter names in its order and its ``param_groups`` (hyper-parameters,
    parameters as indices): all that ``torch.optim`` needs besides the per-parameter state tensors."""
    names = _parameter_names(model)
    return {key: {"params": [names[id(p)] for group in opt.param_groups for p in group["params"]],
                  "param_groups": opt.state_dict()["param_groups"]}
            for key, opt in optimizer.optimizers.items()}


def _optimizer_state_by_name(model: nn.Module, optimizer) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """``{sub-optimiser: {parameter name: {state key: tensor}}}``; empty states are created first
    (a zero-learning-rate step with zero gradients, which changes no weight) so a fresh optimiser can
    receive a checkpoint's state in place."""
    names = _parameter_names(model)
    for opt in optimizer.optimizers.values():
        if not opt.state:
            _initialise_state(opt)
    return {key: {names[id(p)]: dict(opt.state[p]) for group in opt.param_groups for p in group["params"]}
            for key, opt in optimizer.optimizers.items()}


@torch.no_grad()
def _initialise_state(opt: torch.optim.Optimizer) -> None:
    saved_lr = [group["lr"] for group in opt.param_groups]
    params = [p for group in opt.param_groups for p in group["params"]]
    grads = [p.grad for p in params]
    for group in opt.param_groups:
        group["lr"] = 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    for p, grad in zip(params, grads):
        p.grad = grad
    for group, lr in zip(opt.param_groups, saved_lr):
        group["lr"] = lr


def _index_state(layout: dict, state_by_name: dict) -> dict:
    """``MuonWithNAdam.state_dict()`` layout from state keyed by parameter name."""
    return {key: {"state": {index: state_by_name[key][name] for index, name in enumerate(entry["params"])},
                  "param_groups": entry["param_groups"]}
            for key, entry in layout.items()}


def save_sharded_checkpoint(path: str | os.PathLike, *, model: nn.Module, optimizer, emas: ShardedEMA,
                            meta: dict, keep_last: int = 1, fault=None) -> Path:
    """Write a sharded checkpoint (every rank calls this) and move the link ``path`` onto it.

    Args:
        path: the link, e.g. ``out/checkpoint.dcp``; the folder is ``out/checkpoint-<step, 9 digits>.dcp``.
        model: the sharded PMFViT.  optimizer: a MuonWithNAdam on it.  emas: its ShardedEMA.
        meta: plain containers and tensors (``step``, ``rng``, ``data``, ``config``, ...), from rank 0.
        keep_last: checkpoint folders kept, the new one included (0 counts as 1).
        fault: tests only -- called with a stage name ("shards", "folder") to simulate a kill there.
    Returns:
        the checkpoint folder.
    """
    path = Path(path)
    step = int(meta["step"])
    folder = path.parent / f"{path.stem}-{step:09d}{path.suffix}"
    temp = path.parent / f"{TEMP_PREFIX}{folder.name}"      # the same name on every rank
    if _rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temp, ignore_errors=True)     # left by a save killed at this very step
    _barrier()
    tensors = {"model": model.state_dict(), "ema": emas.state_dict(),
               "optimizer": _optimizer_state_by_name(model, optimizer)}
    dcp.save(tensors, checkpoint_id=temp, no_dist=not dist.is_initialized())   # rank 0 writes .metadata last
    if fault is not None:
        fault("shards")
    if _rank() == 0:
        save_checkpoint(temp / META_NAME, {**meta, "format": CHECKPOINT_FORMAT, "sharded": True,
                                           "world_size": dist.get_world_size() if dist.is_initialized() else 1,
                                           "optimizer_layout": _optimizer_layout(model, optimizer)})
        _fsync_folder(temp)
        copy = 0
        while folder.exists():                       # this step saved before: never touch the linked folder
            copy += 1
            folder = path.parent / f"{path.stem}-{step:09d}.{copy}{path.suffix}"
        os.rename(temp, folder)                      # atomic: the folder appears complete or not at all
        if fault is not None:
            fault("folder")
        link_temp = path.parent / f"{TEMP_PREFIX}{path.name}.link"
        link_temp.unlink(missing_ok=True)
        os.symlink(folder.name, link_temp)
        os.replace(link_temp, path)                  # atomic: the link names the old folder or the new one
        _fsync_folder(path.parent)
        for older in sharded_folders(path)[:-max(keep_last, 1)]:   # oldest first; the linked one is the newest
            shutil.rmtree(older)
    _barrier()
    return path.resolve()


def sharded_folders(path: str | os.PathLike) -> list[Path]:
    """The complete checkpoint folders beside the link ``path`` up to the one it names, oldest first."""
    path = Path(path)
    if not path.exists():
        return []
    current = path.resolve()
    found = sorted((candidate for candidate in path.parent.glob(f"{path.stem}-*{path.suffix}")
                    if candidate.is_dir() and not candidate.is_symlink()), key=lambda folder: folder.name)
    return [folder for folder in found if folder.name <= current.name]


def _fsync_folder(folder: Path) -> None:
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def remove_stale_sharded(path: str | os.PathLike) -> list[Path]:
    """Delete what a killed save of the link ``path`` left behind: temp folders, and checkpoint folders
    newer than the one the link names (``--keep-last`` keeps the older ones). Rank 0, before training;
    returns the removed paths."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    kept = {folder.resolve() for folder in sharded_folders(path)}
    stale = [candidate for pattern in (f"{TEMP_PREFIX}{path.stem}-*{path.suffix}", f"{TEMP_PREFIX}{path.name}.link",
                                       f"{path.stem}-*{path.suffix}")
             for candidate in sorted(path.parent.glob(pattern)) if candidate.resolve() not in kept]
    for candidate in stale:
        if candidate.is_dir() and not candidate.is_symlink():
            shutil.rmtree(candidate)
        else:
            candidate.unlink(missing_ok=True)
    return stale


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / META_NAME).is_file()


def resume_target(path: str | os.PathLike, newest_file) -> Path:
    """What ``--resume path`` continues: a sharded checkpoint folder itself, a run folder's
    ``checkpoint.dcp``, else ``newest_file(path)`` (the single-file checkpoints' rule)."""
    path = Path(path)
    if is_sharded_checkpoint(path):
        return path
    if is_sharded_checkpoint(path / SHARDED_NAME):
        return path / SHARDED_NAME
    return newest_file(path)


def remove_sharded(path: str | os.PathLike) -> None:
    """Delete the link ``path``, the folder it names and every other sharded checkpoint beside it."""
    path = Path(path)
    folders = sharded_folders(path)
    remove_stale_sharded(path)
    if path.is_symlink() or path.exists():
        path.unlink() if path.is_symlink() else shutil.rmtree(path)
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def read_sharded_meta(path: str | os.PathLike) -> dict:
    """``meta.pt`` of a sharded checkpoint (no process group needed; ``weights_only``).

    Raises:
        CheckpointError: not a complete sharded checkpoint folder.
    """
    path = Path(path)
    if path.is_file():
        raise CheckpointError(f"{str(path)!r} is a single-file checkpoint; --fsdp resumes a sharded checkpoint "
                              f"folder ({SHARDED_NAME}); resume this one without --fsdp")
    if not path.is_dir() or not (path / ".metadata").is_file() or not (path / META_NAME).is_file():
        raise CheckpointError(f"{str(path)!r} is not a complete sharded checkpoint folder (it needs .metadata "
                              f"and {META_NAME})")
    meta = read_checkpoint_file(path / META_NAME)
    if not isinstance(meta, dict) or not meta.get("sharded"):
        raise CheckpointError(f"{str(path / META_NAME)!r} is not the metadata of a sharded checkpoint")
    return meta


_DCP_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "TensorProperties",
                                              "ChunkStorageMetadata", "BytesStorageMetadata", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "Path"},
}
"""What a DCP ``.metadata`` pickle may build (plus ``torch.<dtype>``): data classes whose constructors only
store their arguments. Anything else -- ``os.system``, ``builtins.eval`` -- is refused, never called."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in _DCP_METADATA_CLASSES.get(module, ()) or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def read_dcp_metadata(path: str | os.PathLike):
    """The ``Metadata`` of the sharded checkpoint folder ``path``, unpickled without running code from it.

    Raises:
        CheckpointError: a missing, corrupt or foreign ``.metadata``, or one asking for anything but DCP's
        metadata classes (the message says it was refused and why).
    """
    file = Path(path) / ".metadata"
    try:
        with open(file, "rb") as handle:
            metadata = _MetadataUnpickler(handle).load()
    except pickle.UnpicklingError as error:
        if str(error).startswith("refused global"):
            raise CheckpointError(f"{str(file)!r} refused: it asks for Python objects other than DCP's metadata "
                                  f"({str(error)[len('refused '):]}); loading it could run code") from None
        raise CheckpointError(f"{str(file)!r} is corrupt (not a DCP metadata pickle: {error})") from None
    except (OSError, EOFError, ValueError, TypeError, AttributeError, KeyError, IndexError, ImportError) as error:
        raise CheckpointError(f"{str(file)!r} is unreadable or corrupt ({type(error).__name__}: {error})") from None
    if type(metadata).__name__ != "Metadata" or not isinstance(getattr(metadata, "state_dict_metadata", None), dict):
        raise CheckpointError(f"{str(file)!r} is not DCP metadata (it holds a {type(metadata).__name__})")
    return metadata


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's file reader with :func:`read_dcp_metadata` in place of its plain ``pickle.load``."""

    def read_metadata(self, *args, **kwargs):
        metadata = read_dcp_metadata(self.path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def load_sharded_checkpoint(path: str | os.PathLike, *, model: nn.Module, optimizer, emas: ShardedEMA) -> dict:
    """Read a sharded checkpoint into a sharded model, optimiser and EMAs (every rank calls this), on any
    number of processes; returns its ``meta`` (step, RNG, data position, config).

    Raises:
        CheckpointError: an incomplete folder, or shards that do not fit this model / optimiser / EMA set.
    """
    meta = read_sharded_meta(path)
    state_by_name = _optimizer_state_by_name(model, optimizer)
    if set(meta["optimizer_layout"]) != set(state_by_name):
        raise CheckpointError(f"{str(path)!r}: optimiser parts {sorted(meta['optimizer_layout'])}, this run has "
                              f"{sorted(state_by_name)}")
    tensors = {"model": model.state_dict(), "ema": emas.state_dict(), "optimizer": state_by_name}
    read_dcp_metadata(path)      # a corrupt or unsafe .metadata: one clear error on every rank
    try:                         # in place, resharded
        dcp.load(tensors, storage_reader=SafeFileSystemReader(Path(path)), no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as error:   # a BaseException: DCP wraps every rank's failure in it
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{str(path)!r}: its shards do not fit this run: {first}") from None
    model.load_state_dict(tensors["model"])
    for key, opt in optimizer.optimizers.items():
        opt.load_state_dict(_index_state(meta["optimizer_layout"], state_by_name)[key])
    return meta


# ----------------------------------------------------------------------------- export to one file

def load_sharded_whole(path: str | os.PathLike) -> tuple[dict, dict]:
    """(tensors, meta) of a sharded checkpoint as whole tensors, in one process (no process group)."""
    # What torch.distributed.checkpoint.format_utils.dcp_to_torch_save does, without writing a file.
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    meta = read_sharded_meta(path)
    read_dcp_metadata(path)
    tensors: dict = {}
    try:
        _load_state_dict(tensors, storage_reader=SafeFileSystemReader(Path(path)),
                         planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    except (Exception, CheckpointException) as error:   # CheckpointException is a BaseException
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{str(path)!r}: its shards are unreadable: {first}") from None
    return tensors, meta


def sharded_as_single_file(path: str | os.PathLike) -> dict:
    """The dict of a single-file checkpoint (:mod:`full.checkpoint`) from a sharded folder: same weights,
    EMAs, optimiser state, RNG, data position (``full.sample`` and ``full.export`` read it this way)."""
    tensors, meta = load_sharded_whole(path)
    layout = meta.pop("optimizer_layout")
    for key in ("sharded", "world_size"):
        meta.pop(key)
    return {**meta, "model": tensors["model"], "ema": tensors["ema"],
            "optimizer": _index_state(layout, tensors["optimizer"])}


def export_checkpoint(path: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Write :func:`sharded_as_single_file` to ``target`` (what the DDP trainer resumes)."""
    return save_checkpoint(target, sharded_as_single_file(path))


# ----------------------------------------------------------------------------- memory of a step

MALLOC_MMAP_THRESHOLD = "MALLOC_MMAP_THRESHOLD_"


def _rss_bytes() -> int:
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _memory_worker(rank: int, world: int, init_file: str, preset: str, overrides: dict, sharded: bool,
                   half_lives: tuple, results) -> None:
    from torch.nn.parallel import DistributedDataParallel

    from .ema import EMASet
    from .model import build_model
    from .optim import build_optimizer
    from .step import TrainingStep

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        baseline = _rss_bytes()
        torch.manual_seed(0)
        model = build_model(preset, **overrides)
        objective = TrainingStep.from_preset(model, preset)
        if sharded:
            shard_objective(objective)
            emas = ShardedEMA(model, half_lives)
        else:
            emas = EMASet(model, half_lives) if rank == 0 else None     # the DDP trainer: EMAs on rank 0
            step_objective = DistributedDataParallel(objective)
        optimizer = build_optimizer(model, kind="muon", lr=1e-3)
        if sharded:
            use_gathered_muon(optimizer)
        shape = (model.channels, model.resolution, model.resolution)
        for step in range(2):            # the second step runs with every state allocated
            x = torch.zeros(world, *shape)
            randomness = objective.draw_randomness(x, generator=torch.Generator().manual_seed(step))
            y = torch.zeros(world, dtype=torch.long)
            rows = slice(rank, rank + 1)
            terms = (objective if sharded else step_objective)(x[rows], y[rows], randomness.rows(rank, rank + 1))
            terms["loss"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if emas is not None:
                emas.update(model, batch=world, images_seen=step * world)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
        results.put((rank, peak, sum(p.numel() for p in model.parameters())))
    finally:
        dist.destroy_process_group()


def measure_step_memory(preset: str, *, sharded: bool, world: int = 2, overrides: dict | None = None,
                        half_lives: tuple = (500.0, 1000.0, 2000.0)) -> dict:
    """Peak resident memory a training step adds to each of ``world`` gloo CPU processes (one image per
    process, Muon, the EMAs), DDP or FSDP; peak RSS above the RSS after start-up, so it counts states,
    activations and every transient buffer. Returns ``{"per_rank_gib": [...], "params": int}``."""
    import tempfile

    import torch.multiprocessing as mp

    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    # glibc keeps freed heap memory mapped (RSS then counts every tensor ever freed, e.g. FSDP's released
    # all-gather buffers); with mmap for every block over 64 KiB, a freed tensor leaves RSS at once.
    previous = os.environ.get(MALLOC_MMAP_THRESHOLD)
    os.environ[MALLOC_MMAP_THRESHOLD] = "65536"      # read by the spawned processes' C library at start-up
    try:
        with tempfile.TemporaryDirectory() as folder:
            mp.spawn(_memory_worker, args=(world, os.path.join(folder, "init"), preset, overrides or {}, sharded,
                                           half_lives, results), nprocs=world, join=True)
    finally:
        if previous is None:
            os.environ.pop(MALLOC_MMAP_THRESHOLD)
        else:
            os.environ[MALLOC_MMAP_THRESHOLD] = previous
    rows = sorted(results.get() for _ in range(world))
    return {"per_rank_gib": [peak / 2 ** 30 for _, peak, _ in rows], "params": rows[0][2]}


def state_bytes_per_rank(params: int, muon_params: int, *, world: int, emas: int = 3, sharded: bool) -> int:
    """Model states in bytes on the busiest rank, fp32: weights, gradients, Muon momentum, Adam m and v,
    the EMAs. DDP: everything whole (EMAs on rank 0); FSDP: everything split over ``world`` ranks."""
    adam = params - muon_params
    total = 4 * (params + params + muon_params + 2 * adam + emas * params)
    return total // world if sharded else total


# ----------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> None:
    parser = cli.Parser("python -m full.fsdp", __doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=cli.Parser)
    export = commands.add_parser("export", help="sharded checkpoint folder -> one checkpoint file (full.sample)",
                                 prog="python -m full.fsdp export", description="")
    export.add_argument("sharded", metavar="SHARDED", help="the sharded checkpoint, e.g. runs/pmf/checkpoint.dcp")
    export.add_argument("--out", default=None, metavar="DIR",
                        help=f"output folder: {CHECKPOINT_NAME} (default: SHARDED's folder, i.e. the run folder)")
    memory = commands.add_parser("memory", help="peak memory per process of a DDP and an FSDP step (gloo, CPU)",
                                 prog="python -m full.fsdp memory", description="")
    memory.add_argument("--preset", default="pMF-B/16", help="model preset")
    memory.add_argument("--resolution", type=int, default=32, help="image side; small images: the states dominate")
    memory.add_argument("--processes", type=int, default=2, help="gloo processes")
    args = parser.parse_args(argv)
    if args.command == "export":
        out = Path(args.out) if args.out is not None else Path(args.sharded).resolve().parent
        cli.check_out(parser, out)
        try:
            target = export_checkpoint(args.sharded, out / CHECKPOINT_NAME)
        except CheckpointError as error:
            print(f"python -m full.fsdp export: error: {error}", file=sys.stderr)
            raise SystemExit(2)
        print(f"wrote {target}")
        return
    from .model import build_model
    from .presets import ARCHITECTURES, PRESETS
    from .optim import split_parameters

    if args.preset not in PRESETS:
        parser.error(f"--preset: unknown preset {args.preset!r}; choose one of {sorted(PRESETS)}")
    if args.processes < 1:
        memory.error(f"--processes must be >= 1, got {args.processes}")
    overrides = {"resolution": args.resolution, "patch": ARCHITECTURES[args.preset].patch}
    try:
        with torch.device("meta"):
            muon = sum(p.numel() for p in split_parameters(build_model(args.preset, **overrides))[0])
    except ValueError as error:   # e.g. a resolution that the preset's patch does not divide
        memory.error(f"--resolution: {error}")
    print(f"| {args.preset} at {args.resolution} px, {args.processes} gloo processes | peak RSS added per "
          f"process (GiB) | model states, busiest rank (GiB) |\n|---|---|---|")
    for sharded in (False, True):
        measured = measure_step_memory(args.preset, sharded=sharded, world=args.processes, overrides=overrides)
        states = state_bytes_per_rank(measured["params"], muon, world=args.processes, sharded=sharded) / 2 ** 30
        per_rank = " / ".join(f"{value:.2f}" for value in measured["per_rank_gib"])
        print(f"| {'FSDP (--fsdp)' if sharded else 'DDP'} | {per_rank} | {states:.2f} |", flush=True)


if __name__ == "__main__":
    main()
