# %% [markdown]
# # 07 — Which tangent, and why a v-head
#
# The MeanFlow identity `u = v - (t - r) du/dt` needs the derivative of u *along the flow*: a JVP
# whose tangent for z is a velocity. Which velocity? Three answers are in use:
#
# | tangent | where | what it is |
# |---|---|---|
# | `e - x` | MeanFlow | the per-sample line velocity: exact for one pair, noisy for the flow |
# | `sg(u_theta(z_t, t, t))` | pMF paper, Alg. 1 | the model's own instantaneous velocity (its u-head at h = 0) |
# | `sg(v_theta(z_t, t))` | pMF's released code, iMF | a second "v-head" on the same trunk, trained to predict v |
#
# This tutorial first asks the closed-form Gaussian flow what the identity needs — the *marginal*
# velocity — and how each tangent approximates it, then trains the three side by side on a 2-D
# Gaussian mixture, whose marginal velocity and exact one-step map are known, and measures how well
# each one learns them.
#
# Run: `python tutorials/07_which_tangent_and_why_a_v_head.py`, or cell by cell in Jupyter / VS Code
# (a few CPU-minutes, timed in `tutorials/README.md`; `PMF_TUTORIAL_FAST=1` for a quick, under-trained pass). Figures go to
# `runs/tutorials/07/`.

# %%
import copy
import dataclasses
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

import pmf_ref as P

sys.path.insert(0, str(Path(P.__file__).resolve().parents[1] / "tutorials"))  # _common, from any folder
import toy  # noqa: E402
from _common import FAST, MLP, GaussianFlow, ema_step, report, rk4, save_figure, setup, steps  # noqa: E402
from toy.train import ToyConfig, sample_times  # noqa: E402

out = setup("07")
F64 = torch.float64
generator = torch.Generator().manual_seed(0)

# %% [markdown]
# ## 1. What the identity needs: the marginal velocity
#
# Gaussian data `x ~ N(mu, sigma^2 I)` make everything closed-form (tutorial 02): the marginal
# velocity `v(z, t) = E[e - x | z_t = z]`, the average velocity `u(z, r, t)`, and the posterior
# `x | z_t`, a Gaussian too. These are the *reference*, not part of the method.

# %%
D, sigma = 4, 0.3
mu = torch.tensor([1.0, -0.5, 2.0, 0.0], dtype=F64)
flow = GaussianFlow(mu, sigma)                   # tutorial 02's reference, from tutorials/_common.py
v_true, u_true = flow.velocity, flow.average_velocity


def sample_posterior(z, t, k: int):
    """k draws of x | z_t = z (Gaussian: mean and variance from Bayes' rule), (k, B, D)."""
    return flow.sample_posterior(z, t, k, generator)


B = 512
x = mu + sigma * torch.randn(B, D, generator=generator, dtype=F64)
e = torch.randn(B, D, generator=generator, dtype=F64)
t = 0.2 + 0.75 * torch.rand(B, generator=generator, dtype=F64)
r = t * torch.rand(B, generator=generator, dtype=F64)
z_t = P.interpolate(x, e, t)


def identity_residual(tangent):
    """RMS of u - (tangent - (t - r) du/dt) with du/dt taken along ``tangent``."""
    jvp = P.average_velocity_jvp(u_true, z_t, r, t, v_tangent=tangent)
    return (jvp.u - P.meanflow_target(tangent, jvp.dudt, r, t)).square().mean().sqrt()


report("identity residual, tangent = marginal v", identity_residual(v_true(z_t, t)))
report("identity residual, tangent = e - x of one pair", identity_residual(P.conditional_velocity(x, e)))

# %% [markdown]
# With the marginal velocity the identity holds to rounding; with one pair's `e - x` it does not.
# But the right-hand side `v - (t - r)((∂_z u) v + ∂_t u)` is *affine* in the velocity, so averaged
# over the pairs (x, e) that could have produced the same `z_t` — the posterior — it becomes the
# marginal one. The average over K posterior pairs converges like `1/sqrt(K)`: `e - x` is an
# **unbiased but noisy** tangent.

# %%
K_values = [1, 4, 16] if FAST else [1, 4, 16, 64, 256]
residuals = []
for K in K_values:
    x_post = sample_posterior(z_t, t, K)                                    # (K, B, D)
    e_post = (z_t - (1 - t)[:, None] * x_post) / t[:, None]                 # the pairs behind z_t
    targets = []
    for x_k, e_k in zip(x_post, e_post):
        v_line = P.conditional_velocity(x_k, e_k)
        jvp = P.average_velocity_jvp(u_true, z_t, r, t, v_tangent=v_line)
        targets.append(P.meanflow_target(v_line, jvp.dudt, r, t))
    residuals.append(report(f"identity residual, e - x averaged over {K} posterior pairs",
                            (jvp.u - torch.stack(targets).mean(dim=0)).square().mean().sqrt()))

fig, ax = plt.subplots(figsize=(5.5, 3.8))
ax.loglog(K_values, residuals, "o-", label="e - x, averaged over K pairs")
ax.loglog(K_values, [residuals[0] / np.sqrt(k) for k in K_values], "k--", lw=0.8, label="1 / sqrt(K)")
ax.axhline(float(identity_residual(v_true(z_t, t))) + 1e-16, color="C2", label="marginal v (rounding)")
ax.set(xlabel="posterior pairs K behind each z_t", ylabel="RMS identity residual",
       title="the identity needs the marginal velocity")
ax.legend(fontsize=8)
save_figure(fig, out / "tangent_needs_marginal_v.png")

# %% [markdown]
# The other two tangents are *estimates of the marginal v by a network*: noise-free, but biased by
# whatever the network gets wrong. Alg. 1 reads it off the u-head at h = 0, `u_theta(z_t, t, t)`,
# whose own loss comes only from the rows with r = t (half the batch). The released code adds a v-head:
# the same trunk, a second output, with its own flow-matching loss `adp(||v_theta - v_t||^2)` on
# **every** row (in the JVP's forward, at h = t - r), read at h = 0 for the tangent.
#
# ## 2. Three tangents, trained side by side
#
# A 2-D mixture of 8 Gaussians has a closed-form marginal velocity too (a posterior-weighted sum of
# the components' Gaussian velocities), and its exact one-step map `Φ(e)` — where the ODE carries
# noise e from t = 1 to t = 0 — comes from integrating that velocity (RK4, float64). Both are the
# ground truth below.

# %%
MIX_K, MIX_RADIUS, MIX_SIGMA = 8, 1.5, 0.2
angles = 2 * np.pi * torch.arange(MIX_K, dtype=F64) / MIX_K
centres = MIX_RADIUS * torch.stack([angles.cos(), angles.sin()], dim=1)      # (K, 2)


def sample_mixture(n: int, g: torch.Generator) -> torch.Tensor:
    k = torch.randint(MIX_K, (n,), generator=g)
    return (centres[k] + MIX_SIGMA * torch.randn(n, 2, generator=g, dtype=F64)).float()


def mixture_velocity(z, t):
    """E[e - x | z_t = z] for the mixture (float64): weights w_k(z, t) times each component's velocity."""
    z, t = z.double(), t.double()
    s2 = (1 - t) ** 2 * MIX_SIGMA**2 + t**2                                   # (B,)
    means = (1 - t)[:, None, None] * centres                                 # (B, K, 2)
    log_w = -(z[:, None, :] - means).square().sum(-1) / (2 * s2[:, None])     # equal priors
    w = torch.softmax(log_w, dim=1)                                           # (B, K)
    ds_over_s = (t - (1 - t) * MIX_SIGMA**2) / s2                             # s'(t) / s(t)
    v_k = -centres + ds_over_s[:, None, None] * (z[:, None, :] - means)        # (B, K, 2)
    return (w[..., None] * v_k).sum(dim=1)


def exact_one_step(e: torch.Tensor, n_steps: int = 400) -> torch.Tensor:
    """Φ(e): RK4 integration of dz/dt = v(z, t) from t = 1 down to t = 0, float64 (``_common.rk4``)."""
    def velocity(z, t):
        return mixture_velocity(z, torch.full((z.shape[0],), t, dtype=F64))
    return rk4(velocity, e.double(), 1.0, 0.0, n_steps).float()


probe_g = torch.Generator().manual_seed(1)
x_probe = sample_mixture(4096, probe_g)
e_probe = torch.randn(x_probe.shape, generator=probe_g)
t_probe = torch.rand(4096, generator=probe_g) * 0.95 + 0.05
z_probe = P.interpolate(x_probe, e_probe, t_probe)
v_probe = mixture_velocity(z_probe, t_probe).float()                          # ground truth on the probe
noise_eval = torch.randn(4096, 2, generator=probe_g)
one_step_exact = exact_one_step(noise_eval)
report("exact one-step map vs fresh data: sliced W2 (small: the map is right)",
       toy.sliced_wasserstein(one_step_exact, sample_mixture(4096, probe_g)))

# %% [markdown]
# One network shape for all three: an MLP on `[z, t, h]` with two 2-D outputs, `[u-head | v-head]`
# (both read as denoised points; only the released recipe trains the v-head). The loop runs the
# three recipes on the same data, noise and times, with the toy's lr, time sampler and EMA; only
# the loss call differs:
#
# * Alg. 1: `P.pmf_loss` (its tangent is `P.tangent_from_model`, the u-head at h = 0);
# * `e - x`: `P.meanflow_loss` with `P.tangent_conditional(x, e)`;
# * v-head: `P.pmf_guided_loss` at omega = 1 (no guidance): the v-head at h = 0 gives the tangent,
#   and `L_v` trains it; the loss is `L_u + L_v`.

# %%
TANGENTS = ("Alg. 1: sg(u(z, t, t))", "MeanFlow: e - x", "released: v-head")
CONTROL = "Alg. 1, no adaptive weight (p = 0)"       # a control run, explained in section 3
recipe = dataclasses.replace(ToyConfig(), lr=1e-3)   # the toy's time sampler and EMA; lr 1e-3 for batch 256
NUM_STEPS, EVAL_EVERY, BATCH = steps(3000, 40), steps(250, 20), 256


def u_head(network):
    return lambda z, r, t: network(z, t, t - r)[:, :2]


def loss_of(tangent: str, network, x, e, r, t) -> torch.Tensor:
    if tangent.startswith("Alg. 1"):
        return P.pmf_loss(u_head(network), x, e, r, t, p=0.0 if tangent == CONTROL else P.ADAPTIVE_P).loss
    if tangent.startswith("MeanFlow"):
        z_t = P.interpolate(x, e, t)
        return P.meanflow_loss(P.u_fn_from_x_fn(u_head(network)), z_t, r, t, v_target=P.target_velocity(z_t, x, t),
                               v_tangent=P.tangent_conditional(x, e), has_aux=True).loss

    def denoise_uv(z, r_, t_):                          # both heads of one forward at h = t - r
        both = network(z, t_, t_ - r_)
        return both[:, :2], both[:, 2:]

    def guidance_denoise(z, t_, omega_target):          # the v-head at h = 0 (no classes: c = u)
        x_hat_v = network(z, t_, torch.zeros_like(t_))[:, 2:]
        return x_hat_v, x_hat_v
    ones, zeros = torch.ones_like(t), torch.zeros_like(t)
    terms = P.pmf_guided_loss(denoise_uv, guidance_denoise, x, e, r, t, omega=ones, t_min=zeros, t_max=ones,
                              dropped=torch.zeros_like(t, dtype=torch.bool))
    return terms.loss_u + terms.loss_v


# %% [markdown]
# Two measurements, every few hundred steps, on the EMA weights:
#
# * **tangent error**: how far the tangent is from the marginal v on fixed probe points `z_t`. The
#   tangent enters the target multiplied by `t - r <= t`, so the error is weighted by t^2 and given
#   relative to the error of `e - x` (so `e - x` scores 1 by construction);
# * **one-step error**: mean distance between the one-step sample `x_theta(e, 0, 1)` and the exact
#   `Φ(e)` from the same noise — how well the generator itself was learned.

# %%
e_minus_x_error = (t_probe[:, None] * (P.conditional_velocity(x_probe, e_probe) - v_probe)).square().sum(1).mean()


@torch.no_grad()
def measure(tangent: str, network) -> dict:
    if tangent.startswith("MeanFlow"):
        v_tangent = P.conditional_velocity(x_probe, e_probe)
    elif tangent.startswith("Alg. 1"):
        v_tangent = P.tangent_from_model(P.u_fn_from_x_fn(u_head(network)), z_probe, t_probe, has_aux=True)
    else:
        x_hat_v = network(z_probe, t_probe, torch.zeros_like(t_probe))[:, 2:]
        v_tangent = P.average_velocity_from_x(z_probe, x_hat_v, t_probe)
    one_step = P.sample_one_step(P.u_fn_from_x_fn(u_head(network)), noise_eval, has_aux=True)
    tangent_error = (t_probe[:, None] * (v_tangent - v_probe)).square().sum(1).mean() / e_minus_x_error
    return {"tangent_error": float(tangent_error),
            "one_step_error": float((one_step - one_step_exact).norm(dim=1).mean()), "samples": one_step}


history = {name: [] for name in (*TANGENTS, CONTROL)}
networks = {}
for tangent in history:
    torch.manual_seed(0)
    network = MLP(d_in=4, d_out=4, width=128, depth=4)
    ema = copy.deepcopy(network).requires_grad_(False)
    optimizer = torch.optim.Adam(network.parameters(), lr=recipe.lr)
    g = torch.Generator().manual_seed(2)                 # same data, noise and times for every tangent
    for step in range(NUM_STEPS + 1):
        if step % EVAL_EVERY == 0:
            history[tangent].append({"step": step, **measure(tangent, ema)})
        x = sample_mixture(BATCH, g)
        e = torch.randn(x.shape, generator=g)
        r, t = sample_times(recipe, BATCH, generator=g)
        loss = loss_of(tangent, network, x, e, r, t).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema_step(ema, network, step, recipe.ema_decay)
    networks[tangent] = ema
    final = history[tangent][-1]
    report(f"{tangent}: tangent error (t-weighted, relative to e - x)", final["tangent_error"])
    report(f"{tangent}: one-step error, mean |x_theta(e, 0, 1) - Φ(e)|", final["one_step_error"])
    report(f"{tangent}: one-step sliced W2 to the exact one-step samples",
           toy.sliced_wasserstein(final["samples"], one_step_exact))
    report(f"{tangent}: tangent error at step {EVAL_EVERY}", history[tangent][1]["tangent_error"])

# %%
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
for tangent in history:
    steps_axis = [h["step"] for h in history[tangent]]
    style = dict(marker="o", ms=3, label=tangent, **(dict(ls="--", color="gray") if tangent == CONTROL else {}))
    axes[0].semilogy(steps_axis, [h["tangent_error"] for h in history[tangent]], **style)
    axes[1].plot(steps_axis, [h["one_step_error"] for h in history[tangent]], **style)
axes[0].set(xlabel="training step", ylabel="|t (tangent - marginal v)|^2, relative to e - x",
            title="how good is the tangent?")
axes[1].set(xlabel="training step", ylabel="mean |x_theta(e, 0, 1) - Φ(e)|", title="how good is the one step?")
axes[0].legend(fontsize=8)
save_figure(fig, out / "tangents_over_training.png", trained=True)

fig, axes = plt.subplots(1, 5, figsize=(20, 4))
panels = [("exact one-step map Φ(e)", one_step_exact)] + [(name, history[name][-1]["samples"]) for name in history]
for ax, (title, samples) in zip(axes, panels):
    ax.scatter(x_probe[:, 0], x_probe[:, 1], s=1, c="lightgray")
    ax.scatter(samples[:2000, 0], samples[:2000, 1], s=1, c="tab:red", alpha=0.5)
    ax.set(title=title, xlim=(-2.5, 2.5), ylim=(-2.5, 2.5), aspect="equal", xticks=[], yticks=[])
save_figure(fig, out / "one_step_samples_by_tangent.png", trained=True)

# The panels differ in *kind*: where do the samples sit relative to the 8 mode centres?
for title, samples in panels:
    nearest = torch.cdist(samples.double(), centres).min(dim=1).values           # distance to the nearest centre
    report(f"{title}: median distance to the nearest mode centre", nearest.median())
    report(f"{title}: share of samples farther than 3 sigma from every centre", (nearest > 3 * MIX_SIGMA).double().mean())

# %% [markdown]
# ## 3. What the measurements say
#
# Numbers of a full-mode run (3,000 steps each):
#
# | run | tangent error (vs `e - x` = 1) | one-step error, mean \|x_theta(e, 0, 1) - Φ(e)\| |
# |---|---:|---:|
# | Alg. 1 | 0.36 | 0.16 |
# | MeanFlow `e - x` | 1 | 0.16 |
# | released v-head | 0.34 | 0.21 |
# | Alg. 1, p = 0 (control) | 0.005 | 0.19 |
#
# <!-- check: Alg. 1: sg(u(z, t, t)): tangent error (t-weighted, relative to e - x) = 0.36 -->
# <!-- check: Alg. 1: sg(u(z, t, t)): one-step error, mean |x_theta(e, 0, 1) - Φ(e)| = 0.16 -->
# <!-- check: MeanFlow: e - x: one-step error, mean |x_theta(e, 0, 1) - Φ(e)| = 0.16 -->
# <!-- check: released: v-head: tangent error (t-weighted, relative to e - x) = 0.34 -->
# <!-- check: released: v-head: one-step error, mean |x_theta(e, 0, 1) - Φ(e)| = 0.21 -->
# <!-- check: Alg. 1, no adaptive weight (p = 0): tangent error (t-weighted, relative to e - x) = 0.005 -->
# <!-- check: Alg. 1, no adaptive weight (p = 0): one-step error, mean |x_theta(e, 0, 1) - Φ(e)| = 0.19 -->
#
# * **The network tangents are much less noisy than `e - x`**, but not the marginal v: about a
#   third of the line velocity's error, and it stops improving early (Alg. 1: 0.33 at step 250,
#   0.36 at 3,000).
# <!-- check: Alg. 1: sg(u(z, t, t)): tangent error at step 250 = 0.33 -->
# * **The one-step map does not follow the tangent's quality**: `e - x`, with the worst tangent,
#   gives the same one-step error as Alg. 1 (0.16 both), and the v-head run is a little behind
#   (0.21). On this toy, within this budget, what limits a one-step model is how well the u-head fits
#   the long jumps, not the tangent.
# * **The control explains the tangent error: it is the adaptive weight.** With `adp`, each row's
#   gradient is divided by its own loss, so training minimises `E[log(L + c)]`, and the minimiser of
#   that is not the conditional mean of the target: where the posterior of `x` given `z_t` has
#   several modes (here, between Gaussians), it is pulled towards a mode. Without the weight
#   (p = 0) the u-head's velocity at h = 0 is the marginal v to 0.5%.
# * **What the weight does to the samples is visible, and not small**, although the mean distance to
#   Φ(e) barely separates the runs (0.16 against 0.19). The sample panels show two different kinds of
#   error. With `adp`, samples are pulled towards the mode centres, with thin bridges between them
#   (mode-seeking: median distance to the nearest centre 0.15-0.17, against 0.23 for the exact map).
#   Without it they spread over and between the modes, filling the inside of the ring (mean-seeking:
#   median 0.39, and 15% of the samples lie more than 3 sigma from every centre, against 0.9% for the
#   exact map and about as few with `adp`). In 2-D a row's loss is a noisy two-degree-of-freedom number, so
#   `adp` reweights individual draws (tutorial 03, section 7); on images the loss is a sum over
#   thousands of pixels, it concentrates, and the weight acts mostly between noise levels.
# <!-- check: Alg. 1: sg(u(z, t, t)): median distance to the nearest mode centre in [0.15, 0.17] -->
# <!-- check: MeanFlow: e - x: median distance to the nearest mode centre in [0.15, 0.17] -->
# <!-- check: released: v-head: median distance to the nearest mode centre in [0.15, 0.17] -->
# <!-- check: Alg. 1: sg(u(z, t, t)): share of samples farther than 3 sigma from every centre in [0.8%, 0.9%] -->
# <!-- check: MeanFlow: e - x: share of samples farther than 3 sigma from every centre in [0.8%, 0.9%] -->
# <!-- check: released: v-head: share of samples farther than 3 sigma from every centre in [0.8%, 0.9%] -->
# <!-- check: exact one-step map Φ(e): median distance to the nearest mode centre = 0.23 -->
# <!-- check: Alg. 1, no adaptive weight (p = 0): median distance to the nearest mode centre = 0.39 -->
# <!-- check: Alg. 1, no adaptive weight (p = 0): share of samples farther than 3 sigma from every centre = 15% -->
# <!-- check: exact one-step map Φ(e): share of samples farther than 3 sigma from every centre = 0.9% -->
#
# ## 4. Why a v-head, then?
#
# Not, on this evidence, for a better tangent. What the released code gains from it:
#
# * **Guidance needs instantaneous velocities at every omega.** The CFG target (tutorial 05) needs
#   `v_c` at the row's omega and `v_u` with the null label, at h = 0. The v-head gives both in one
#   no-grad pass, and `v_c` doubles as the tangent; with Alg. 1 the u-head at h = 0 would serve
#   (both heads share the trunk either way).
# * **It trains instantaneous velocity on every row.** `L_v` is computed in the JVP's forward at the
#   row's h = t - r, so every row is also a flow-matching example for the v-head (the tangent reads
#   it at h = 0); Alg. 1's `u(z, t, t)` gets its own loss from the r = t half only.
# * **It costs nothing at sampling**: the v-head is dropped from the inference network (pMF-B/16:
#   118M parameters to sample with, 175M to train; tutorial 06).
#
# Its costs are a second head's parameters and one more loss; the paper's Alg. 1 shows the method
# works without it.

# %% [markdown]
# ## What to take away
#
# * The identity needs the *marginal* velocity as its tangent; `e - x` is an unbiased, noisy estimate
#   of it, the network tangents (Alg. 1's u-head, the released v-head) biased, low-noise ones.
# * With the adaptive weight the network's velocity is pulled away from the conditional mean (the
#   p = 0 control removes that); on this toy the one-step error does not follow the tangent's quality.
# * The released v-head earns its place through guidance (v_c and v_u in one pass) and a flow-matching
#   loss on every row, at no sampling cost.
#
# ## Try it
#
# 1. Train the four runs with a logit-normal(0, 1) time sampler (`dataclasses.replace(recipe,
#    uniform_fraction=0.0)`): does the control still lose to Alg. 1 on the one-step error?
# 2. Double `NUM_STEPS`: which runs keep improving, and does the tangent error of Alg. 1 keep creeping up?
