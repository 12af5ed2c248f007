# %% [markdown]
# # 03 — The pixel MeanFlow loss
#
# pMF's network predicts a denoised image `x_theta(z_t, r, t)`; the loss is a MeanFlow velocity
# loss on the average velocity that this image implies. This tutorial takes the loss apart piece
# by piece — the x -> u conversion and its clip, the compound velocity V and its stop-gradient, the
# adaptive weight — then assembles one training step by hand and checks it against `P.pmf_loss`,
# plots the "full plane" time sampler, and finally trains the loss on 2-D data and samples in one step.
#
# Run: `python tutorials/03_the_pixel_meanflow_loss.py` (about a minute on 2 CPU cores).
# Figures go to `runs/tutorials/03/`.

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch

import pmf_ref as P
from _common import MLP, report, save_figure, setup, steps
from toy import sample_2d, sliced_wasserstein

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
# correction: gradients reach the parameters only through u. Two consequences we check on a small
# network, in float64:
#
# * the gradient of any function of V equals the gradient of the same function of u;
# * the loss has the same gradient as MeanFlow's original form `||u - sg(v - (t - r) du/dt)||^2`
#   (`P.meanflow_target`).
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
jvp = P.average_velocity_jvp(u_fn64, z_t, r, t, v_tangent=tangent, has_aux=True)
grad_original = gradient(P.squared_error(jvp.u, P.meanflow_target(v_t, jvp.dudt, r, t)).sum())
report("grad of ||V - v||^2 vs grad of ||u - sg(u_tgt)||^2", (grad_compound - grad_original).abs().max())

# %% [markdown]
# ## 3. Adaptive weighting
#
# The squared error is a **sum** over pixels (not a mean), then weighted per sample (pMF Sec. 4),
#
# $$ \mathrm{adp}(\mathcal L) = \frac{\mathcal L}{\mathrm{sg}\big((\mathcal L + c)^p\big)}, \qquad c = 0.01,\; p = 1 . $$
#
# Its value is about 1 for any large L; what matters is its gradient, `dL / (L + c)^p`. With p = 1
# that is the gradient of `log(L + c)`: samples with a large error (large t - r, hard images) do not
# dominate the batch. `P.adaptively_weighted` is this; we compare its autograd gradient with the formula.

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
# Which (r, t) pairs the loss sees matters more than anything else in pMF's ablations (Table 5,
# B/16, FID): t and r are drawn i.i.d. logit-normal(0.8, 0.8) and sorted, and half the rows get
# r = t (`P.sample_time_pair`). Restricting the pairs to the diagonal (flow matching), to r = 0, or
# to both lines breaks one-step generation.

# %%
n = steps(4000, 1000)
samplers = [("full plane: FID 3.53", P.sample_time_pair),
            ("only r = t: FID 194.53", P.sample_time_pair_diagonal),
            ("only r = 0: FID 389.28", P.sample_time_pair_endpoint),
            ("both lines: FID 106.59", P.sample_time_pair_two_lines)]
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

# %% [markdown]
# ## 6. Train it, sample in one step
#
# The same loss on the Swiss roll for a minute, then `P.sample_one_step`: `x = x_theta(e, r=0, t=1)`,
# one network call. For comparison, one call of the flow-matching model of tutorial 01 landed near
# the mean of the data.

# %%
num_steps = steps(3000, 100)
losses = []
train_generator = torch.Generator().manual_seed(2)
data_stream = np.random.RandomState(2)
for _ in range(num_steps):
    x = sample_2d("swiss_roll", 512, seed=data_stream)
    e = torch.randn(x.shape, generator=train_generator)
    r, t = P.sample_time_pair(x.shape[0], generator=train_generator)
    terms = P.pmf_loss(x_fn, x, e, r, t)
    optimizer.zero_grad()
    terms.loss.mean().backward()
    optimizer.step()
    losses.append(terms.raw.mean().item())  # the weighted loss is ~1 by construction; watch the raw one

x_data = sample_2d("swiss_roll", steps(4000, 1000), seed=3)
e_sample = torch.randn(x_data.shape, generator=generator)
fig, axes = plt.subplots(1, 3, figsize=(13, 4))
window = max(1, num_steps // 50)
axes[0].plot(np.convolve(losses, np.ones(window) / window, mode="valid"))
axes[0].set(xlabel="step", ylabel="raw loss ||V - v_t||^2 (running mean)", title="training")
for ax, n_steps in zip(axes[1:], (1, 2)):
    x_gen = P.sample_multi_step(u_fn, e_sample, steps=n_steps, has_aux=True) if n_steps > 1 \
        else P.sample_one_step(u_fn, e_sample, has_aux=True)
    distance = report(f"sliced W2 to data, pMF, {n_steps} step(s)", sliced_wasserstein(x_gen, x_data))
    ax.scatter(x_data[:, 0], x_data[:, 1], s=1, c="lightgray")
    ax.scatter(x_gen[:, 0], x_gen[:, 1], s=1)
    ax.set(title=f"pMF, {n_steps} network call{'s' * (n_steps > 1)}: SW2 = {distance:.3f}",
           xlim=(-3, 3), ylim=(-3, 3), aspect="equal", xticks=[], yticks=[])
save_figure(fig, out / "one_step_samples.png")

# %% [markdown]
# Guidance (tutorial 05) and the image-scale network (tutorial 06) change what the network is
# conditioned on and how big it is; the loss stays this one.
