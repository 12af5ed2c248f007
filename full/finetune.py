"""Start training from the authors' released weights (``pMF-B-16.pt`` ... ``pMF-H-32.pt``).

Their torch files are inference networks (full/official.py): no v-head, and a label table of 1000
classes plus the null label. :func:`init_from_official` copies such a file into a freshly built
*training* network (``PMFViT(v_head=True)``) under two documented rules:

* **v-head** (absent from the file): each of its blocks, its norm and its output layer start as a copy
  of the u-head's (``V_HEAD_RULE = "copy-u"``). The two heads share the trunk and, at h = t - r = 0,
  predict the same quantity (u(z, t, t) = v(z, t)), so the copy starts the v-head at the released
  network's own instantaneous velocity -- the JVP tangent and the guidance target of the first steps
  are those of a trained model instead of a zero-output head. ``"fresh"`` keeps the model's random init
  (zero-initialised output layer). Measured on digits with the procedure of ``python -m full.digits.finetune``
  (pMF-T/4, 16 px; a 10-class "release" trained 600 steps, written in the authors' layout without v-head,
  fine-tuned on the same data; FD of 500 raw-weight samples, release 41.7; two data orders, which alone
  move FD by about 5): copy-u 40.0 / 42.8 after 25 steps, 32.3 / 30.0 after 100, 34.5 / 30.3 after 200;
  fresh 70.5 / 98.9, 41.2 / 34.5, 25.7 / 24.1; from scratch about 2810, 1830, 930. So copy-u stays
  within about 1 FD of the release from the first step while fresh first loses it (by 29-57 FD) for
  ~100 steps; by 200 steps fresh is ahead by 6-9 -- copy-u is the rule for short fine-tunes. (14 min on 2
  cores.) A file that does hold a v-head (an export of ours with one, or a conversion of their JAX
  ``-full`` archive) loads it as is.
* **labels**: a model with K classes takes K rows of the file's table -- ``class_rows`` (e.g. the
  ImageNet ids the new classes correspond to), by default the first K -- and the file's *null row*
  (its last) as its own null row K, so unconditional generation and classifier-free guidance keep the
  learned null embedding. K may not exceed the file's class count. The rows matter: fine-tuning that
  digits release on digits 5-9 alone, ``class_rows=[5, ..., 9]`` starts at 100% class accuracy (FD 108
  against digits 5-9), the default first rows at 0% (FD 1168; 100% only after 100 steps).

    model = build_model("pMF-B/16", num_classes=3)                   # training network, v-head included
    init_from_official(model, "pMF-B-16.pt", num_classes=3)          # before the EMAs and the optimiser

Everything else must fit exactly (preset, resolution, patch): a mismatch is a one-line
:class:`InitFromOfficialError` naming the file and the key.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

from .model import PMFViT, predicts_image
from .official import OfficialCheckpointError, _read, load_official_state_dict

LABEL_KEY = "y_embedder.embedding_table._flax_embedding.weight"   # (classes + 1, W), last row = null
V_HEAD_RULES = ("copy-u", "fresh")
V_HEAD_RULE = "copy-u"
"""Default rule for a file without a v-head (see the module docstring and its measurement)."""
_U_TO_V = (("u_heads.", "v_heads."), ("u_final_layer.", "v_final_layer."))


class InitFromOfficialError(ValueError):
    """A released file that cannot start this run; the one-line message names the file and what is wrong."""


def official_num_classes(path: str | os.PathLike) -> int:
    """The number of classes of a released file (its label table's rows minus the null row)."""
    state = _read_state(path)
    return _label_table(state, path).shape[0] - 1


def _read_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    try:
        return _read(str(path))
    except OfficialCheckpointError as error:
        raise InitFromOfficialError(str(error)) from None


def _label_table(state: dict[str, torch.Tensor], path) -> torch.Tensor:
    table = state.get(LABEL_KEY)
    if table is None or table.ndim != 2 or table.shape[0] < 2:
        raise InitFromOfficialError(f"{path}: no label table 'net.{LABEL_KEY}' of shape (classes + 1, width); "
                                    f"not a file of the authors' pixelMeanFlow")
    return table


def resize_label_table(table: torch.Tensor, num_classes: int, class_rows: Sequence[int] | None = None) -> torch.Tensor:
    """The label table of a K-class model from a released one: K chosen rows, then the null row.

    Args:
        table: (K_file + 1, W), the last row the null label.  num_classes: K <= K_file.
        class_rows: K distinct indices into the file's classes (default: 0..K-1).
    Returns:
        (K + 1, W): row k = ``table[class_rows[k]]``, row K = ``table[-1]`` (null).
    """
    file_classes = table.shape[0] - 1
    rows = list(range(num_classes)) if class_rows is None else [int(row) for row in class_rows]
    if len(rows) != num_classes:
        raise ValueError(f"class_rows has {len(rows)} entries, expected one per class ({num_classes})")
    if len(set(rows)) != len(rows) or not all(0 <= row < file_classes for row in rows):
        raise ValueError(f"class_rows must be distinct classes in [0, {file_classes}), got {rows}")
    return torch.cat([table[rows], table[-1:]]).clone()


def init_from_official(model: PMFViT, path: str | os.PathLike, *, num_classes: int,
                       class_rows: Sequence[int] | None = None, v_head_rule: str = V_HEAD_RULE) -> dict:
    """Copy the authors' released weights at ``path`` into ``model`` (in place) to fine-tune from them.

    Call it right after building the model, before the EMAs, the optimiser, DDP / FSDP wrapping (every
    rank reads the file, so all start equal). The rules for the v-head and the label table are the
    module docstring's.

    Args:
        model: a PMFViT of the file's preset (x-prediction; with or without a v-head).
        path: ``pMF-*.pt`` in the authors' layout (``net.*`` keys), or any state dict in it.
        num_classes: the classes of the data, K; must equal ``model.num_classes`` and be <= the file's.
        class_rows: which of the file's classes the K classes start from (default: the first K).
        v_head_rule: "copy-u" (default) or "fresh", used only when the file has no v-head.
    Returns:
        ``{"source", "file_classes", "num_classes", "class_rows", "v_head"}`` (v_head: "file", a rule, or
        None for an inference model) -- for the run's start-up summary.
    Raises:
        InitFromOfficialError: one line naming the file: unreadable, not their layout, or not this network.
        ValueError: arguments that do not fit the model (num_classes, class_rows, v_head_rule).
    """
    if v_head_rule not in V_HEAD_RULES:
        raise ValueError(f"v_head_rule must be one of {V_HEAD_RULES}, got {v_head_rule!r}")
    if num_classes != model.num_classes:
        raise ValueError(f"num_classes={num_classes} but the model was built with {model.num_classes} classes")
    if not predicts_image(model.prediction):
        raise ValueError("the released networks predict x: build the model with prediction='x'")
    state = _read_state(path)
    table = _label_table(state, path)
    file_classes = table.shape[0] - 1
    if num_classes > file_classes:
        raise InitFromOfficialError(f"{path}: holds {file_classes} classes, fewer than the {num_classes} asked for; "
                                    f"a fine-tuned model can keep or drop classes, not add them")
    try:
        state[LABEL_KEY] = resize_label_table(table, num_classes, class_rows)
    except ValueError as error:
        raise ValueError(f"class_rows: {error}") from None
    file_has_v_head = any(key.startswith(("v_heads.", "v_final_layer.")) for key in state)
    v_head = None
    if model.v_head is not None:
        v_head = "file" if file_has_v_head else v_head_rule
        if v_head == "copy-u":
            state.update(_v_head_from_u_head(state))
        elif v_head == "fresh":   # the model's own init, written into the file's layout so the load is strict
            from .official import official_name
            state.update({official_name(name): tensor.detach().clone() for name, tensor in model.state_dict().items()
                          if name.startswith("v_head.")})
    elif file_has_v_head:            # an inference model: the file's v-head is not needed
        state = {key: value for key, value in state.items() if not key.startswith(("v_heads.", "v_final_layer."))}
    try:
        with torch.no_grad():
            load_official_state_dict(model, state, source=str(path))
    except OfficialCheckpointError as error:
        raise InitFromOfficialError(str(error)) from None
    return {"source": str(path), "file_classes": file_classes, "num_classes": num_classes,
            "class_rows": list(range(num_classes)) if class_rows is None else [int(row) for row in class_rows],
            "v_head": v_head}


def _v_head_from_u_head(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Their v-head keys holding copies of the u-head's tensors (``u_heads.i.*`` -> ``v_heads.i.*``)."""
    copies = {}
    for key, value in state.items():
        for u_prefix, v_prefix in _U_TO_V:
            if key.startswith(u_prefix):
                copies[v_prefix + key[len(u_prefix):]] = value.clone()
    return copies


__all__ = ["V_HEAD_RULE", "V_HEAD_RULES", "InitFromOfficialError", "init_from_official", "official_num_classes",
           "resize_label_table"]
