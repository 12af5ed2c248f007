# %% [markdown]
# # 03 — The pixel MeanFlow loss
#
# pMF's network predicts a denoised image `x_theta(z_t, r, t)`; the loss is a MeanFlow velocity
# loss on the average velocity that this image implies. This tutorial takes the loss apart piece
# by piece — the x -> u conversion and its clip, the compound velocity V and its stop-gradient, the
# adaptive weight — then assembles one training step by hand and checks it against `P.pmf_loss`,
# plots the "full plane" time sampler, and finally trains the loss on 2-D data with the toy's recipe
# and samples in one step.
#
# Run: `python tutorials/03_the_pixel_meanflow_loss.py`, or cell by cell in Jupyter / VS Code
# (a CPU-minute or two, timed in `tutorials/README.md`; `PMF_TUTORIAL_FAST=1` for a quick, under-trained pass). Figures go to
# `runs/tutorials/03/`.

# %%
import sys
from pathlib import Path

import copy

import matplotlib.pyplot as plt
import numpy as np
import torch

import pmf_ref as P

sys.path.insert(0, str(Path(P.__file__).resolve().parents[1] / "tutorials"))  # _common, from any folder
import toy  # noqa: E402
from _common import MLP, ema_step, report, save_figure, setup, steps  # noqa: E402
from toy import sample_2d, sliced_wasserstein  # noqa: E402
from toy.train import ToyConfig, learning_rate, sample_times, training_precision  # noqa: E402

out = setup("03")
generator = torch.Generator().manual_seed(0)

# %% [markdown]
# ## 1. From a predicted image to an average velocity
#
# MeanFlow's displacement identity with r = 0 says the clean image is `x = z_t - t u(z_t, 0, t)`.
# pMF defines this *denoised-image field* for every r (paper Eq. 8),
#
# $$ x(z_t, r, t) := z_t - t\,u(z_t, r, t), $$
#
# lets the network predict it, and reads the velocity back (Eq. 11, with the clip of the released
# code): $u_\theta = (z_t - x_\theta) / \max(t, t_\epsilon)$, `t_eps = 0.05`. At r = t the field is
# JiT's denoised target; at r = 0 it is a clean image — for every r it looks like an image, which
# is why predicting it scales to many pixels where predicting u does not (tutorial 04).
#
# The division by t amplifies the network's error near the data end; the clip caps the gain at
# `1 / t_eps = 20`.

# %%
t_grid = torch.linspace(0.0, 1.0, 401)
z = torch.zeros(t_grid.shape[0], 1)
unit_error = torch.ones(t_grid.shape[0], 1)                           # x_hat off by 1
gain = P.average_velocity_from_x(z, z - unit_error, t_grid)[:, 0]    # resulting error in u
report("u error per unit x error at t = 0.01 (clipped to 1/t_eps)", gain[4])
report("u error per unit x error at t = 0.5", gain[200])

fig, ax = plt.subplots(figsize=(5.5, 3.5))
ax.semilogy(t_grid, gain, label="1 / max(t, t_eps)")
ax.semilogy(t_grid[4:], 1 / t_grid[4:], "--", color="gray", label="1 / t (no clip)")
ax.axvline(P.T_EPS, color="k", lw=0.8)
ax.set(xlabel="t", ylabel="error in u per unit error in x", title="x -> u conversion: error gain")
ax.legend()
save_figure(fig, out / "x_to_u_gain.png")

# %% [markdown]
# ## 2. The compound velocity and its stop-gradient
#
# The MeanFlow identity (tutorial 02), `u = v - (t - r) du/dt`, is rearranged around the
# network's own u into the *compound velocity* (iMF; pMF Eq. 12)
#
# $$ V_\theta = u_\theta + (t - r)\,\mathrm{sg}\!\left(\frac{du_\theta}{dt}\right), \qquad
#    \mathcal L_u = \big\| V_\theta - v \big\|^2 , $$
#
# a regression of an *observable* velocity. `sg` (stop-gradient) means the JVP term is a fixed
# correction: gradients reach the parameters only through u, i.e. **V and u have the same Jacobian
# in the parameters, ∂V/∂θ = ∂u/∂θ**. What that does and does not imply, checked on a small network
# in float64:
#
# * for a *linear* function of V, such as `<w, V>`, the gradient is that of `<w, u>` (same Jacobian,
#   same outer derivative w);
# * for the loss it is **not** the gradient of `||u - v||^2`: the chain rule gives
#   `2 (V - v) · ∂u/∂θ`, with the outer derivative evaluated at V, not at u;
# * it is exactly the gradient of MeanFlow's original form `||u - sg(v - (t - r) du/dt)||^2`
#   (`P.meanflow_target`): `V - v = u - (v - (t - r) du/dt)`.
#
# (The tangent of the JVP here is the model's own velocity `sg(u(z_t, t, t))`, pMF Alg. 1.)

# %%
torch.manual_seed(0)
net64 = MLP(d_in=4, d_out=2, width=64, depth=3).double()
torch.nn.init.normal_(net64.layers[-1].weight, std=0.1)              # a non-trivial network


def x_fn64(z, r, t):
    return net64(z, t, t - r)                                         # inputs: z, t, h = t - r


u_fn64 = P.u_fn_from_x_fn(x_fn64)
x = sample_2d("swiss_roll", 64, seed=0).double()
e = torch.randn(x.shape, generator=generator, dtype=torch.float64)
r, t = P.sample_time_pair(64, generator=generator, dtype=torch.float64)
z_t = P.interpolate(x, e, t)
v_t = P.target_velocity(z_t, x, t)
tangent = P.tangent_from_model(u_fn64, z_t, t, has_aux=True)
params = list(net64.parameters())


def gradient(scalar):
    return torch.cat([g.flatten() for g in torch.autograd.grad(scalar, params, retain_graph=True)])


jvp = P.average_velocity_jvp(u_fn64, z_t, r, t, v_tangent=tangent, has_aux=True)
V = P.compound_velocity(jvp.u, jvp.dudt, r, t)
weights = torch.randn(V.shape, generator=generator, dtype=torch.float64)
report("grad of <w, V> vs grad of <w, u> (stop-gradient)",
       (gradient((weights * V).sum()) - gradient((weights * jvp.u).sum())).abs().max())

jvp = P.average_velocity_jvp(u_fn64, z_t, r, t, v_tangent=tangent, has_aux=True)
grad_compound = gradient(P.squared_error(P.compound_velocity(jvp.u, jvp.dudt, r, t), v_t).sum())
grad_plain = gradient(P.squared_error(jvp.u, v_t).sum())
jvp = P.average_velocity_jvp(u_fn64, z_t, r, t, v_tangent=tangent, has_aux=True)
grad_original = gradient(P.squared_error(jvp.u, P.meanflow_target(v_t, jvp.dudt, r, t)).sum())
report("grad of ||V - v||^2 vs grad of ||u - sg(u_tgt)||^2", (grad_compound - grad_original).abs().max())
report("grad of ||V - v||^2 vs grad of ||u - v||^2, relative (not 0)",
       (grad_compound - grad_plain).norm() / grad_compound.norm())

# %% [markdown]
# **What the stop-gradient buys.** Without `sg`, the gradient of the loss would also contain
# `∂(du/dt)/∂θ`, a mixed second derivative: the backward pass would have to run back through the
# forward-mode JVP (reverse-over-forward), keeping the tangent computation's activations and roughly
# doubling the backward's cost. With `sg`, du/dt is a constant of the loss: `P.average_velocity_jvp`
# returns it without any autograd graph, only u's ordinary forward graph is kept, and a training
# step costs one JVP (about two to three forwards) plus one ordinary backward. The target is also
# treated as fixed data, as in any regression: the network chases a target built from its own
# current derivative instead of changing the target to meet itself.

# %% [markdown]
# ## 3. Adaptive weighting
#
# The squared error is a **sum** over pixels (not a mean), then weighted per sample (pMF Sec. 4),
#
# $$ \mathrm{adp}(\mathcal L) = \frac{\mathcal L}{\mathrm{sg}\big((\mathcal L + c)^p\big)}, \qquad c = 0.01,\; p = 1 . $$
#
# Its value is about 1 for any large L; what matters is its gradient, `dL / (L + c)^p`. With p = 1
# that is the gradient of `log(L + c)`: each sample's gradient is divided by its own loss, so
# samples with a large error (large t - r, hard images) do not dominate the batch — section 6 shows
# the weights within a batch of a trained model. `P.adaptively_weighted` is this; we compare its
# autograd gradient with the formula.

# %%
L = torch.logspace(-4, 3, 200, dtype=torch.float64).requires_grad_()
fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
for p in (0.0, 0.5, 1.0):
    weighted = P.adaptively_weighted(L, c=P.ADAPTIVE_C, p=p)
    (grad_L,) = torch.autograd.grad(weighted.sum(), L)
    if p == 1.0:
        report("adaptive-weight gradient vs 1/(L + c)", (grad_L - 1 / (L.detach() + P.ADAPTIVE_C)).abs().max())
    axes[0].loglog(L.detach(), weighted.detach(), label=f"p = {p}")
    axes[1].loglog(L.detach(), grad_L, label=f"p = {p}")
axes[0].set(xlabel="raw loss L", ylabel="adp(L)", title="value")
axes[1].set(xlabel="raw loss L", ylabel="d adp(L) / dL", title="gradient = 1 / (L + c)^p")
axes[0].legend()
save_figure(fig, out / "adaptive_weighting.png")

# %% [markdown]
# ## 4. One training step, taken apart
#
# pMF Alg. 1 for x-prediction, every line one `pmf_ref` call. We assemble it by hand, then check
# the result against `P.pmf_loss`, which composes the same calls.

# %%
torch.manual_seed(0)
x_net = MLP(d_in=4, d_out=2, width=128, depth=4)
torch.nn.init.normal_(x_net.layers[-1].weight, std=0.1)  # MLP starts at x_hat = 0; make du/dt visible


def x_fn(z, r, t):
    return x_net(z, t, t - r)


u_fn = P.u_fn_from_x_fn(x_fn)                           # u = (z - x_hat) / max(t, t_eps), aux = x_hat
B = 256
x = sample_2d("swiss_roll", B, seed=1)                 # (B, 2) data
e = torch.randn(x.shape, generator=generator)          # (B, 2) noise
r, t = P.sample_time_pair(B, generator=generator)      # (B,), (B,): full-plane sampler, section 5
z_t = P.interpolate(x, e, t)                           # (B, 2)  z_t = (1 - t) x + t e
v_t = P.target_velocity(z_t, x, t)                     # (B, 2)  (z_t - x) / max(t, t_eps) = e - x
tangent = P.tangent_from_model(u_fn, z_t, t, has_aux=True)                      # (B, 2)  sg(u(z_t, t, t))
jvp = P.average_velocity_jvp(u_fn, z_t, r, t, v_tangent=tangent, has_aux=True)  # u, du/dt, x_hat
V = P.compound_velocity(jvp.u, jvp.dudt, r, t)         # (B, 2)  u + (t - r) sg(du/dt)
raw = P.squared_error(V, v_t)                          # (B,)    sum over coordinates
loss_by_hand = P.adaptively_weighted(raw)              # (B,)    raw / sg(raw + c)
for name, value in [("x", x), ("z_t", z_t), ("r", r), ("t", t), ("v_t", v_t), ("tangent", tangent),
                    ("u", jvp.u), ("du/dt", jvp.dudt), ("x_hat", jvp.aux), ("V", V), ("raw", raw),
                    ("loss", loss_by_hand)]:
    print(f"  {name:8s} {str(tuple(value.shape)):10s} mean |.| = {value.abs().mean().item():.4f}")

terms = P.pmf_loss(x_fn, x, e, r, t)
report("hand-assembled loss vs P.pmf_loss", (loss_by_hand - terms.loss).abs().max())

optimizer = torch.optim.Adam(x_net.parameters(), lr=2e-3)
loss = terms.loss.mean()                               # batch mean last
optimizer.zero_grad()
loss.backward()
optimizer.step()
report("raw loss before the step", terms.raw.mean())
report("raw loss after the step (same batch)", P.pmf_loss(x_fn, x, e, r, t).raw.mean())

# %% [markdown]
# ## 5. The "full plane" time sampler
#
# Which (r, t) pairs the loss sees matters more than anything else in pMF's ablations (paper
# Table 5, ImageNet B/16 at 160 epochs, FID): t and r are drawn i.i.d. logit-normal(0.8, 0.8) and
# sorted, and half the rows get r = t (`P.sample_time_pair`). Restricting the pairs to the diagonal
# (flow matching), to r = 0, or to both lines breaks one-step generation. The FIDs in the panel
# titles are the paper's, not measured here.
# <!-- given: 0.8 -->

# %%
n = steps(4000, 1000)
samplers = [("full plane (paper: FID 3.53)", P.sample_time_pair),
            ("only r = t (paper: FID 194.53)", P.sample_time_pair_diagonal),
            ("only r = 0 (paper: FID 389.28)", P.sample_time_pair_endpoint),
            ("both lines (paper: FID 106.59)", P.sample_time_pair_two_lines)]
fig, axes = plt.subplots(1, 4, figsize=(16, 4))
for ax, (title, sampler) in zip(axes, samplers):
    r_s, t_s = sampler(n, generator=torch.Generator().manual_seed(1))
    ax.scatter(t_s, r_s, s=2, alpha=0.3)
    ax.plot([0, 1], [0, 1], "k", lw=0.5)
    ax.set(title=title, xlabel="t", ylabel="r", xlim=(0, 1), ylim=(0, 1), aspect="equal")
save_figure(fig, out / "time_samplers.png")
r_s, t_s = P.sample_time_pair(n, generator=torch.Generator().manual_seed(1))
report("fraction of pairs with r = t (target 0.5)", (r_s == t_s).float().mean())
report("fraction of pairs with r > t (must be 0)", (r_s > t_s).float().mean())
report("median of one logit-normal(0.8, 0.8) draw (sigmoid(0.8) = 0.69)",
       P.sample_logit_normal(n, generator=torch.Generator().manual_seed(2)).median())
report("median t = max of two draws (skewed towards noise)", t_s.median())
report("share of t above 0.9, full-plane logit-normal(0.8, 0.8)", (t_s > 0.9).float().mean())
report("share of t below 0.25, full-plane logit-normal(0.8, 0.8)", (t_s < 0.25).float().mean())

# %% [markdown]
# ## 6. Train it, sample in one step
#
# The same loss on the Swiss roll, then `P.sample_one_step`: `x = x_theta(e, r=0, t=1)`, one network
# call. For comparison, one call of the flow-matching model of tutorial 01 landed on the mean of the
# data. The training recipe is the toy's (`ToyConfig()` and its helpers, imported, not copied: the
# 7 x 256 ReLU MLP of pMF's Fig. 2 on `[z, t, h]`, Adam, the toy's time sampler `sample_times`, its
# matmul precision `training_precision`, an EMA of the weights for sampling) — the recipe tutorial 01's
# flow-matching baseline was trained with, so the two compare on equal footing. The toy draws its
# times uniformly, not from ImageNet's logit-normal(0.8, 0.8): that sampler leans towards the noise
# end (median t 0.78, section 5; only 8% of the times above 0.9, though) and rarely visits the data
# end (t < 0.25 in fewer than 0.1% of the rows), whose velocities the one-step map (r, t) = (0, 1) integrates
# over too; and short runs sample much better from an average of the weights than from the last ones.
# <!-- check: median t = max of two draws (skewed towards noise) = 0.78 -->
# <!-- check: share of t above 0.9, full-plane logit-normal(0.8, 0.8) = 8% -->
# <!-- check: share of t below 0.25, full-plane logit-normal(0.8, 0.8) in [0%, 0.1%] -->
# <!-- given: 0.8 -->
#
# The toy network sees t as well as h = t - r; the ImageNet ViT sees only h (tutorial 06 shows why
# an image needs no t: its noise level can be read off the pixels, a 2-D point's cannot).

# %%
recipe = ToyConfig()                                     # the toy's defaults: steps, batch, lr, times, EMA
torch.manual_seed(0)
net = toy.ToyMLP(2, depth=recipe.depth, width=recipe.width)
ema = copy.deepcopy(net).requires_grad_(False)
optimizer = torch.optim.Adam(net.parameters(), lr=recipe.lr)
num_steps = steps(recipe.steps, 100)
losses = []
train_generator = torch.Generator().manual_seed(2)
data_stream = np.random.RandomState(2)
for step in range(num_steps):
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(recipe, step)         # the recipe's schedule (warm-up, then constant)
    x = sample_2d("swiss_roll", recipe.batch_size, seed=data_stream)
    e = torch.randn(x.shape, generator=train_generator)
    r, t = sample_times(recipe, x.shape[0], generator=train_generator)
    with training_precision(recipe):
        terms = P.pmf_loss(net, x, e, r, t)              # the network is x_fn(z, r, t) -> x_hat
    optimizer.zero_grad()
    terms.loss.mean().backward()
    optimizer.step()
    ema_step(ema, net, step, recipe.ema_decay)             # the toy's EMA, with its warm-up
    losses.append(terms.raw.mean().item())  # the weighted loss is ~1 by construction; watch the raw one
print(f"trained {num_steps} steps with {recipe}")

# %%
u_ema = P.u_fn_from_x_fn(ema)
x_data = sample_2d("swiss_roll", steps(4000, 1000), seed=3)
e_sample = torch.randn(x_data.shape, generator=generator)
second_sample = sample_2d("swiss_roll", x_data.shape[0], seed=4)
floor = report("sliced W2, data vs data (the floor)", sliced_wasserstein(second_sample, x_data))
precision_floor = report("precision distance, data vs data (the floor)", toy.precision_distance(second_sample, x_data))
fig, axes = plt.subplots(1, 3, figsize=(14, 4.4))
window = max(1, num_steps // 50)
axes[0].plot(np.convolve(losses, np.ones(window) / window, mode="valid"))
axes[0].set(xlabel="step", ylabel="raw loss ||V - v_t||^2 (running mean)", title="training")
for ax, n_steps in zip(axes[1:], (1, 2)):
    x_gen = P.sample_multi_step(u_ema, e_sample, steps=n_steps, has_aux=True) if n_steps > 1 \
        else P.sample_one_step(u_ema, e_sample, has_aux=True)
    distance = report(f"sliced W2 to data, pMF, {n_steps} step(s)", sliced_wasserstein(x_gen, x_data))
    precision = report(f"precision distance to data, pMF, {n_steps} step(s)", toy.precision_distance(x_gen, x_data))
    ax.scatter(x_data[:, 0], x_data[:, 1], s=1, c="lightgray")
    ax.scatter(x_gen[:, 0], x_gen[:, 1], s=1)
    ax.set(title=f"pMF, {n_steps} network call{'s' * (n_steps > 1)}\nSW2 {distance:.3f} (data vs data {floor:.3f})\n"
                 f"precision {precision:.3f} (data vs data {precision_floor:.3f})",
           xlim=(-3, 3), ylim=(-3, 3), aspect="equal", xticks=[], yticks=[])
save_figure(fig, out / "one_step_samples.png", trained=True)

# %% [markdown]
# One network call draws the roll — where one flow-matching step of the same network and recipe
# (tutorial 01) gave a point at the mean. (Full mode: its samples lie on average 0.046 from the nearest
# data point, against 0.016 between two data samples; sliced W2 is higher, 0.19 against 0.03, because
# some samples also fall into the gaps between the arms and the arms are not filled evenly. A second
# call sharpens it a little: 0.041 and 0.13. Tutorial 01's flow-matching model, the same network and
# recipe, needs between 4 and 16 calls to get as close.)
# <!-- check: precision distance to data, pMF, 1 step(s) = 0.046 -->
# <!-- check: precision distance, data vs data (the floor) = 0.016 -->
# <!-- check: sliced W2 to data, pMF, 1 step(s) = 0.19 -->
# <!-- check: sliced W2, data vs data (the floor) = 0.03 -->
# <!-- check: precision distance to data, pMF, 2 step(s) = 0.041 -->
# <!-- check: sliced W2 to data, pMF, 2 step(s) = 0.13 -->
#
# ## 7. The adaptive weight within a batch
#
# The weight each sample's gradient gets is `1 / (L + c)`, L its raw loss (section 3). On a fresh
# batch with the trained model, per sample, against h = t - r:

# %%
x = sample_2d("swiss_roll", 4096, seed=6)
e = torch.randn(x.shape, generator=generator)
r, t = sample_times(recipe, x.shape[0], generator=generator)
raw = P.pmf_loss(ema, x, e, r, t).raw.detach()
weight = 1 / (raw + P.ADAPTIVE_C)                        # d adp(L) / dL for p = 1 (section 3)
h = t - r
report("median raw loss, rows with r = t", raw[h == 0].median())
report("median raw loss, rows with t - r > 0.4", raw[h > 0.4].median())
top = raw >= raw.quantile(0.9)
report("share of the batch's summed loss from its 10% largest-loss rows", raw[top].sum() / raw.sum())
report("share of the batch's summed gradient weight on those rows", weight[top].sum() / weight.sum())
bottom = raw <= raw.quantile(0.1)
report("share of the batch's summed gradient weight on its 10% smallest-loss rows", weight[bottom].sum() / weight.sum())

bins = torch.linspace(0, float(h.max()), 9)
centres, medians = [], {"raw": [], "weight": []}
for low, high in zip(bins[:-1], bins[1:]):
    rows = (h >= low) & (h < high) if low > 0 else h == 0
    if rows.sum() > 20:
        centres.append(float((low + high) / 2) if low > 0 else 0.0)
        medians["raw"].append(float(raw[rows].median()))
        medians["weight"].append(float((weight[rows] / weight.mean()).median()))
fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for ax, values, name in ((axes[0], raw, "raw"), (axes[1], weight / weight.mean(), "weight")):
    points = ax.scatter(h, values, s=2, c=t, cmap="viridis", alpha=0.6)
    ax.plot(centres, medians[name], "r-o", lw=2, label="median per bin of h")
    ax.set(xlabel="h = t - r", yscale="log")
    ax.legend(loc="lower right")
axes[0].set(ylabel="raw loss L per sample", title="per-sample loss in one batch")
axes[1].set(ylabel="gradient weight 1 / (L + c), / batch mean", title="adaptive weight in the same batch")
fig.colorbar(points, ax=axes[1], label="t")
save_figure(fig, out / "adaptive_weight_in_a_batch.png", trained=True)

# %% [markdown]
# What the figure shows (full mode): the per-sample losses of one batch spread over five orders of
# magnitude, and h explains little of it (median loss 2.31 on the r = t rows, 2.73 for t - r > 0.4).
# <!-- check: median raw loss, rows with r = t = 2.31 -->
# <!-- check: median raw loss, rows with t - r > 0.4 = 2.73 -->
# The spread is the luck of each row's noise: given `z_t`, the target `e - x` is unpredictable, and
# in 2-D its squared error is a two-degree-of-freedom, chi-square-like number. Unweighted, the 10% of
# rows with the largest loss would carry 33% of the batch's loss; weighted, every row contributes
# the gradient of `log(L + c)`: those rows get 0.4% of the total weight, and the 10% with the
# smallest loss get 76%.
# <!-- check: share of the batch's summed loss from its 10% largest-loss rows = 33% -->
# <!-- check: share of the batch's summed gradient weight on those rows = 0.4% -->
# <!-- check: share of the batch's summed gradient weight on its 10% smallest-loss rows = 76% -->
# <!-- given: 10% --> In 2-D the weight is therefore a strongly *robust* loss that fits the
# rows whose target happened to be predictable; it does not single out any region of the (r, t)
# plane. Tutorial 07 shows what that does to the velocity the network learns: it is pulled away
# from the conditional mean. On the Swiss roll that pull is toward the dense inner arm, which is why
# the arms above are not filled evenly (the toy's README measures it: a smaller p fills them more
# evenly, and the p = 1 field keeps its error even when sampled with 32 steps; try it below). On images a row's loss is a sum over thousands of pixels and
# concentrates, and the weight acts mainly between noise levels.
#
# Guidance (tutorial 05) and the image-scale network (tutorial 06) change what the network is
# conditioned on and how big it is; the loss stays this one.

# %% [markdown]
# ## What to take away
#
# * pMF predicts the denoised image `x(z_t, r, t) = z_t - t u` and reads u from it; the clip caps the
#   error gain at 1 / t_eps = 20.
# * The compound velocity `V = u + (t - r) sg(du/dt)` makes the loss a plain regression on an observed
#   velocity, with the gradient of MeanFlow's original target form and one JVP per step.
# * The adaptive weight divides each row's gradient by its own loss (the gradient of `log(L + c)`).
# * The full-plane time sampler, not the network, is what the paper's ablations find decisive.
#
# ## Try it
#
# 1. Pass `p=0.75` to `P.pmf_loss` in the training cell: are the arms of the roll filled more evenly
#    (sliced W2), and what happens to the precision distance?
# 2. Train with ImageNet's sampler instead of the toy's: `r, t = P.sample_time_pair_released(x.shape[0],
#    mean=0.8, std=0.8, generator=train_generator)`. How good is the one step now?
# <!-- given: 20 -->
