"""Count device-to-host synchronisations: the ops whose result the host must read before it can go on.

On a GPU each one stalls the launch queue until the device has caught up (``.item()``, ``bool(tensor)``,
``if tensor:``, a data-dependent shape such as ``nonzero`` or boolean-mask indexing). They are counted at
the dispatcher (a ``TorchDispatchMode``), so they are seen on a CPU too, where they cost nothing:

    with HostSyncCounter() as syncs:
        step()
    syncs.total, syncs.counts     # 0, {}   -- or e.g. 30, {"aten._local_scalar_dense": 30}
"""
from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
SYNC_OPS = {
    aten._local_scalar_dense.default: "aten._local_scalar_dense",   # .item(), bool(t), float(t), int(t)
    aten.nonzero.default: "aten.nonzero",                            # nonzero, argwhere, where(cond), mask indexing
    aten.masked_select.default: "aten.masked_select",
    aten.equal.default: "aten.equal",                                # torch.equal returns a Python bool
    aten._unique2.default: "aten._unique2",
    aten.unique_consecutive.default: "aten.unique_consecutive",
    aten.repeat_interleave.Tensor: "aten.repeat_interleave",          # output size from the repeats' values
}
"""Ops that need the device's values on the host; name as reported."""
MASK_INDEX_OPS = {aten.index.Tensor: "aten.index (boolean mask)", aten.index_put.default: "aten.index_put (boolean mask)",
                  aten.index_put_.default: "aten.index_put (boolean mask)"}
"""Indexing ops that sync only when an index is a boolean mask (its True count sets the shape)."""


def _has_mask(indices) -> bool:
    return any(isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in indices or ())


class HostSyncCounter(TorchDispatchMode):
    """Counts :data:`SYNC_OPS` dispatched inside the ``with`` block: ``counts`` (name -> calls), ``total``."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = SYNC_OPS.get(func)
        if name is None and func in MASK_INDEX_OPS and _has_mask(args[1]):
            name = MASK_INDEX_OPS[func]
        if name is not None:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def count_host_syncs(fn) -> dict:
    """``{"total": int, "by_op": {name: calls}}`` of one call of ``fn()``."""
    with HostSyncCounter() as counter:
        fn()
    return {"total": counter.total, "by_op": dict(counter.counts)}


__all__ = ["SYNC_OPS", "MASK_INDEX_OPS", "HostSyncCounter", "count_host_syncs"]
