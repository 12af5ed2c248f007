# %% [markdown]
# # 06 — From the toy to ImageNet
#
# Tutorials 01–05 used MLPs on 2-D points. The ImageNet model changes the *network* and the
# *training machinery*, not the method: the loss is still `pmf_ref.pmf_guided_loss` (tutorial 05's
# recipe, released-code form). This tutorial walks through what changes at scale, using the
# repository's `full/` package unchanged:
#
# | | toy (tutorials 03, 05) | ImageNet (`full/`) |
# |---|---|---|
# | network | MLP on [z, t, h, cond] | ViT, bottleneck patch embedding, 20 in-context condition tokens, RoPE, SwiGLU, u-head + v-head (`full/model.py`) |
# | optimiser | Adam | Muon for weight matrices + Nesterov Adam for the rest (`full/optim.py`) |
# | weights sampled | last (or EMA over ~200 steps) | EDM-style EMAs, half-lives 500–2000 kimg (`full/ema.py`) |
# | loss | `pmf_guided_loss` | same + 0.4 LPIPS + 0.1 ConvNeXt-V2 feature loss on x_hat for t < 0.8 (`full/perceptual.py`) |
# | batch | one process | global batch 1024 over GPUs with DDP (`full/distributed.py`) |
#
# It counts the paper's presets, then trains the tiny preset for a few minutes on scikit-learn's
# 8x8 digits (upsampled to 16x16, shipped with scikit-learn: nothing is downloaded) with the real
# trainer `full.train.train`, and samples it in one step.
#
# Run: `python tutorials/06_from_toy_to_imagenet.py` (about 2 minutes on 2 CPU cores).
# Figures go to `runs/tutorials/06/`.

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch

import pmf_ref as P
from _common import FAST, report, save_figure, setup, steps
from full.digits_data import DigitsDataset
from full.ema import ema_decay
from full.model import PRESETS, build_model, make_cond
from full.optim import split_parameters
from full.params import PAPER, analytic_gmacs, meta_model
from full.sample import generate
from full.train import TrainConfig, train

out = setup("06")

# %% [markdown]
# ## 1. The presets: parameters and compute
#
# The paper's Table 8: B/L/H at 256 px with 16x16 patches, and at 512 px with 32x32 patches (the
# same 256 tokens; `noise_scale` grows with resolution). The models are built on the `meta` device —
# shapes only, no memory — to count parameters; GMACs are counted analytically per forward of the
# inference network (trunk + u-head). The v-head is training-only and adds 8 blocks.

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
# ## 2. The network: x-prediction with in-context conditioning
#
# `build_model("pMF-T/4", ...)` is a tiny preset of the same class (`PMFViT`). The image is cut
# into p x p patches (a p x p conv to a narrow *bottleneck*, then a 1x1 conv to the width); 20
# learned tokens carrying the class (8), `1 - 1/omega` (4), `t_min` (2), `t_max` (2) and
# `h = t - r` (4) are prepended — no adaLN. **t itself is not an input**: it enters only through
# `pmf_ref`'s conversion `u = (z - x_hat) / max(t, t_eps)`. The trunk splits into a u-head (the
# generator, `forward_u(z, r, t, cond)`) and a v-head (`forward_v(z, t, cond)`, at h = 0, training
# only). Both heads end in zero-initialised layers, so the network starts by predicting x_hat = 0.

# %%
RESOLUTION, PATCH, NUM_CLASSES = 16, 4, 10
model = build_model("pMF-T/4", num_classes=NUM_CLASSES, channels=1, resolution=RESOLUTION, patch=PATCH)
print(f"pMF-T/4 on 16x16 digits: {model.param_count(with_v_head=False):,} parameters "
      f"(+{model.param_count(True) - model.param_count(False):,} in the v-head), "
      f"{(RESOLUTION // PATCH) ** 2} patch tokens + 20 condition tokens")
z = torch.randn(4, 1, RESOLUTION, RESOLUTION)
cond = make_cond(torch.tensor([0, 1, 2, NUM_CLASSES]), omega=2.0, t_min=0.1, t_max=0.7)   # label 10 = null
x_hat = model.forward_u(z, torch.zeros(4), torch.ones(4), cond)
report("max |x_hat| of the freshly initialised network (zero-init heads)", x_hat.abs().max())

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
# ## 4. Train: the same loss in the ViT trainer
#
# `full.train.train(TrainConfig(...), dataset)` is the ImageNet trainer, run here on CPU. Each
# step draws the randomness of the recipe — `(r, t)` from the full-plane sampler, noise, omega, the
# guidance interval, label drops — and calls `full.recipe.PMFObjective`, whose core is one call of
# `pmf_ref.pmf_guided_loss(model.forward_u, model.forward_v, ...)`, the function tutorial 05 used
# with an MLP. Then Muon + Nesterov Adam, the EMAs, logging and checkpoints.
#
# Deviation for this tutorial: `perceptual="none"`. The perceptual loss (LPIPS-VGG and
# ConvNeXt-V2 features on 224x224 random crops of x_hat and x) needs pretrained weights and RGB
# images; the paper's own optimiser and sampler ablations are MSE-only too. On ImageNet it takes
# FID from 9.56 (MSE) to 5.62 (+LPIPS) to 3.53 (+LPIPS + ConvNeXt) at 160 epochs.
#
# **DDP**: `torchrun --nproc_per_node=8 -m full.train --preset pMF-B/16 --data /path/to/imagenet/train`.
# DDP wraps the whole objective, so the JVP runs inside the wrapped forward and gradients are
# averaged over ranks; the per-step randomness (noise, times, omega, interval, label drops) is drawn
# for the *global* batch and each rank takes its rows, so those draws do not depend on how many GPUs
# share the batch.

# %%
num_steps = steps(300, 3)
# Deviation: lr 3e-3 instead of pMF's 1e-3. In a 300-step CPU run 1e-3 leaves noise (measured: raw
# u-loss 103 after 240 steps vs 57 after 300 steps at 3e-3); the paper's runs are 1000x longer.
LEARNING_RATE = 3e-3
config = TrainConfig(preset="pMF-T/4", num_classes=NUM_CLASSES, channels=1, resolution=RESOLUTION, patch=PATCH,
                     batch_size=32, steps=num_steps, lr=LEARNING_RATE, perceptual="none", ema_half_lives_kimg=(2000.0,),
                     ckpt_every=num_steps, log_every=max(1, num_steps // 10), out=str(out / "train"),
                     device="cpu", num_workers=0)
result = train(config, dataset=DigitsDataset(RESOLUTION), progress=not FAST)
raw_u = np.array([record["raw_u"] for record in result.history])
report("raw u-loss, mean of the first 10% of steps", raw_u[: max(1, num_steps // 10)].mean())
report("raw u-loss, mean of the last 10% of steps", raw_u[-max(1, num_steps // 10):].mean())

fig, ax = plt.subplots(figsize=(6, 3.5))
window = max(1, num_steps // 20)
for name in ("raw_u", "raw_v"):
    curve = np.array([record[name] for record in result.history])
    ax.plot(np.convolve(curve, np.ones(window) / window, mode="valid"), label=f"{name} (running mean)")
ax.set(xlabel="step", ylabel="sum of squares per image", yscale="log", title="pMF-T/4 on 16x16 digits")
ax.legend()
save_figure(fig, out / "training_loss.png")

# %% [markdown]
# ## 5. The JVP through a ViT
#
# Forward-mode AD has to pass through attention. Fused attention kernels do not support it, so the
# model computes attention with matmul + softmax where needed. A check in float64 on the trained
# network: `P.average_velocity_jvp` against a central finite difference along the tangent.

# %%
model64 = result.model.double().eval()
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
result.model.float()

# %% [markdown]
# ## 6. One-step samples
#
# `full.sample.generate`: `x = x_theta(z_1, r = 0, t = 1; y, omega, t_min, t_max)`, one network
# call per image, from the EMA weights. Rows: classes 0–9; columns: without guidance (omega = 1)
# and with the trained-in guidance at the interval of pMF-B/16. After a few minutes of CPU training
# the network has learned each class's typical digit and still largely ignores the noise (the
# samples of a row look alike); diversity comes with longer training. `python -m full.digits` runs
# the paper's ablations on this data set.

# %%
ema_model = next(iter(result.emas.values())).float()
per_class = 6
y = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
z_1 = ema_model.noise_scale * torch.randn(len(y), 1, RESOLUTION, RESOLUTION,
                                          generator=torch.Generator().manual_seed(1))
omegas = (1.0, PRESETS["pMF-T/4"]["sample_omega"] / 2, PRESETS["pMF-T/4"]["sample_omega"])
fig, axes = plt.subplots(1, len(omegas), figsize=(4 * len(omegas), 6))
for ax, omega in zip(axes, omegas):
    x_gen = generate(ema_model, y, z_1, omega=omega, t_min=PRESETS["pMF-T/4"]["sample_t_min"],
                     t_max=PRESETS["pMF-T/4"]["sample_t_max"]).clamp(-1, 1)
    grid = x_gen.reshape(NUM_CLASSES, per_class, RESOLUTION, RESOLUTION).permute(0, 2, 1, 3)
    ax.imshow(grid.reshape(NUM_CLASSES * RESOLUTION, per_class * RESOLUTION), cmap="gray", vmin=-1, vmax=1)
    ax.set(title=f"one step, omega = {omega}", xticks=[], yticks=[])
report("one-step samples inside [-1.5, 1.5] (fraction of pixels)",
       (generate(ema_model, y, z_1, omega=1.0, t_min=0.1, t_max=0.7).abs() <= 1.5).float().mean())
save_figure(fig, out / "one_step_digits.png")

# %% [markdown]
# The same code, with `--preset pMF-B/16 --data /path/to/imagenet/train`, the perceptual loss and
# 8 GPUs, is the paper's setting (FID 3.12 at one step after 320 epochs); `python -m full.sample`
# draws FID-50K sets from a checkpoint and `python -m full.params` prints the table of section 1.
