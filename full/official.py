"""The authors' released PyTorch checkpoints (``pMF-B-16.pt`` ... ``pMF-H-32.pt``): key table, loader, exporter.

Their files are plain state dicts of the torch ``pixelMeanFlow`` wrapper, whose network is the attribute
``net`` (a ``pmfDiT``), so every key reads ``net.<key>``; the inference files hold no v-head
(``v_heads.*``, ``v_final_layer.*``). :data:`KEY_TABLE` maps each of our parameter names to theirs,
one explicit rule per parameter kind -- no reshapes, no transposes (the layouts agree). Loading is
strict: a key of theirs that no rule maps, or a parameter of ours that the file lacks, is an error
naming it. ``rope_freqs`` (a complex buffer of the patch tokens' RoPE rotations) is recomputed from
the preset and compared, never loaded.

    model = load_official_checkpoint("pMF-B-16.pt", "pMF-B/16")      # inference PMFViT, eval mode
    state = to_official_state_dict(model)                             # back to their layout ("net." keys)

``python -m full.sample --official-ckpt pMF-B-16.pt --preset pMF-B/16`` samples from such a file with the
preset's best omega and interval.
"""
from __future__ import annotations

import os
import re

import torch

from .checkpoint import CheckpointError, read_checkpoint_file
from .model import NUM_PREFIX_TOKENS, PRESETS, PMFViT, build_model

PREFIX = "net."
ROPE_KEY = "rope_freqs"
ROPE_TOLERANCE = 1e-5  # their buffer is complex64: compare to float32 precision

# Our name -> theirs. "{i}" is a block index; block-internal names follow in BLOCK_TABLE.
KEY_TABLE: dict[str, str] = {
    "class_tokens": "class_tokens",
    "omega_tokens": "omega_tokens",
    "t_min_tokens": "t_min_tokens",
    "t_max_tokens": "t_max_tokens",
    "h_tokens": "time_tokens",                       # their "time" tokens carry h = t - r
    "pos_embed": "pos_embed",
    "patch_embed.reduce.weight": "x_embedder.proj1.weight",
    "patch_embed.reduce.bias": "x_embedder.proj1.bias",
    "patch_embed.expand.weight": "x_embedder.proj2.weight",
    "patch_embed.expand.bias": "x_embedder.proj2.bias",
    "y_embed.table.weight": "y_embedder.embedding_table._flax_embedding.weight",
    **{f"{ours}_embed.{layer}.{kind}": f"{theirs}_embedder.mlp.{index}._flax_linear.{kind}"
       for ours, theirs in (("h", "h"), ("omega", "omega"), ("t_min", "cfg_t_start"), ("t_max", "cfg_t_end"))
       for layer, index in (("fc1", 0), ("fc2", 2)) for kind in ("weight", "bias")},
    **{f"{head}_head.norm.weight": f"{head}_final_layer.norm.weight" for head in ("u", "v")},
    **{f"{head}_head.out.{kind}": f"{head}_final_layer.linear._flax_linear.{kind}"
       for head in ("u", "v") for kind in ("weight", "bias")},
}
BLOCK_GROUPS = {"trunk": "shared_blocks", "u_head.blocks": "u_heads", "v_head.blocks": "v_heads"}
BLOCK_TABLE: dict[str, str] = {
    "norm1.weight": "norm1.weight",
    "norm2.weight": "norm2.weight",
    **{f"attn.{name}.weight": f"attn.{name}_proj._flax_linear.weight" for name in ("q", "k", "v", "out")},
    "attn.q_norm.weight": "attn.q_norm.weight",
    "attn.k_norm.weight": "attn.k_norm.weight",
    "mlp.gate.weight": "mlp.w1._flax_linear.weight",    # theirs: w2(silu(w1 x) * w3 x)
    "mlp.value.weight": "mlp.w3._flax_linear.weight",
    "mlp.out.weight": "mlp.w2._flax_linear.weight",
    "gate_attn": "attn_scale",
    "gate_mlp": "mlp_scale",
}
_BLOCK_KEY = re.compile(r"^(trunk|u_head\.blocks|v_head\.blocks)\.(\d+)\.(.+)$")


class OfficialCheckpointError(ValueError):
    """A file that is not a usable checkpoint of the authors' layout; the message names the file and the key."""


def official_name(ours: str) -> str:
    """Their key (without ``net.``) for one of our parameter names; KeyError if no rule maps it."""
    match = _BLOCK_KEY.match(ours)
    if match:
        group, index, rest = match.groups()
        return f"{BLOCK_GROUPS[group]}.{index}.{BLOCK_TABLE[rest]}"
    return KEY_TABLE[ours]


def rope_freqs(model: PMFViT) -> torch.Tensor:
    """Their ``rope_freqs`` buffer recomputed from our angles: ``exp(i * angle)`` of the N patch tokens,
    (N, head_dim / 2), complex64."""
    cos = model.rope_cos[NUM_PREFIX_TOKENS:].double()
    sin = model.rope_sin[NUM_PREFIX_TOKENS:].double()
    return torch.complex(cos, sin).to(torch.complex64)


def to_official_state_dict(model: PMFViT) -> dict[str, torch.Tensor]:
    """Our model's weights in the authors' layout: ``{"net." + their key: tensor}``, plus ``rope_freqs``.

    The v-head is included when the model has one (their JAX "-full" archives hold it; the torch
    inference files do not)."""
    state = {PREFIX + official_name(name): tensor.detach().clone() for name, tensor in model.state_dict().items()}
    state[PREFIX + ROPE_KEY] = rope_freqs(model)
    return state


def _read(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise OfficialCheckpointError(f"{path}: no such file (download pMF-<size>-<patch>.pt from the authors' "
                                      f"Hugging Face page Lyy0725/pMF, unzip it, and pass the .pt file)")
    try:   # weights only: a shared file can never run code on load
        state = read_checkpoint_file(path, map_location="cpu")
    except CheckpointError as error:  # a truncated, foreign or pickled file: one line, not a traceback
        if "holds code and was refused" in str(error):   # readable, but refused: say only that
            raise OfficialCheckpointError(str(error)) from None
        raise OfficialCheckpointError(f"{path}: not a readable torch state dict ({error})") from None
    if not isinstance(state, dict) or not state or not all(
            isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items()):
        raise OfficialCheckpointError(f"{path}: expected a state dict {{key: tensor}} of the authors' pixelMeanFlow")
    prefixed = [key.startswith(PREFIX) for key in state]
    if any(prefixed) and not all(prefixed):
        odd = next(key for key in state if not key.startswith(PREFIX))
        raise OfficialCheckpointError(f"{path}: key {odd!r} lacks the 'net.' prefix that the other keys have")
    return {key[len(PREFIX):] if key.startswith(PREFIX) else key: value for key, value in state.items()}


def _expected_shapes(preset: str, v_head: bool) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = build_model(preset, v_head=v_head)
    return {official_name(name): tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def fitting_presets(state: dict[str, torch.Tensor]) -> list[str]:
    """The presets whose parameter shapes equal those of a state dict in their layout (no ``net.``)."""
    v_head = any(key.startswith(("v_heads.", "v_final_layer.")) for key in state)
    shapes = {key: tuple(value.shape) for key, value in state.items() if key != ROPE_KEY}
    return [name for name in PRESETS if _expected_shapes(name, v_head) == shapes]


def load_official_state_dict(model: PMFViT, state: dict[str, torch.Tensor], *, source: str = "state dict") -> None:
    """Copy a state dict in the authors' layout (keys with or without ``net.``) into ``model``, strictly.

    Raises:
        OfficialCheckpointError: naming the first unmapped key, missing key, shape mismatch, or a
        ``rope_freqs`` that differs from the model's.
    """
    state = {key[len(PREFIX):] if key.startswith(PREFIX) else key: value for key, value in state.items()}
    ours = model.state_dict()
    theirs_to_ours = {official_name(name): name for name in ours}
    has_v_head = any(key.startswith(("v_heads.", "v_final_layer.")) for key in state)
    if has_v_head and model.v_head is None:
        raise OfficialCheckpointError(f"{source}: holds a v-head (v_heads.*) but the model was built without one")
    for key in state:
        if key != ROPE_KEY and key not in theirs_to_ours:
            raise OfficialCheckpointError(f"{source}: key {PREFIX + key!r} is not a parameter of this network "
                                          f"(no rule of full.official.KEY_TABLE maps it)")
    mapped = {}
    for their_key, our_key in theirs_to_ours.items():
        if our_key.startswith("v_head.") and not has_v_head:
            continue                                  # inference files carry no v-head
        if their_key not in state:
            raise OfficialCheckpointError(f"{source}: missing key {PREFIX + their_key!r}")
        value = state[their_key]
        if tuple(value.shape) != tuple(ours[our_key].shape):
            raise OfficialCheckpointError(f"{source}: key {PREFIX + their_key!r} has shape {tuple(value.shape)}, "
                                          f"expected {tuple(ours[our_key].shape)}")
        mapped[our_key] = value
    if ROPE_KEY in state:
        expected = rope_freqs(model)
        found = state[ROPE_KEY]
        if found.shape != expected.shape or not torch.allclose(found.to(expected.dtype).cpu(), expected.cpu(),
                                                               atol=ROPE_TOLERANCE, rtol=0):
            raise OfficialCheckpointError(f"{source}: {PREFIX + ROPE_KEY!r} differs from the RoPE rotations this "
                                          f"network computes (shape {tuple(found.shape)} vs {tuple(expected.shape)})")
    if model.v_head is not None and not has_v_head:
        raise OfficialCheckpointError(f"{source}: has no v-head (an inference file); build the model with v_head=False")
    model.load_state_dict(mapped, strict=True)


def load_official_checkpoint(path: str, preset: str, *, device: torch.device | str = "cpu") -> PMFViT:
    """Load one of the authors' ``pMF-*.pt`` files into a :class:`PMFViT` of ``preset`` (eval mode).

    The v-head is built only if the file has one. A file whose shapes fit another preset says which.

    Raises:
        OfficialCheckpointError: a one-line message naming the file and what is wrong.
    """
    if preset not in PRESETS:
        raise OfficialCheckpointError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    state = _read(path)
    v_head = any(key.startswith(("v_heads.", "v_final_layer.")) for key in state)
    shapes = {key: tuple(value.shape) for key, value in state.items() if key != ROPE_KEY}
    if shapes != _expected_shapes(preset, v_head):
        fits = fitting_presets(state)
        if fits:
            raise OfficialCheckpointError(f"{path}: its shapes do not fit preset {preset}; they fit {', '.join(fits)} "
                                          f"(pass --preset {fits[0]})")
    with torch.device("meta"):                        # no random init of ~1B parameters just to overwrite them
        model = build_model(preset, v_head=v_head)
    model = model.to_empty(device="cpu")
    model.reset_rope_()
    load_official_state_dict(model, state, source=path)
    return model.to(device).eval()


__all__ = ["KEY_TABLE", "BLOCK_TABLE", "OfficialCheckpointError", "official_name", "rope_freqs",
           "to_official_state_dict", "fitting_presets", "load_official_state_dict", "load_official_checkpoint"]
