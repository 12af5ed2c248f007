"""Parameter and GMAC counts of every PMFViT preset, checked against the paper (Table 8).

    python -m full.params                 # table: params (inference / with v-head), GMACs, paper, deviation,
                                          # and whether the count equals the authors' released network
    python -m full.params --json          # {preset: {"params", "params_with_v_head", "gmacs", "training_gmacs"}}
    python -m full.params --flop-counter  # also measure GMACs with torch.utils.flop_counter (slower)

Parameters are counted on a model built on the ``meta`` device (shapes only, no memory). GMACs
are computed **analytically** (:func:`analytic_gmacs`): multiply-accumulates of every matmul and
convolution in one forward of the inference network (trunk + u-head) for one image, i.e. the patch
embedding, the four scalar-embedder MLPs, per block the q/k/v/out and SwiGLU projections on all
20 + N tokens plus q k^T and (attention) v, and the output Linear on the N patch tokens.
Norms, RoPE, softmax, SiLU and additions are not counted (the usual convention). :func:`training_gmacs`
counts one released training step the same way, pass by pass (``full.bench``'s model FLOP utilisation).
``--flop-counter`` cross-checks with ``FlopCounterMode`` on meta tensors (FLOPs / 2); the test suite
asserts the two agree exactly, and :func:`analytic_params` agrees with ``sum(p.numel())``.
"""
from __future__ import annotations

import dataclasses
import json

import torch
from torch.utils.flop_counter import FlopCounterMode

from . import cli
from .model import NUM_PREFIX_TOKENS, SINUSOID_DIM, PMFViT, build_model, make_cond, swiglu_hidden
from .presets import ARCHITECTURES, PRESETS

NUM_SCALAR_EMBEDDERS = 4  # omega, t_min, t_max, h

# Paper Table 8: (inference parameters, GMACs per forward).
PAPER = {
    "pMF-B/16": (118e6, 33.0), "pMF-L/16": (410e6, 117.0), "pMF-H/16": (956e6, 271.0),
    "pMF-B/32": (120e6, 34.0), "pMF-L/32": (413e6, 117.0), "pMF-H/32": (959e6, 272.0),
}


# Exact parameter counts of the authors' released network (inference / with the v-head).
RELEASED_PARAMS = {
    "pMF-B/16": (118_234_240, 175_474_304), "pMF-L/16": (410_320_768, 511_789_696),
    "pMF-H/16": (955_508_992, 1_113_904_640),
}


def _arch(preset: str, overrides: dict) -> dict:
    """The preset's architecture numbers with overrides applied."""
    arch = dataclasses.asdict(ARCHITECTURES[preset])
    arch.update({k: v for k, v in overrides.items() if k in arch})
    return arch


def analytic_params(preset: str, with_v_head: bool = True, **overrides) -> int:
    """Parameter count in closed form (an oracle for ``model.param_count``)."""
    a = _arch(preset, overrides)
    width, patch_dim = a["width"], a["patch"] ** 2 * a["channels"]
    num_tokens = NUM_PREFIX_TOKENS + (a["resolution"] // a["patch"]) ** 2
    head_dim = width // a["heads"]
    block = (4 * width * width                          # q, k, v, out (bias-free)
             + 3 * width * swiglu_hidden(width)         # SwiGLU gate, value, out (bias-free)
             + 2 * width + 2 * head_dim                 # two RMSNorms, q-norm, k-norm
             + 2 * width)                               # residual gates
    head = a["head_depth"] * block + width + width * patch_dim + patch_dim  # blocks, RMSNorm, Linear
    embed = (a["channels"] * a["patch"] ** 2 * a["bottleneck"] + a["bottleneck"]  # p x p conv with bias
             + a["bottleneck"] * width + width                              # 1x1 conv
             + NUM_SCALAR_EMBEDDERS * (SINUSOID_DIM * width + width + width * width + width)
             + (a["num_classes"] + 1) * width                               # label table incl. null
             + NUM_PREFIX_TOKENS * width + num_tokens * width)              # tokens, position embed
    trunk = (a["depth"] - a["head_depth"]) * block
    return embed + trunk + head + (head if with_v_head else 0)


def analytic_gmacs(preset: str, **overrides) -> float:
    """GMACs of one inference forward (trunk + u-head) for one image; see the module docstring."""
    a = _arch(preset, overrides)
    width, patch_dim = a["width"], a["patch"] ** 2 * a["channels"]
    num_patches = (a["resolution"] // a["patch"]) ** 2
    num_tokens = NUM_PREFIX_TOKENS + num_patches
    per_block = (num_tokens * (4 * width * width + 3 * width * swiglu_hidden(width))
                 + 2 * num_tokens * num_tokens * width)        # q k^T and (attention) v, all heads
    macs = (a["depth"] * per_block
            + num_patches * (a["channels"] * a["patch"] ** 2 * a["bottleneck"] + a["bottleneck"] * width)
            + NUM_SCALAR_EMBEDDERS * (SINUSOID_DIM * width + width * width)
            + num_patches * width * patch_dim)                 # output Linear on patch tokens
    return macs / 1e9


def _gmacs_parts(preset: str, **overrides) -> dict[str, float]:
    """MACs per image of the pieces the forward and training counts are built from (see the docstrings)."""
    a = _arch(preset, overrides)
    width, patch_dim = a["width"], a["patch"] ** 2 * a["channels"]
    num_patches = (a["resolution"] // a["patch"]) ** 2
    num_tokens = NUM_PREFIX_TOKENS + num_patches
    block_linear = num_tokens * (4 * width * width + 3 * width * swiglu_hidden(width))
    block_attention = 2 * num_tokens * num_tokens * width        # q k^T and (attention) v, all heads
    conv_first = num_patches * a["channels"] * a["patch"] ** 2 * a["bottleneck"]
    return {"block_linear": block_linear, "block_attention": block_attention,
            "trunk_blocks": a["depth"] - a["head_depth"], "head_blocks": a["head_depth"],
            "patch_embed": conv_first + num_patches * a["bottleneck"] * width, "patch_embed_first": conv_first,
            "scalar_embedder": SINUSOID_DIM * width + width * width, "scalar_embedder_input": SINUSOID_DIM * width,
            "output": num_patches * width * patch_dim}


def training_gmacs(preset: str, *, tangent_free_v_head: bool = True, **overrides) -> dict[str, float]:
    """GMACs per image of one released training step (perceptual nets off), by pass, and their total.

    * ``guidance`` -- the no-grad v-head pass at h = 0 on 2B rows (conditional and unconditional):
      2 x (trunk + v-head) = 2 inference forwards.
    * ``jvp_primal`` -- the JVP pass's primal: trunk, u-head and v-head (one inference forward + a head).
    * ``jvp_tangent`` -- its tangent: every linear once more (one GEMM on the tangent rows); attention
      twice (``dq k^T + q dk^T`` and ``dP v + P dv``); the patch embedding (dz) and the h embedder (dh = 1);
      the v-head only when ``tangent_free_v_head`` is False (the authors' JAX drops that dead tangent).
    * ``backward`` -- twice the differentiated primal (gradients of the activations and of the weights),
      less the input gradients nobody needs (the image into the first convolution, the sinusoidal
      features into the four scalar embedders).

    ``total / forward`` is the released step in forwards; 2 FLOPs per MAC. tests/test_full_params.py checks
    the pieces against a hand count and the whole against ``FlopCounterMode`` on a real step.
    """
    parts = _gmacs_parts(preset, **overrides)
    block = parts["block_linear"] + parts["block_attention"]
    block_tangent = parts["block_linear"] + 2 * parts["block_attention"]
    forward = analytic_gmacs(preset, **overrides) * 1e9
    primal = forward + parts["head_blocks"] * block + parts["output"]
    tangent_blocks = parts["trunk_blocks"] + parts["head_blocks"] * (1 if tangent_free_v_head else 2)
    tangent = (tangent_blocks * block_tangent + parts["patch_embed"] + parts["scalar_embedder"]
               + parts["output"] * (1 if tangent_free_v_head else 2))
    backward = 2 * primal - parts["patch_embed_first"] - NUM_SCALAR_EMBEDDERS * parts["scalar_embedder_input"]
    macs = {"forward": forward, "guidance": 2 * forward, "jvp_primal": primal, "jvp_tangent": tangent,
            "backward": backward}
    macs["total"] = macs["guidance"] + primal + tangent + backward
    return {key: value / 1e9 for key, value in macs.items()}


def meta_model(preset: str, **overrides) -> PMFViT:
    """The preset built on the ``meta`` device: real shapes, no storage, no init cost."""
    with torch.device("meta"):
        return build_model(preset, **overrides)


def measured_gmacs(model: PMFViT) -> float:
    """GMACs of ``model.forward_u`` on one image, counted by ``FlopCounterMode`` (FLOPs / 2) on
    tensors on the model's device (use a meta model to count without compute)."""
    device = model.rope_cos.device
    z = torch.zeros(1, model.channels, model.resolution, model.resolution, device=device)
    t = torch.ones(1, device=device)
    cond = make_cond(torch.zeros(1, dtype=torch.long, device=device), 1.0, 0.0, 1.0)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.forward_u(z, torch.zeros_like(t), t, cond)
    return counter.get_total_flops() / 2 / 1e9


def count_preset(preset: str, flop_counter: bool = False) -> dict:
    """``{"params", "params_with_v_head", "gmacs", "training_gmacs"[, "gmacs_flop_counter"]}`` of one preset
    (``training_gmacs``: one released training step per image, :func:`training_gmacs`)."""
    model = meta_model(preset)
    row = {"params": model.param_count(with_v_head=False), "params_with_v_head": model.param_count(True),
           "gmacs": analytic_gmacs(preset), "training_gmacs": training_gmacs(preset)["total"]}
    if flop_counter:
        row["gmacs_flop_counter"] = measured_gmacs(model)
    return row


def _gmacs_str(gmacs: float) -> str:
    return f"{gmacs:.2f}" if gmacs >= 1 else f"{gmacs:.4f}"


def main(argv: list[str] | None = None) -> None:
    parser = cli.Parser("python -m full.params",
                        "Parameters (inference, and with the training-only v-head) and GMACs per forward of "
                        "every pMF ViT preset, compared with the paper's Table 8.")
    cli.add_json(parser, 'the counts, {preset: {"params": int, "params_with_v_head": int, "gmacs": float}},')
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), metavar="NAME",
                        help="presets to count (default: all)")
    parser.add_argument("--flop-counter", action="store_true",
                        help="also count GMACs with torch.utils.flop_counter.FlopCounterMode on meta tensors")
    args = parser.parse_args(argv)
    for name in args.presets:
        if name not in PRESETS:
            parser.error(f"--presets: unknown preset {name!r}; choose from {list(PRESETS)}")

    rows = {name: count_preset(name, args.flop_counter) for name in args.presets}
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    header = (f"{'preset':<10} {'params':>13} {'+v-head':>15} {'GMACs':>8} {'paper':>14} {'d params':>9} "
              f"{'d GMACs':>8} {'released':>9} {'train GMACs':>12}")
    if args.flop_counter:
        header += f" {'GMACs(fc)':>10}"
    print(header)
    for name, row in rows.items():
        paper_params, paper_gmacs = PAPER.get(name, (None, None))
        line = f"{name:<10} {row['params']:>13,} {row['params_with_v_head']:>15,} {_gmacs_str(row['gmacs']):>8}"
        if paper_params:
            line += (f" {paper_params / 1e6:>6.0f}M/{paper_gmacs:>5.0f}G"
                     f" {100 * (row['params'] / paper_params - 1):>+8.2f}% {100 * (row['gmacs'] / paper_gmacs - 1):>+7.2f}%")
        else:
            line += f" {'-':>14} {'-':>9} {'-':>8}"
        released = RELEASED_PARAMS.get(name)
        line += f" {('equal' if released == (row['params'], row['params_with_v_head']) else 'DIFFERS') if released else '-':>9}"
        line += f" {_gmacs_str(row['training_gmacs']):>12}"
        if args.flop_counter:
            line += f" {_gmacs_str(row['gmacs_flop_counter']):>10}"
        print(line)


if __name__ == "__main__":
    main()
