# %% [markdown]
# # 01 — Flow matching and x-prediction
#
# Pixel MeanFlow (pMF) is built on *flow matching*. This tutorial sets up the pieces on 2-D data:
# the noising path, its velocity, the two ways a network can express that velocity (predict the
# velocity `v`, or predict the clean point `x`), and the multi-step sampler that flow matching needs
# — the cost that MeanFlow (tutorial 02) removes.
#
# Convention everywhere in this repository: **t = 0 is data, t = 1 is noise** (JiT and
# facebookresearch/flow_matching run time the other way).
#
# Run: `python tutorials/01_flow_matching_and_x_prediction.py` (about a minute on 2 CPU cores;
# `PMF_TUTORIAL_FAST=1` for a quick pass). Figures go to `runs/tutorials/01/`.

# %%
import matplotlib.pyplot as plt
import numpy as np
import torch

import pmf_ref as P
from _common import MLP, report, save_figure, setup, steps
from toy import sample_2d, sliced_wasserstein

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
# the conditional velocity with a squared loss recovers that average: this is flow matching.
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
# becomes one by the conversion above, so the two models below differ only in what the MLP's last
# layer means. Times come from the logit-normal sampler `P.sample_logit_normal`.

# %%
x_net = MLP(d_in=3, d_out=2)       # inputs: z (2) and t (1)
v_net = MLP(d_in=3, d_out=2)


def x_fn_x_pred(z, r, t):
    return x_net(z, t)                                               # the MLP outputs x_hat


def x_fn_v_pred(z, r, t):
    return P.x_from_average_velocity(z, v_net(z, t), t)              # the MLP outputs v_hat


def train(x_fn, parameters, num_steps: int, seed: int) -> list[float]:
    optimizer = torch.optim.Adam(parameters, lr=2e-3)
    g = torch.Generator().manual_seed(seed)
    data_stream = np.random.RandomState(seed)
    losses = []
    for _ in range(num_steps):
        x = sample_2d("swiss_roll", 512, seed=data_stream)
        e = torch.randn(x.shape, generator=g)
        t = P.sample_logit_normal(x.shape[0], mean=0.0, std=1.0, generator=g)
        loss = P.flow_matching_loss(x_fn, x, e, t).mean()            # batch mean last
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


num_steps = steps(3000, 150)
losses_x = train(x_fn_x_pred, x_net.parameters(), num_steps, seed=1)
losses_v = train(x_fn_v_pred, v_net.parameters(), num_steps, seed=1)
report("final flow-matching loss, x-prediction", sum(losses_x[-100:]) / len(losses_x[-100:]))
report("final flow-matching loss, v-prediction", sum(losses_v[-100:]) / len(losses_v[-100:]))

# %% [markdown]
# In 2-D both parametrisations train to about the same loss. It cannot go to zero: its floor is the
# variance of `e - x` given `z_t`, which no network can predict. Tutorial 04 shows where they part ways — when
# the data live on a low-dimensional manifold inside many dimensions.
#
# ## 5. Multi-step sampling
#
# Sampling integrates the ODE `dz/dt = v(z, t)` from noise (t = 1) to data (t = 0).
# `P.sample_multi_step(u_fn, e, steps=N)` takes N uniform steps of `z_r = z_t - (t - r) u`; a
# flow-matching model knows only the instantaneous velocity, so we hand it `u(z, r, t) := v(z, t)`
# and the sampler becomes Euler's method. One Euler step from t = 1 gives `e - v(e, 1) = E[x | z_1 = e]`,
# and since `z_1 = e` says nothing about x, that is the mean of the data for every sample: a trained
# flow-matching model collapses to a point in one step, and needs many steps to follow the curved paths.

# %%
def u_fn_of(x_fn):
    return lambda z, r, t: P.average_velocity_from_x(z, x_fn(z, t, t), t)


num_samples = x_data.shape[0]
e_sample = torch.randn(num_samples, 2, generator=torch.Generator().manual_seed(2))
step_counts = [1, 2, 4, 16, 64]
fig, axes = plt.subplots(2, len(step_counts), figsize=(3 * len(step_counts), 6.2))
for row, (name, x_fn) in enumerate([("x-pred", x_fn_x_pred), ("v-pred", x_fn_v_pred)]):
    for col, n in enumerate(step_counts):
        x_gen = P.sample_multi_step(u_fn_of(x_fn), e_sample, steps=n)
        distance = sliced_wasserstein(x_gen, x_data)
        report(f"sliced W2 to data, {name}, {n} steps", distance)
        ax = axes[row, col]
        ax.scatter(x_data[:, 0], x_data[:, 1], s=1, c="lightgray")
        ax.scatter(x_gen[:, 0], x_gen[:, 1], s=1)
        ax.set(title=f"{name}, {n} step{'s' * (n > 1)}\nSW2 = {distance:.3f}", xlim=(-3, 3),
               ylim=(-3, 3), aspect="equal", xticks=[], yticks=[])
save_figure(fig, out / "multi_step_samples.png")

# %% [markdown]
# The distance to the data falls as the number of steps grows: flow matching needs tens of network
# calls per sample. MeanFlow trains the network to jump over a whole interval [r, t] at once, so one
# call suffices — tutorial 02 defines that *average velocity*, tutorial 03 turns it into pMF's loss.
