# %% [markdown]
# # 06 — From the toy to ImageNet
#
# Tutorials 01–05 used MLPs on 2-D points. The ImageNet model changes the *network* and the
# *training machinery*, not the method: the loss is still `pmf_ref.pmf_guided_loss` (tutorial 05's
# recipe, released-code form). This tutorial walks through what changes at scale, using the
# repository's `full/` package:
#
# | | toy (tutorials 03, 05) | ImageNet (`full/`) |
# |---|---|---|
# | network | MLP on [z, t, h, cond] | ViT, bottleneck patch embedding, 20 in-context condition tokens, RoPE, SwiGLU, u-head + v-head (`full/model.py`) |
# | optimiser | Adam | Muon for weight matrices + Nesterov Adam for the rest (`full/optim.py`) |
# | weights sampled | EMA over ~200 steps | EDM-style EMAs, half-lives 500–2000 kimg (`full/ema.py`) |
# | loss | `pmf_guided_loss` | same + 0.4 LPIPS + 0.1 ConvNeXt-V2 feature loss on x_hat for t < 0.8 (`full/perceptual.py`) |
# | batch | one process | global batch 1024 over GPUs with DDP (`full/distributed.py`) |
#
# It counts the paper's presets, writes out one ViT block, writes out one training step of the
# released recipe next to the library's `TrainingStep` (and checks they give the same loss on the same
# draws), trains a tiny ViT for 500 steps on scikit-learn's 8x8 digits (upsampled, shipped with
# scikit-learn: nothing is downloaded), samples it in one step at several guidance scales, shows x- vs
# u-prediction at image scale, and finally builds a file in the layout of the authors' released
# weights and samples from it.
#
# Run: `python tutorials/06_from_toy_to_imagenet.py`, or cell by cell in Jupyter / VS Code (about
# 4 CPU-minutes; `PMF_TUTORIAL_FAST=1` for a quick, under-trained pass). Figures go to
# `runs/tutorials/06/`.
# <!-- given: 0.4 0.1 0.8 -->

# %%
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

import pmf_ref as P

sys.path.insert(0, str(Path(P.__file__).resolve().parents[1] / "tutorials"))  # _common, from any folder
from _common import (DIGITS_ARCH, DIGITS_BATCH, DIGITS_LR, digits_model, library_step, report,  # noqa: E402
                     sample_digits, save_figure, setup, steps, tile, train_digits, unseen_part)
from full.digits.classifier import load_or_train_classifier  # noqa: E402
from full.digits.data import DigitsDataset, off_subspace_rms  # noqa: E402
from full.digits.metrics import DigitsEvaluator  # noqa: E402
from full.ema import ema_decay  # noqa: E402
from full.model import build_model, make_cond, x_hat_from_output  # noqa: E402
from full.optim import split_parameters  # noqa: E402
from full.params import PAPER, analytic_gmacs, meta_model  # noqa: E402

out = setup("06")

# %% [markdown]
# ## 1. The presets: parameters and compute
#
# The paper's Table 8: B/L/H at 256 px with 16x16 patches, and at 512 px with 32x32 patches (the
# same 256 tokens; `noise_scale` grows with resolution, tutorial 08). The models are built on the
# `meta` device — shapes only, no memory — to count parameters; GMACs are counted analytically per
# forward of the inference network (trunk + u-head). The v-head is training-only and adds 8 blocks.

# %%
print(f"{'preset':10s} {'params (M)':>11s} {'paper':>7s} {'+v-head':>8s} {'GMACs':>7s} {'paper':>7s}")
for name, (paper_params, paper_gmacs) in PAPER.items():
    model = meta_model(name)
    params, gmacs = model.param_count(with_v_head=False), analytic_gmacs(name)
    print(f"{name:10s} {params / 1e6:11.1f} {paper_params / 1e6:7.0f} "
          f"{model.param_count(with_v_head=True) / 1e6:8.1f} {gmacs:7.1f} {paper_gmacs:7.0f}")
    if name == "pMF-B/16":
        report("pMF-B/16 inference parameters (M; paper 118)", params / 1e6)
        report("pMF-B/16 GMACs per forward (paper 33)", gmacs)

# %% [markdown]
# ## 2. The network: x-prediction with in-context conditioning, and no t
#
# `build_model(preset, ...)` builds a `PMFViT`. The image is cut into p x p patches (a p x p conv to
# a narrow *bottleneck*, then a 1x1 conv to the width); 20 learned tokens carrying the class (8),
# `1 - 1/omega` (4), `t_min` (2), `t_max` (2) and `h = t - r` (4) are prepended — no adaLN. The
# trunk splits into a u-head (the generator, `forward_u(z, r, t, cond)`) and a v-head
# (`forward_v(z, t, cond)`, at h = 0, training only); `forward_uv` runs both on one trunk pass. Both
# heads end in zero-initialised layers, so the network starts by predicting x_hat = 0.
#
# Here: the tiny CPU preset `pMF-T/4` (width 64, bottleneck 16) for 10 classes of 1-channel 16 x 16
# images, shortened to one trunk block and one block per head so that it trains in a few CPU-minutes.

# %%
RESOLUTION, PATCH, NUM_CLASSES = 16, 4, 10
print("shortened pMF-T/4:", DIGITS_ARCH)                        # trunk 1 + u-head 1 + v-head 1 block
model = digits_model(RESOLUTION, PATCH)                           # build_model("pMF-T/4", ..., **DIGITS_ARCH)
print(f"{model.param_count(with_v_head=False):,} parameters (+{model.param_count(True) - model.param_count(False):,} "
      f"in the v-head), {(RESOLUTION // PATCH) ** 2} patch tokens + 20 condition tokens")
z = torch.randn(4, 1, RESOLUTION, RESOLUTION)
cond = make_cond(torch.tensor([0, 1, 2, NUM_CLASSES]), omega=2.0, t_min=0.1, t_max=0.7)   # label 10 = null
x_hat = model.forward_u(z, torch.zeros(4), torch.ones(4), cond)
report("max |x_hat| of the freshly initialised network (zero-init heads)", x_hat.abs().max())

# %% [markdown]
# **One block, written out.** Every block of trunk and heads is the same pre-norm transformer block
# (`full.model.Block`): RMSNorm, attention with RMS-normalised queries and keys and 2-D RoPE on the
# patch tokens, a SwiGLU MLP, each added back through a per-channel gate that starts at zero — so
# every block starts as the identity. Here it is in plain torch, with the block's own weights,
# against the block itself (gates set non-zero so that the check sees the whole block):

# %%
def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotate_pairs(x, cos, sin):                                    # RoPE: rotate channel pairs (2i, 2i + 1)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)


def block_by_hand(block, x, cos, sin):
    """x (B, L, W) -> (B, L, W); L = 20 condition tokens + the patch tokens (only those rotate)."""
    attn, mlp = block.attn, block.mlp
    heads = attn.heads
    split = lambda tokens: tokens.unflatten(-1, (heads, -1)).transpose(1, 2)     # (B, heads, L, d)
    y = rms_norm(x, block.norm1.weight, block.norm1.eps)
    q = rotate_pairs(rms_norm(split(attn.q(y)), attn.q_norm.weight, attn.q_norm.eps), cos, sin)
    k = rotate_pairs(rms_norm(split(attn.k(y)), attn.k_norm.weight, attn.k_norm.eps), cos, sin)
    v = split(attn.v(y))
    weights = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)  # (B, heads, L, L)
    x = x + block.gate_attn * attn.out((weights @ v).transpose(1, 2).flatten(2))
    y = rms_norm(x, block.norm2.weight, block.norm2.eps)
    return x + block.gate_mlp * mlp.out(torch.nn.functional.silu(mlp.gate(y)) * mlp.value(y))


block = model.trunk[0]
with torch.no_grad():
    block.gate_attn.normal_(), block.gate_mlp.normal_()
    tokens = torch.randn(2, model.rope_cos.shape[0], model.pos_embed.shape[-1])   # (B, 20 + 16, 64)
    report("one ViT block: |written out - full.model.Block| (max)",
           (block_by_hand(block, tokens, model.rope_cos, model.rope_sin) - block(tokens, model.rope_cos, model.rope_sin)).abs().max())
    block.gate_attn.zero_(), block.gate_mlp.zero_()                           # back to the identity init

# %% [markdown]
# **t itself is not an input**: it enters only through `pmf_ref`'s conversion
# `u = (z - x_hat) / max(t, t_eps)`. The toy MLPs needed t; why can an image do without? Because
# an image's noise level is written in its pixels. Upsampled digits span only a 64-dimensional
# subspace of the 256 pixels, so the part of `z_t` outside it is pure noise, `t e`, and its size
# reads off t. A 2-D point has no such spare directions: the same point could be at any noise level.

# %%
digits = DigitsDataset(RESOLUTION)
g = torch.Generator().manual_seed(0)
x = digits.images[torch.randint(len(digits), (2000,), generator=g)]
t_true = torch.rand(2000, generator=g)
z_t = P.interpolate(x, torch.randn(x.shape, generator=g), t_true)
t_read = off_subspace_rms(z_t) / (1 - 64 / RESOLUTION**2) ** 0.5             # ||(I - P) z_t|| = t ||(I - P) e||
report("noise level read off a 16 x 16 digit's pixels: RMS error of t", (t_read - t_true).square().mean().sqrt())

# %% [markdown]
# ## 3. Muon and the EMA
#
# **Muon** orthogonalises the momentum of every weight *matrix* (5 Newton–Schulz steps) so that
# each update moves all singular directions equally; it applies to `nn.Linear` weights only, the
# rest (biases, norms, gates, tokens, embeddings, conv kernels) uses Nesterov Adam. The paper's
# ablation (B/16, 160 epochs, MSE only): FID 18.88 with Adam, 9.56 with Muon.
#
# **EMA**: samples come from exponential moving averages with half-lives given in images (EDM):
# `decay = 0.5 ** (batch / min(hl_kimg * 1000, 0.05 * images_seen))` — short while few images have
# been seen, so early averages do not freeze the random init in.
# <!-- given: 18.88 9.56 -->

# %%
muon, adam = split_parameters(model)
report("parameters updated by Muon (fraction)", sum(p.numel() for p in muon) / model.param_count(True))
print(f"  Muon: {len(muon)} matrices; Nesterov Adam: {len(adam)} other tensors")
for images_seen in (10_000, 1_000_000, 100_000_000):
    decay = ema_decay(1024, 2000.0, images_seen)
    print(f"  EMA decay, batch 1024, half-life 2000 kimg, after {images_seen:>11,} images: {decay:.6f}")
report("EMA decay in steady state, batch 1024, half-life 2000 kimg (0.5^(1024/2e6))",
       ema_decay(1024, 2000.0, 10**9))

# %% [markdown]
# ## 4. One training step, written out — and the library's
#
# One step of the released recipe, every equation a `pmf_ref` call: the step's randomness (the time
# pair with an exact half of the batch at r = t, the preset's logit-normal(0.8, 0.8); omega; the
# guidance interval; the label drop on r = t rows; the noise), then `P.pmf_guided_loss` with the
# model's two passes — `forward_uv` (both heads, the forward the JVP differentiates) and `forward_v` at
# h = 0 on [0, 1] for the guided target (one batched pass: the original label at the row's omega, the
# null label at omega = 1). `x_hat_from_output` reads the output as an image (x-prediction) or as u
# (the u-prediction ablation): the only line that changes between the two.
#
# `full.train` does not run this function: it runs the library's training-step object,
# `TrainingStep.from_preset(model, "pMF-T/4")` (`full/step.py`), which adds what a real run needs
# (DDP/FSDP wrapping, bf16 autocast of the no-grad pass, the perceptual terms). Its
# `draw_randomness(x, generator=...)` draws the step's randomness in one fixed order; given the same
# draws, the two must give the same loss.
# <!-- given: 0.8 -->

# %%
def written_out_step(model, x, y, rnd):
    """The released recipe's loss for one batch: ``(batch-mean loss, mean raw u-loss)``.

    rnd: the step's randomness -- e (B, C, H, W) noise; r, t, omega, t_min, t_max (B,); dropped (B,) bool.
    """
    B = x.shape[0]
    cond = make_cond(P.drop_labels(y, rnd.dropped, null_label=model.null_label), rnd.omega, rnd.t_min, rnd.t_max)

    def denoise_uv(z, r, t):                     # the JVP's forward: both heads at h = t - r, row's cond
        x_u, x_v = model.forward_uv(z, r, t, cond)
        return x_hat_from_output(model, z, x_u, t), x_hat_from_output(model, z, x_v, t)

    def guidance_denoise(z, t, omega_target):    # no grad: v-head at h = 0, interval [0, 1], label and null
        labels = torch.cat([y, torch.full_like(y, model.null_label)])
        z2, t2 = torch.cat([z, z]), torch.cat([t, t])
        cond2 = make_cond(labels, torch.cat([omega_target, torch.ones_like(omega_target)]), 0.0, 1.0)
        x_v = x_hat_from_output(model, z2, model.forward_v(z2, t2, cond2), t2)
        return x_v[:B], x_v[B:]

    terms = P.pmf_guided_loss(denoise_uv, guidance_denoise, x, rnd.e, rnd.r, rnd.t, omega=rnd.omega,
                              t_min=rnd.t_min, t_max=rnd.t_max, dropped=rnd.dropped)
    return (terms.loss_u + terms.loss_v).mean(), terms.raw_u.mean()   # batch mean last


digits = DigitsDataset(RESOLUTION)
check_model = digits_model(RESOLUTION, PATCH, seed=5)
for head in (check_model.u_head, check_model.v_head):                 # non-zero outputs: a real check
    torch.nn.init.normal_(head.out.weight, std=0.05)
step_object = library_step(check_model)                                # TrainingStep.from_preset(model, "pMF-T/4")
g = torch.Generator().manual_seed(0)
rows = torch.randint(len(digits), (DIGITS_BATCH,), generator=g)
x, y = digits.images[rows], digits.labels[rows]
rnd = step_object.draw_randomness(x, generator=g)
print({name: tuple(value.shape) for name, value in rnd._asdict().items()})
loss_by_hand, _ = written_out_step(check_model, x, y, rnd)
loss_library = step_object(x, y, rnd)["loss"]
report("written-out step vs the library's TrainingStep: relative loss difference on the same draws",
       (loss_by_hand - loss_library).abs() / loss_library.abs())
grads = [torch.autograd.grad(loss, list(check_model.parameters())) for loss in (loss_by_hand, loss_library)]
report("written-out step vs TrainingStep: max gradient difference / max gradient",
       max((a - b).abs().max() for a, b in zip(*grads)) / max(a.abs().max() for a in grads[1]))

# %% [markdown]
# Same loss, same gradients (to float32 rounding: the library computes the JVP with its own faster
# engine, `full.fast_jvp`, where the function above uses torch's reference JVP through `pmf_ref`): the
# function above *is* what `full.train` optimises, minus the perceptual terms. Training below uses
# it, with the library's draws, Muon + Nesterov Adam and one EDM EMA (the loop is `train_digits` in
# `tutorials/_common.py`, shared with tutorial 08, which trains with the library object directly).
#
# Deviations for a short CPU run: the shortened network above; batch 64; lr 3e-3 instead of pMF's
# 1e-3 (chosen for a 500-step run; try pMF's in the exercises below); no perceptual loss (its
# pretrained nets need RGB and weights; the paper's optimiser and sampler ablations are MSE-only too).
# <!-- given: 3e-3 1e-3 -->

# %%
num_steps = steps(500, 4)
ema_model, raw_u = train_digits(digits_model(RESOLUTION, PATCH), num_steps, loss_fn=written_out_step)
model = ema_model
tail = max(1, num_steps // 10)
report("raw u-loss, mean of the first 10% of steps", raw_u[:tail].mean())
report("raw u-loss, mean of the last 10% of steps", raw_u[-tail:].mean())

fig, ax = plt.subplots(figsize=(6, 3.5))
window = max(1, num_steps // 20)
ax.plot(np.convolve(raw_u, np.ones(window) / window, mode="valid"))
ax.set(xlabel="step", ylabel="raw u-loss per image (running mean)", yscale="log", title="tiny pMF ViT on 16 x 16 digits")
save_figure(fig, out / "training_loss.png", trained=True)

# %% [markdown]
# The raw loss is not a plain progress measure: its target contains the network's own guidance term
# `(1 - 1/omega)(v_c - v_u)`, which grows as the conditional and unconditional predictions separate,
# so a loss that levels off or creeps up late in the run does not by itself mean worse samples. Section 6 scores the samples instead.

# %% [markdown]
# ## 5. The JVP through a ViT
#
# Forward-mode AD has to pass through attention. Fused attention kernels do not support it, so the
# model computes attention with matmul + softmax where needed. A check in float64 on the trained
# network: `P.average_velocity_jvp` against a central finite difference along the tangent.

# %%
model64 = build_model("pMF-T/4", resolution=RESOLUTION, patch=PATCH, **DIGITS_ARCH).double().eval()
model64.load_state_dict(model.state_dict())
B = 4
z = torch.randn(B, 1, RESOLUTION, RESOLUTION, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
r = torch.tensor([0.0, 0.2, 0.3, 0.4], dtype=torch.float64)
t = torch.tensor([0.99, 0.6, 0.7, 0.5], dtype=torch.float64)         # t + h stays inside [0, 1]
cond64 = make_cond(torch.arange(B), torch.full((B,), 2.0, dtype=torch.float64),
                   torch.full((B,), 0.1, dtype=torch.float64), torch.full((B,), 0.7, dtype=torch.float64))
u_fn = P.u_fn_from_x_fn(lambda z_, r_, t_: model64.forward_u(z_, r_, t_, cond64))
tangent = P.tangent_from_model(u_fn, z, t, has_aux=True)
jvp = P.average_velocity_jvp(u_fn, z, r, t, v_tangent=tangent, has_aux=True)
h = 1e-5                                                             # near the V-curve minimum (tutorial 02)
with torch.no_grad():
    fd = (u_fn(z + h * tangent, r, t + h)[0] - u_fn(z - h * tangent, r, t - h)[0]) / (2 * h)
report("ViT: relative |JVP - finite difference| of du/dt", (jvp.dudt - fd).abs().max() / jvp.dudt.abs().max())

# %% [markdown]
# ## 6. One-step samples: every class, several guidance scales
#
# `x = x_theta(z_1, r = 0, t = 1; y, omega, t_min, t_max)`, one network call per image, from the
# EMA weights, at pMF-B/16's guidance interval [0.1, 0.7]. Rows: classes 0–9; columns: different
# noise; panels: omega. Scores: Fréchet distance of a small digits classifier's features to the
# training digits (the "FID" of `python -m full.digits`; lower is better) and its accuracy on the
# class each sample was asked for (both from `full.digits.metrics`).
# <!-- given: 0.1 0.7 -->

# %%
evaluator = DigitsEvaluator(load_or_train_classifier(out))
floor = evaluator.floor(RESOLUTION)
report("held-out real digits: FD (the floor)", floor["fd"])
y_eval = torch.arange(NUM_CLASSES).repeat_interleave(steps(50, 10))
z_eval = torch.randn(len(y_eval), 1, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(1))
omegas = (1.0, 2.0, 4.0)
shown = 6
samples = {}
fig, axes = plt.subplots(1, len(omegas) + 1, figsize=(3.6 * (len(omegas) + 1), 6.2))
for ax, omega in zip(axes, omegas):
    samples[omega] = images = sample_digits(ema_model, y_eval, z_eval, omega)
    scores = evaluator.evaluate(images, y_eval)
    report(f"one-step FD, omega = {omega}", scores["fd"])
    report(f"one-step class accuracy, omega = {omega}", scores["accuracy"])
    report(f"one-step mean pixel contrast (std per image), omega = {omega}", images.flatten(1).std(dim=1).mean())
    ax.imshow(tile(images, NUM_CLASSES, shown), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
    ax.set(title=f"omega = {omega}\nFD {scores['fd']:.0f}, accuracy {scores['accuracy']:.2f}", xticks=[], yticks=[])
difference = samples[4.0] - samples[1.0]                                     # same classes, same noise
report("mean |x(omega = 4) - x(omega = 1)| per pixel", difference.abs().mean())
axes[-1].imshow(tile(difference, NUM_CLASSES, shown, gap=0.0), cmap="RdBu_r", vmin=-1, vmax=1,
                interpolation="nearest")
axes[-1].set(title="omega = 4 minus omega = 1\n(red: brighter with guidance)", xticks=[], yticks=[])
save_figure(fig, out / "one_step_digits.png", trained=True)

images_here, steps_here = num_steps * DIGITS_BATCH, num_steps
images_paper = 320 * 1_281_167                                               # 320 epochs of ImageNet-1k
report("the paper's B/16 run sees this many times more images", images_paper / images_here)
report("... and takes this many times more optimiser steps (batch 1024)", images_paper / 1024 / steps_here)

# %% [markdown]
# In full mode every row shows its class (accuracy 1.00 at every omega), and guidance shows: the
# digits get sharper and more contrasted (pixel std 0.55 at omega = 1, 0.59 at 2, 0.70 at 4); the
# right panel is the change from omega = 1 to 4, 0.19 per pixel on average on the -1..1 scale. The
# FD, which compares feature statistics with the real digits, is lowest at omega = 2 (30, against 99
# unguided) and rises again at omega = 4 (101): too much guidance overshoots the data, as in tutorial
# 05. The samples of a row still look alike: after 500 steps the one-step map uses its noise input
# only a little; diversity comes with training. The paper's B/16 run sees about 12,800 times more
# images and takes about 800 times more optimiser steps.
# <!-- check: one-step class accuracy, omega = * in [1.00, 1.00] -->
# <!-- check: one-step FD, omega = 1.0 = 99 -->
# <!-- check: one-step FD, omega = 2.0 = 30 -->
# <!-- check: one-step FD, omega = 4.0 = 101 -->
# <!-- check: one-step mean pixel contrast (std per image), omega = 1.0 = 0.55 -->
# <!-- check: one-step mean pixel contrast (std per image), omega = 2.0 = 0.59 -->
# <!-- check: one-step mean pixel contrast (std per image), omega = 4.0 = 0.70 -->
# <!-- check: mean |x(omega = 4) - x(omega = 1)| per pixel = 0.19 -->
# <!-- check: the paper's B/16 run sees this many times more images = 12800 -->
# <!-- check: ... and takes this many times more optimiser steps (batch 1024) = 800 -->

# %% [markdown]
# ## 7. x- vs u-prediction at image scale
#
# The patch embedding sees each p x p patch only through its bottleneck: a p x p convolution to 16
# channels here (128 in pMF-B/16). At 16 px with patch 4 that is all 16 pixels of a patch. At 64 px
# with patch 16 a patch has 256 pixels — the situation of pMF-B/16, 768 values per patch through a
# bottleneck of 128 — and 240 of its 256 directions are **invisible** to the network: nothing it
# computes depends on them. A u-predicting network outputs u, and its one step is
# `x = z_1 - u(z_1)`: the invisible part of the noise `z_1` passes into the sample untouched,
# whatever the network learned, so the best any u-network can produce is the digit *plus* that
# noise. An x-predicting network outputs the image itself and carries no noise along. No training
# is needed to see it — two networks at 64 px, patch 16, with random (non-zero) output layers
# (`unseen_part`, shared with tutorial 08, projects each patch onto the null space of the patch conv):

# %%
def with_unseen_noise(network, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """The best a u-network can do from noise e: the image x plus e's invisible part, (B, C, H, W)."""
    unseen = unseen_part(network, e)
    return x + torch.nn.functional.fold(unseen, x.shape[-2:], kernel_size=network.patch, stride=network.patch)


BIG, BIG_PATCH = 64, 16
y_big = torch.arange(NUM_CLASSES).repeat_interleave(3)
z_big = torch.randn(len(y_big), 1, BIG, BIG, generator=torch.Generator().manual_seed(2))
networks = {}
for prediction in ("x", "u"):
    networks[prediction] = digits_model(BIG, BIG_PATCH, prediction=prediction, seed=3).eval()
    torch.nn.init.normal_(networks[prediction].u_head.out.weight, std=0.05)    # untrained, but not zero
    images = sample_digits(networks[prediction], y_big, z_big, 1.0)
    unseen_noise = unseen_part(networks[prediction], z_big)
    report(f"{prediction}-prediction, 64 px, patch 16: share of the unseen noise in its one-step samples",
           (unseen_part(networks[prediction], images) * unseen_noise).sum() / unseen_noise.square().sum())
report("64 px, patch 16, bottleneck 16: share of the noise energy the network cannot see",
       unseen_part(networks["u"], z_big).square().sum() / z_big.square().sum())

big_digits = DigitsDataset(BIG)
real = torch.stack([big_digits.images[big_digits.labels == k][0] for k in range(NUM_CLASSES)])
real = real.repeat_interleave(3, dim=0)                                        # (30, 1, 64, 64)
best_u = with_unseen_noise(networks["u"], real, z_big)
report("best u-network sample at 64 px: off-subspace RMS (real digits: 0)", off_subspace_rms(best_u).mean())
fig, axes = plt.subplots(1, 2, figsize=(7, 7.5))
for ax, images, title in ((axes[0], real, "real digits: what x-prediction\nmust output (no noise to keep)"),
                          (axes[1], best_u, "the best a u-network can output:\nthe digit + the noise it cannot see")):
    ax.imshow(tile(images, NUM_CLASSES, 3), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
    ax.set(title=title, xticks=[], yticks=[])
save_figure(fig, out / "x_vs_u_at_image_scale.png")

# %% [markdown]
# The u-network's samples contain all of the noise it cannot see (share 1.00 — a property of the
# architecture, not of training), the x-network's none of it (share 0.00); at 64 px with patch 16
# that invisible part is 94% of the noise energy. This is the paper's result at 256 px (B/16, patch
# dimension 768 > bottleneck 128: FID 9.56 with x-prediction, 164.89 with u-prediction) and its
# absence at 64 px (B/4, patch dimension 48 < 128: 3.80 vs 3.82). Tutorial 08 trains both across
# patch sizes and looks at what else changes with resolution: the noise scale and the perceptual
# loss's cutoff.
# <!-- check: u-prediction, 64 px, patch 16: share of the unseen noise in its one-step samples = 1.00 -->
# <!-- check: x-prediction, 64 px, patch 16: share of the unseen noise in its one-step samples = 0.00 -->
# <!-- check: 64 px, patch 16, bottleneck 16: share of the noise energy the network cannot see = 94% -->
# <!-- given: 9.56 164.89 3.80 3.82 -->
#
# ## 8. The authors' released weights
#
# The authors publish inference weights (`pMF-B-16.pt` ... `pMF-H-32.pt`, the `torch` branch of their
# repository): plain state dicts of their wrapper, every key `net.<key>` of their network, no v-head.
# `full/official.py` maps each of our parameter names to theirs, one rule per kind of parameter, with
# no reshapes or transposes (the layouts agree). Nothing is downloaded here: we write *random* weights
# of the small `pMF-T/4` in their layout, load that file the way a released one is loaded, and sample.
# <!-- given: 9.56 -->

# %%
from full.official import load_official_checkpoint, to_official_state_dict  # noqa: E402

torch.manual_seed(7)
source = build_model("pMF-T/4", v_head=False).eval()                        # 32 px RGB, 1000 classes
torch.nn.init.normal_(source.u_head.out.weight, std=0.05)                   # random, non-zero outputs
state = to_official_state_dict(source)                                      # their key names, "net." prefix
for key in ("net.x_embedder.proj1.weight", "net.time_tokens", "net.shared_blocks.0.attn.q_proj._flax_linear.weight",
            "net.shared_blocks.0.mlp.w1._flax_linear.weight", "net.u_final_layer.linear._flax_linear.weight"):
    print(f"  {key:55s} {tuple(state[key].shape)}")
print(f"  ... {len(state)} keys, none of them v_heads.* / v_final_layer.*")
path = out / "pMF-T-4_in_the_official_layout.pt"
torch.save(state, path.with_suffix(".tmp"))
path.with_suffix(".tmp").replace(path)

loaded = load_official_checkpoint(str(path), "pMF-T/4")                    # as for pMF-B-16.pt
y_official = torch.arange(8) * 100
z_official = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(8))
report("released-layout file, loaded vs the network it came from: max |sample difference|",
       (sample_digits(loaded, y_official, z_official, 8.5) - sample_digits(source, y_official, z_official, 8.5)).abs().max())
fig, ax = plt.subplots(figsize=(8, 1.6))
grid = torch.cat(list(sample_digits(loaded, y_official, z_official, 8.5).clamp(-1, 1)), dim=2)   # (3, 32, 8 * 32)
ax.imshow((grid.permute(1, 2, 0) + 1) / 2)
ax.set(title="one-step samples of random weights loaded from a file in the authors' layout", xticks=[], yticks=[])
save_figure(fig, out / "official_layout_samples.png")

# %% [markdown]
# With the real file (about 0.5 GB for B/16, from the authors' release), the same loader runs inside
# the sampler, at the preset's best omega and interval (B/16: omega 8.5 on [0.1, 0.7]):
#
#     python -m full.sample --official-ckpt pMF-B-16.pt --preset pMF-B/16 --per-class 50 --out samples/
#
# which writes 50 images per class, a `samples.npz` for FID, and a preview grid.
# <!-- given: 0.5 8.5 0.1 0.7 -->
#
# The same code, with `--preset pMF-B/16 --data /path/to/imagenet/train`, the perceptual loss and
# 8 GPUs, is the paper's setting (FID 3.12 at one step after 320 epochs): `python -m full.train`;
# `python -m full.sample` draws FID-50K sets from a checkpoint, `python -m full.params` prints the
# table of section 1, and `python -m full.digits` runs the paper's ablations on these digits.
# <!-- given: 8.5 0.1 0.7 3.12 -->

# %% [markdown]
# ## What to take away
#
# * At ImageNet scale the method is unchanged (the same `pmf_ref` loss); the network, the optimiser and
#   the EMA change. The ViT is not told t: an image's noise level is written in its pixels.
# * The written-out released step and the library's `TrainingStep` give the same loss and gradients
#   on the same draws; `full.train` runs the latter.
# * With a patch dimension above the bottleneck, a u-network's one step keeps the noise it cannot see;
#   an x-network does not — the paper's B/16 x- vs u-prediction result.
# * The authors' released weights load by name into the same network (`full.official`).
#
# ## Try it
#
# 1. Train at pMF's lr: `import _common; _common.DIGITS_LR = 1e-3` before the training cell. How far
#    does the FD at omega = 4 get in 500 steps?
# 2. Sample the trained model at pMF-B/16's best omega, 8.5: does the FD keep falling past omega = 4,
#    and what happens to the class accuracy?
# <!-- given: 8.5 -->
