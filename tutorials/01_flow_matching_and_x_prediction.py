# %% [markdown]
# # 01 — Flow matching and x-prediction
#
# Pixel MeanFlow (pMF) is built on *flow matching*. This tutorial sets up the pieces on 2-D data:
# the noising path, its velocity, the two ways a network can express that velocity (predict the
# velocity `v`, or predict the clean point `x`), and the multi-step sampler that flow matching needs
# — and shows *why* one step of it fails: the paths from noise to data are curved, and a single
# step lands on the mean of the data. MeanFlow (tutorial 02) removes exactly this cost.
#
# Convention everywhere in this repository: **t = 0 is data, t = 1 is noise** (JiT and
# facebookresearch/flow_matching run time the other way).
#
# Run: `python tutorials/01_flow_matching_and_x_prediction.py`, or cell by cell in Jupyter / VS Code
# (a CPU-minute or two, timed in `tutorials/README.md`; `PMF_TUTORIAL_FAST=1` for a quick, under-trained pass). Figures go to
# `runs/tutorials/01/`.

# %%
import copy
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

import pmf_ref as P

sys.path.insert(0, str(Path(P.__file__).resolve().parents[1] / "tutorials"))  # _common, from any folder
import toy  # noqa: E402
from _common import ema_step, report, save_figure, setup, steps  # noqa: E402
from toy import sample_2d, sliced_wasserstein  # noqa: E402
from toy.train import ToyConfig, learning_rate, sample_times, training_precision  # noqa: E402

out = setup("01")
generator = torch.Generator().manual_seed(0)
x_data = sample_2d("swiss_roll", steps(4000, 1000), seed=0)      # (N, 2) data: mean 0, unit variance

# %% [markdown]
# ## 1. The noising path
#
# A data point `x` and a noise draw `e ~ N(0, I)` are joined by a straight line,
#
# $$ z_t = (1 - t)\,x + t\,e, \qquad t \in [0, 1]. $$
#
# At t = 0 we see the data, at t = 1 pure noise; in between, the marginal distribution of `z_t`
# blurs the Swiss roll into a Gaussian. `P.interpolate` is this equation.

# %%
e_data = torch.randn(x_data.shape, generator=generator)
fig, axes = plt.subplots(1, 5, figsize=(15, 3))
for ax, t_value in zip(axes, [0.0, 0.25, 0.5, 0.75, 1.0]):
    t = torch.full((x_data.shape[0],), t_value)
    z_t = P.interpolate(x_data, e_data, t)
    ax.scatter(z_t[:, 0], z_t[:, 1], s=1, alpha=0.5)
    ax.set(title=f"z_t at t = {t_value}", xlim=(-3.5, 3.5), ylim=(-3.5, 3.5), aspect="equal")
save_figure(fig, out / "noising_path.png")

# %% [markdown]
# ## 2. The conditional velocity
#
# Along one line the velocity is constant:
#
# $$ v = \frac{d z_t}{d t} = e - x. $$
#
# `P.conditional_velocity` is this. We check it against a central finite difference of
# `P.interpolate` — in float64, so the only error left is rounding.

# %%
x64, e64 = x_data[:256].double(), e_data[:256].double()
t64 = torch.rand(256, generator=generator, dtype=torch.float64) * 0.98 + 0.01
h = 1e-6
dz_dt = (P.interpolate(x64, e64, t64 + h) - P.interpolate(x64, e64, t64 - h)) / (2 * h)
report("velocity finite-difference error", (dz_dt - P.conditional_velocity(x64, e64)).abs().max())

# %% [markdown]
# The network never sees the pair (x, e), only `z_t`. Many lines cross every point `z_t`, and the
# best it can do is their average, the *marginal* velocity `v(z_t, t) = E[e - x | z_t]`. Regressing
# the conditional velocity with a squared loss recovers that average: this is flow matching. The
# marginal field defines an ODE, `dz/dt = v(z, t)`, whose paths carry noise to data without crossing
# — and, unlike the straight conditional lines, they bend (section 5).
#
# ## 3. Predict x, read out a velocity
#
# A network can output the velocity directly ("v-prediction"), or the clean point
# ("x-prediction", as JiT and pMF do) and convert:
#
# $$ \hat v = \frac{z_t - \hat x}{\max(t, t_\epsilon)}, \qquad \hat x = z_t - \max(t, t_\epsilon)\,\hat v, \qquad t_\epsilon = 0.05. $$
#
# Both sides are `pmf_ref` functions: `P.average_velocity_from_x` and `P.x_from_average_velocity`
# (named after the *average* velocity u of tutorial 02; on the line r = t, u is v). The clip
# `t_eps` stops `1/t` from blowing up the error of `x_hat` near the data. The two conversions are
# exact inverses, and with the true `x` the velocity read out is the conditional velocity:

# %%
z64 = P.interpolate(x64, e64, t64)
v_read = P.average_velocity_from_x(z64, x64, t64)
report("x -> v -> x round-trip error", (P.x_from_average_velocity(z64, v_read, t64) - x64).abs().max())
above_clip = t64 >= P.T_EPS
report("v from the true x vs e - x (t >= t_eps)",
       (v_read - P.conditional_velocity(x64, e64))[above_clip].abs().max())

# %% [markdown]
# ## 4. Training: the flow-matching loss, twice
#
# The JiT baseline trains with a *velocity* loss whatever the network predicts:
#
# $$ \mathcal L = \big\| \hat v(z_t, t) - v_t \big\|^2, \qquad v_t = \frac{z_t - x}{\max(t, t_\epsilon)}. $$
#
# `P.flow_matching_loss(x_fn, x, e, t)` takes an x-prediction network. A v-prediction network
# becomes one by the conversion above, so the two models below differ only in what the network's last
# layer means. They are trained exactly like pMF's model in tutorial 03 — the toy's recipe
# (`ToyConfig()`: pMF's 7 x 256 ReLU MLP on `[z, t, h]`, here with h = 0; Adam with warm-up, batch
# 1,024, 1,200 steps; the toy's times; an EMA of the weights for sampling), so that tutorial 03 can put
# N-step flow matching and one-step pMF side by side on equal footing.

# %%
recipe = ToyConfig()
torch.manual_seed(0)
x_net = toy.ToyMLP(2, depth=recipe.depth, width=recipe.width)    # inputs: z (2), t, h = t - r
torch.manual_seed(0)
v_net = toy.ToyMLP(2, depth=recipe.depth, width=recipe.width)


def x_fn_x_pred(z, r, t):
    return x_net(z, t, t)                                            # the network outputs x_hat (h = 0)


def x_fn_v_pred(z, r, t):
    return P.x_from_average_velocity(z, v_net(z, t, t), t)           # the network outputs v_hat


def train(x_fn, network, num_steps: int, seed: int) -> tuple[list[float], torch.nn.Module]:
    """The toy's recipe with the flow-matching loss; returns the losses and the EMA of the weights."""
    optimizer = torch.optim.Adam(network.parameters(), lr=recipe.lr)
    ema = copy.deepcopy(network).requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    data_stream = np.random.RandomState(seed)
    losses = []
    for step in range(num_steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(recipe, step)
        x = sample_2d("swiss_roll", recipe.batch_size, seed=data_stream)
        e = torch.randn(x.shape, generator=g)
        _, t = sample_times(recipe, x.shape[0], generator=g)          # the toy's times (t only: r = t)
        with training_precision(recipe):
            loss = P.flow_matching_loss(x_fn, x, e, t).mean()        # batch mean last
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema_step(ema, network, step, recipe.ema_decay)
        losses.append(loss.item())
    return losses, ema


num_steps = steps(recipe.steps, 100)
losses_x, x_ema = train(x_fn_x_pred, x_net, num_steps, seed=1)
losses_v, v_ema = train(x_fn_v_pred, v_net, num_steps, seed=1)
x_net.load_state_dict(x_ema.state_dict())                           # sample from the averaged weights
v_net.load_state_dict(v_ema.state_dict())
report("final flow-matching loss, x-prediction", sum(losses_x[-100:]) / len(losses_x[-100:]))
report("final flow-matching loss, v-prediction", sum(losses_v[-100:]) / len(losses_v[-100:]))

# %% [markdown]
# In 2-D both parametrisations train to about the same loss. It cannot go to zero: its floor is the
# variance of `e - x` given `z_t`, which no network can predict. Tutorial 04 shows where they part
# ways — when the data live on a low-dimensional manifold inside many dimensions.
#
# ## 5. Why one step fails
#
# Sampling integrates the ODE `dz/dt = v(z, t)` from noise (t = 1) to data (t = 0).
# `P.sample_multi_step(u_fn, e, steps=N)` takes N uniform steps of `z_r = z_t - (t - r) u`; a
# flow-matching model knows only the instantaneous velocity, so we hand it `u(z, r, t) := v(z, t)`
# and the sampler becomes Euler's method.
#
# One Euler step from t = 1 goes to `e - v(e, 1)`. At t = 1, `z_1 = e` carries no information about
# x, so the best velocity there is `v(z, 1) = E[e - x | z_1 = z] = z - E[x]`, and the step lands on
# **`E[x]`, the mean of the data, for every sample**. The ODE's true paths are *curved*: they start
# towards the mean, then bend towards the part of the roll each noise point ends up on. A straight
# step along the initial tangent misses all of that. We draw both from the same noise points, with
# the trained x-prediction model.

# %%
def u_fn_of(x_fn):
    return lambda z, r, t: P.average_velocity_from_x(z, x_fn(z, t, t), t)   # u(z, r, t) := v(z, t)


@torch.no_grad()
def euler_path(u_fn, e: torch.Tensor, num_steps: int) -> torch.Tensor:
    """Every intermediate z of an N-step Euler integration from t = 1 to 0: (N + 1, B, 2)."""
    path, z = [e], e
    for k in range(num_steps):
        t_value, r_value = 1 - k / num_steps, 1 - (k + 1) / num_steps
        t, r = torch.full((e.shape[0],), t_value), torch.full((e.shape[0],), r_value)
        z = z - (t_value - r_value) * u_fn(z, r, t)
        path.append(z)
    return torch.stack(path)


u_fn_x = u_fn_of(x_fn_x_pred)
num_samples = x_data.shape[0]
e_sample = torch.randn(num_samples, 2, generator=torch.Generator().manual_seed(2))
one_step = P.sample_one_step(u_fn_x, e_sample)
data_mean = x_data.mean(dim=0)
report("one Euler step: mean distance of the samples to E[x]", (one_step - data_mean).norm(dim=1).mean())
report("one Euler step: spread of the samples (std per coordinate; data 1.0)", one_step.std(dim=0).mean())

far = e_sample.norm(dim=1) > 1.5                                       # long paths show the bend best
e_shown = e_sample[far][:30]
paths = euler_path(u_fn_x, e_shown, 64)                                # (65, 30, 2)
step_counts = [1, 2, 4, 8, 16, 32, 64]
curve = [sliced_wasserstein(P.sample_multi_step(u_fn_x, e_sample, steps=n), x_data) for n in step_counts]
fig, axes = plt.subplots(1, 3, figsize=(16, 5))
for ax, title in zip(axes[:2], ("64 Euler steps: the ODE's paths bend", "1 Euler step: straight to E[x]")):
    ax.scatter(x_data[:, 0], x_data[:, 1], s=1, c="lightgray")
    ax.scatter(e_shown[:, 0], e_shown[:, 1], s=12, c="k", label="noise z_1 = e")
    ax.set(title=title, xlim=(-3.2, 3.2), ylim=(-3.2, 3.2), aspect="equal", xticks=[], yticks=[])
one_step_shown = one_step[far][:30]
for i in range(len(e_shown)):
    axes[0].plot(paths[:, i, 0], paths[:, i, 1], lw=1, color=f"C{i % 10}")
    axes[0].scatter(paths[-1, i, 0], paths[-1, i, 1], s=14, color=f"C{i % 10}")
    axes[1].annotate("", xy=one_step_shown[i].tolist(), xytext=e_shown[i].tolist(),
                     arrowprops=dict(arrowstyle="->", color=f"C{i % 10}", lw=0.8))
axes[1].scatter(*data_mean.tolist(), marker="x", s=80, c="red", zorder=3, label="E[x]")
axes[1].legend(loc="lower left")
axes[2].semilogx(step_counts, curve, "o-", base=2)
floor = report("sliced W2, data vs data (the floor)", sliced_wasserstein(sample_2d("swiss_roll", num_samples, seed=5), x_data))
axes[2].axhline(floor, color="gray", ls="--", label="data vs data")
axes[2].set(xlabel="Euler steps (network calls)", ylabel="sliced W2 to data", title="distance to the data")
axes[2].legend()
save_figure(fig, out / "why_one_step_fails.png", trained=True)

# %% [markdown]
# The figure shows the three facts: paths that bend (left), a single step that collapses every
# sample onto the data mean (middle; in full mode the one-step samples lie 0.06 from E[x] on
# average, with a spread of 0.05 per coordinate against the data's 1.0), and a distance to the data
# that falls steeply with the number of network calls and then levels off (right). The same with both
# parametrisations:
# <!-- check: one Euler step: mean distance of the samples to E[x] = 0.06 -->
# <!-- check: one Euler step: spread of the samples (std per coordinate; data 1.0) = 0.05 -->
# <!-- given: 1.0 -->

# %%
step_counts = [1, 2, 4, 16, 64]
fig, axes = plt.subplots(2, len(step_counts), figsize=(3 * len(step_counts), 6.2))
for row, (name, x_fn) in enumerate([("x-pred", x_fn_x_pred), ("v-pred", x_fn_v_pred)]):
    for col, n in enumerate(step_counts):
        x_gen = P.sample_multi_step(u_fn_of(x_fn), e_sample, steps=n)
        distance = report(f"sliced W2 to data, {name}, {n} steps", sliced_wasserstein(x_gen, x_data))
        report(f"precision distance to data, {name}, {n} steps", toy.precision_distance(x_gen, x_data))
        ax = axes[row, col]
        ax.scatter(x_data[:, 0], x_data[:, 1], s=1, c="lightgray")
        ax.scatter(x_gen[:, 0], x_gen[:, 1], s=1)
        ax.set(title=f"{name}, {n} step{'s' * (n > 1)}\nSW2 = {distance:.3f}", xlim=(-3, 3),
               ylim=(-3, 3), aspect="equal", xticks=[], yticks=[])
save_figure(fig, out / "multi_step_samples.png", trained=True)
report("precision distance, data vs data (the floor)",
       toy.precision_distance(sample_2d("swiss_roll", num_samples, seed=5), x_data))

# %% [markdown]
# The distance to the data falls steeply with the number of steps and levels off from about 16 on,
# a little above the distance between two samples of the data (full mode: sliced W2 0.96 at one step,
# 0.08 at 16, 0.06-0.07 at 64, against 0.048 for data vs data; the precision distance at 64 steps is
# 0.027-0.029, against 0.017), and the inner end of the roll stays thinly filled. Flow matching
# needs tens of network calls per sample to get close to the data, and does not quite reach it.
# <!-- check: sliced W2 to data, ?-pred, 1 steps in [0.96, 0.96] -->
# <!-- check: sliced W2 to data, ?-pred, 16 steps in [0.08, 0.08] -->
# <!-- check: sliced W2 to data, ?-pred, 64 steps in [0.06, 0.07] -->
# <!-- check: sliced W2, data vs data (the floor) = 0.048 -->
# <!-- check: precision distance to data, ?-pred, 64 steps in [0.027, 0.029] -->
# <!-- check: precision distance, data vs data (the floor) = 0.017 -->
#
# MeanFlow trains the network to jump over a whole interval [r, t] at once — the *secant* of a curved
# path instead of its tangent — so one call suffices. Tutorial 02 defines that *average velocity*,
# tutorial 03 turns it into pMF's loss and trains it with this same network and recipe.

# %% [markdown]
# ## What to take away
#
# * Flow matching regresses the per-pair velocity `e - x`; what the network learns is its average
#   given `z_t`, the *marginal* velocity, whose ODE carries noise to data along curved paths.
# * Predicting x and reading out `v = (z_t - x_hat) / max(t, t_eps)` is the same model as predicting v
#   (in 2-D); the clip keeps the conversion's gain at most 1 / t_eps = 20.
# * One Euler step from t = 1 lands on the data mean; it takes tens of steps to approach the data.
#
# ## Try it
#
# 1. Train for a quarter of the steps (`recipe = dataclasses.replace(ToyConfig(), steps=300)`): which
#    end of the distance-vs-steps curve moves, the one-step end or the many-step end?
# 2. Integrate the trained velocity with RK4 (`_common.rk4`, four velocity calls per step) instead of
#    Euler: how many network calls does it need for the sliced W2 that Euler reaches at 64?
# <!-- given: 20 -->
