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
# It counts the paper's presets, then trains a tiny ViT for 500 steps on scikit-learn's 8x8
# digits (upsampled, shipped with scikit-learn: nothing is downloaded) with the training loop
# written out, samples it in one step at several guidance scales, and shows x- vs u-prediction at
# image scale.
#
# Run: `python tutorials/06_from_toy_to_imagenet.py`, or cell by cell in Jupyter / VS Code (about
# 4 CPU-minutes; `PMF_TUTORIAL_FAST=1` for a quick, under-trained pass). Figures go to
# `runs/tutorials/06/`.

# %%
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

import pmf_ref as P

sys.path.insert(0, str(Path(P.__file__).resolve().parents[1] / "tutorials"))  # _common, from any folder
from _common import report, save_figure, setup, steps  # noqa: E402
from full.digits.classifier import load_or_train_classifier  # noqa: E402
from full.digits.data import DigitsDataset, off_subspace_rms  # noqa: E402
from full.digits.metrics import DigitsEvaluator  # noqa: E402
from full.ema import EMASet, ema_decay  # noqa: E402
from full.model import build_model, make_cond  # noqa: E402
from full.presets import RECIPES  # noqa: E402
from full.optim import build_optimizer, split_parameters  # noqa: E402
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
ARCH = dict(num_classes=NUM_CLASSES, channels=1, depth=2, head_depth=1)   # trunk 1 + u-head 1 + v-head 1 block
model = build_model("pMF-T/4", resolution=RESOLUTION, patch=PATCH, **ARCH)
print(f"{model.param_count(with_v_head=False):,} parameters (+{model.param_count(True) - model.param_count(False):,} "
      f"in the v-head), {(RESOLUTION // PATCH) ** 2} patch tokens + 20 condition tokens")
z = torch.randn(4, 1, RESOLUTION, RESOLUTION)
cond = make_cond(torch.tensor([0, 1, 2, NUM_CLASSES]), omega=2.0, t_min=0.1, t_max=0.7)   # label 10 = null
x_hat = model.forward_u(z, torch.zeros(4), torch.ones(4), cond)
report("max |x_hat| of the freshly initialised network (zero-init heads)", x_hat.abs().max())

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
# ## 4. The training loop, written out
#
# One step of the released recipe, every equation a `pmf_ref` call (`full.train` runs the same
# recipe with DDP, checkpoints and logging around it): the time pair with an exact half of the batch
# at r = t (`P.sample_time_pair_released`, the preset's logit-normal(0.8, 0.8)), omega, the guidance
# interval, the label drop on r = t rows, then `P.pmf_guided_loss` with the model's two passes —
# `forward_uv` (both heads, the JVP's forward) and `forward_v` at h = 0 on [0, 1] for the guided
# target (one batched pass: the original label at the row's omega, the null label at omega = 1).
# `prediction="u"` reads the network's output as u instead of x (the only line that changes).
#
# Deviations for a short CPU run: the shortened network above; batch 64; lr 3e-3 instead of
# pMF's 1e-3 (measured, 300 steps of pMF-T/4 at batch 32: FD 255 with 1e-3, 42 with 3e-3); no
# perceptual loss (its pretrained nets need RGB and weights; the paper's optimiser and sampler
# ablations are MSE-only too).

# %%
RECIPE = RECIPES["pMF-T/4"]                      # B/16's recipe numbers: P_mean, P_std, omega_beta, ...
LEARNING_RATE, BATCH = 3e-3, 64


def train_digits(resolution: int, patch: int, prediction: str, num_steps: int, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model("pMF-T/4", resolution=resolution, patch=patch, **ARCH)
    optimizer = build_optimizer(model, kind="muon", lr=LEARNING_RATE)
    emas = EMASet(model, (2000.0,))
    data = DigitsDataset(resolution)
    g = torch.Generator().manual_seed(seed)

    def as_image(z, output, t):                  # x-prediction: the output is x_hat; u: read it as u
        return output if prediction == "x" else P.x_from_average_velocity(z, output, t)

    raw_u = []
    for step in range(num_steps):
        rows = torch.randint(len(data), (BATCH,), generator=g)
        x, y = data.images[rows], data.labels[rows]
        e = model.noise_scale * torch.randn(x.shape, generator=g)
        r, t = P.sample_time_pair_released(BATCH, mean=RECIPE.P_mean, std=RECIPE.P_std, generator=g)
        omega = P.sample_omega(BATCH, beta=RECIPE.omega_beta, generator=g)
        t_min, t_max = P.sample_guidance_interval(r, t, generator=g)
        dropped = P.label_drop_mask_diagonal(r, t, generator=g)
        cond = make_cond(P.drop_labels(y, dropped, null_label=model.null_label), omega, t_min, t_max)

        def denoise_uv(z, r_, t_):
            x_u, x_v = model.forward_uv(z, r_, t_, cond)
            return as_image(z, x_u, t_), as_image(z, x_v, t_)

        def guidance_denoise(z, t_, omega_target):
            labels = torch.cat([y, torch.full_like(y, model.null_label)])
            z2, t2 = torch.cat([z, z]), torch.cat([t_, t_])
            cond2 = make_cond(labels, torch.cat([omega_target, torch.ones_like(omega_target)]), 0.0, 1.0)
            x_v = as_image(z2, model.forward_v(z2, t2, cond2), t2)
            return x_v[:BATCH], x_v[BATCH:]

        terms = P.pmf_guided_loss(denoise_uv, guidance_denoise, x, e, r, t, omega=omega, t_min=t_min,
                                  t_max=t_max, dropped=dropped)
        optimizer.zero_grad(set_to_none=True)
        (terms.loss_u + terms.loss_v).mean().backward()
        optimizer.step()
        emas.update(model, batch=BATCH, images_seen=step * BATCH)
        raw_u.append(terms.raw_u.mean().item())
    return next(iter(emas.models.values())), model, np.array(raw_u)


def tile(images: torch.Tensor, rows: int, columns: int) -> torch.Tensor:
    """(rows * k, 1, H, W) images in row-major order -> one (rows (H + 1), columns (W + 1)) picture, 1-px gaps."""
    grid = torch.nn.functional.pad(images.clamp(-1, 1), (0, 1, 0, 1), value=1.0)   # white gap right and below
    grid = grid.reshape(rows, -1, *grid.shape[-2:])[:, :columns]                      # (rows, columns, H + 1, W + 1)
    return grid.permute(0, 2, 1, 3).reshape(rows * grid.shape[2], columns * grid.shape[3])


@torch.no_grad()
def sample(network, prediction: str, y, z_1, omega: float, t_min: float = 0.1, t_max: float = 0.7):
    """One network call per image: x = z_1 - u(z_1, 0, 1 | y, omega, [t_min, t_max])."""
    cond = make_cond(y, omega, t_min, t_max)
    if prediction == "x":
        return P.sample_one_step(P.u_fn_from_x_fn(lambda z, r, t: network.forward_u(z, r, t, cond)), z_1, has_aux=True)
    return P.sample_one_step(lambda z, r, t: network.forward_u(z, r, t, cond), z_1)


num_steps = steps(500, 4)
ema_model, model, raw_u = train_digits(RESOLUTION, PATCH, "x", num_steps)
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
# so a loss that levels off or creeps up (full mode: after about step 300) does not by itself mean
# worse samples. Section 6 scores the samples instead.

# %% [markdown]
# ## 5. The JVP through a ViT
#
# Forward-mode AD has to pass through attention. Fused attention kernels do not support it, so the
# model computes attention with matmul + softmax where needed. A check in float64 on the trained
# network: `P.average_velocity_jvp` against a central finite difference along the tangent.

# %%
model64 = build_model("pMF-T/4", resolution=RESOLUTION, patch=PATCH, **ARCH).double().eval()
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

# %%
evaluator = DigitsEvaluator(load_or_train_classifier(out))
floor = evaluator.floor(RESOLUTION)
report("held-out real digits: FD (the floor)", floor["fd"])
y_eval = torch.arange(NUM_CLASSES).repeat_interleave(steps(50, 10))
z_eval = torch.randn(len(y_eval), 1, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(1))
omegas = (1.0, 2.0, 4.0)
shown = 6
fig, axes = plt.subplots(1, len(omegas), figsize=(3.6 * len(omegas), 6.2))
for ax, omega in zip(axes, omegas):
    images = sample(ema_model, "x", y_eval, z_eval, omega)
    scores = evaluator.evaluate(images, y_eval)
    report(f"one-step FD, omega = {omega}", scores["fd"])
    report(f"one-step class accuracy, omega = {omega}", scores["accuracy"])
    ax.imshow(tile(images, NUM_CLASSES, shown), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
    ax.set(title=f"omega = {omega}\nFD {scores['fd']:.0f}, accuracy {scores['accuracy']:.2f}", xticks=[], yticks=[])
save_figure(fig, out / "one_step_digits.png", trained=True)

# %% [markdown]
# In full mode every row shows its class (accuracy 1.00 at every omega), and guidance is visible:
# at omega = 1 the digits are grey and blurred, at omega = 2–4 sharper and more contrasted, and the
# FD falls about threefold (91 -> 30). The samples of a row still look alike — after 500 steps the
# one-step map uses its noise input only a little; diversity comes with training (the paper trains
# ~10^5 times longer).

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
# is needed to see it — two networks at 64 px, patch 16, with random (non-zero) output layers:

# %%
def unseen_part(network, images: torch.Tensor) -> torch.Tensor:
    """Each patch's component in the null space of the patch embedding's p x p conv, (B, p*p*C, patches)."""
    weight = network.patch_embed.reduce.weight.detach().flatten(1)              # (bottleneck, p*p*C)
    null_projector = torch.eye(weight.shape[1]) - torch.linalg.pinv(weight) @ weight
    patches = torch.nn.functional.unfold(images, kernel_size=network.patch, stride=network.patch)
    return null_projector @ patches


def with_unseen_noise(network, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """The best a u-network can do from noise e: the image x plus e's invisible part, (B, C, H, W)."""
    unseen = unseen_part(network, e)
    return x + torch.nn.functional.fold(unseen, x.shape[-2:], kernel_size=network.patch, stride=network.patch)


BIG, BIG_PATCH = 64, 16
y_big = torch.arange(NUM_CLASSES).repeat_interleave(3)
z_big = torch.randn(len(y_big), 1, BIG, BIG, generator=torch.Generator().manual_seed(2))
torch.manual_seed(3)
networks = {}
for prediction in ("x", "u"):
    networks[prediction] = build_model("pMF-T/4", resolution=BIG, patch=BIG_PATCH, **ARCH).eval()
    torch.nn.init.normal_(networks[prediction].u_head.out.weight, std=0.05)    # untrained, but not zero
    images = sample(networks[prediction], prediction, y_big, z_big, 1.0)
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
#
# The same code, with `--preset pMF-B/16 --data /path/to/imagenet/train`, the perceptual loss and
# 8 GPUs, is the paper's setting (FID 3.12 at one step after 320 epochs): `python -m full.train`;
# `python -m full.sample` draws FID-50K sets from a checkpoint, `python -m full.params` prints the
# table of section 1, and `python -m full.digits` runs the paper's ablations on these digits.
