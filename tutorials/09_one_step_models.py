# %% [markdown]
# # 09 — One object, many one-step models: consistency models, shortcut models, sCM and MeanFlow
#
# Several families of one-step generators appeared within two years: consistency models (CM),
# continuous-time consistency models (sCM), shortcut models, MeanFlow and pMF. They look different —
# different networks, losses, time variables — but all learn pieces of **one object**: the flow map
# of the probability-flow ODE, `Φ(z_t; t -> r)`, the point where the trajectory through `z_t` at time
# t is at time r. MeanFlow writes it as an average velocity,
#
# $$ \Phi(z_t; t \to r) = z_t - (t - r)\,u(z_t, r, t), $$
#
# and the families differ in *which (r, t) pairs they learn it at* and *which identity they train it
# with*. This tutorial checks each correspondence numerically on tutorial 02's Gaussian flow, where
# `u` is known in closed form (float64, so every check is to rounding or to a stated order in a step
# size).
#
# Run: `python tutorials/09_one_step_models.py`, or cell by cell in Jupyter / VS Code (a few
# CPU-seconds). Figures go to `runs/tutorials/09/`.

# %%
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import pmf_ref as P

sys.path.insert(0, str(Path(P.__file__).resolve().parents[1] / "tutorials"))  # _common, from any folder
from _common import GaussianFlow, report, save_figure, setup  # noqa: E402

out = setup("09")
F64 = torch.float64
generator = torch.Generator().manual_seed(0)

flow = GaussianFlow(torch.tensor([1.0, -0.5, 2.0, 0.0], dtype=F64), sigma=0.3)   # tutorial 02's data
u_true, v_true, flow_map = flow.average_velocity, flow.velocity, flow.flow_map
B, D = 512, 4
x = flow.mu + flow.sigma * torch.randn(B, D, generator=generator, dtype=F64)
e = torch.randn(B, D, generator=generator, dtype=F64)
t = 0.2 + 0.75 * torch.rand(B, generator=generator, dtype=F64)
z_t = P.interpolate(x, e, t)

# %% [markdown]
# ## 1. Consistency models learn the flow map at r = 0
#
# A consistency model (Song et al., 2023) learns the *consistency function* `f(z_t, t)`: the start of
# the trajectory through `z_t`, i.e. the clean sample the ODE leads to, `f(z_t, t) = Φ(z_t; t -> 0)`.
# In MeanFlow's terms that is the average velocity at r = 0, read as an image:
#
# $$ f(z_t, t) = z_t - t\,u(z_t, 0, t) = x(z_t, 0, t), $$
#
# which is exactly pMF's **denoised-image field at r = 0** (tutorial 03, paper Eq. 8). Its boundary
# condition `f(z, 0) = z` holds by construction (the factor t), which is why CMs parametrise the
# network as `c_skip(t) z + c_out(t) F(z, t)` with `c_out(0) = 0`; pMF's `x(z, r, t) = z - t u` has
# the same property. Three checks: f is the ODE endpoint; f is the same for every point of one
# trajectory (*self-consistency*, the property CMs are named after); and f(z, 0) = z.

# %%
zeros = torch.zeros(B, dtype=F64)


def consistency_function(z, t_):
    """f(z_t, t) = z_t - t u(z_t, 0, t): pMF's denoised field at r = 0, from the exact u."""
    return z - P.expand_like(t_, z) * u_true(z, torch.zeros_like(t_), t_)


f_t = consistency_function(z_t, t)
report("consistency function vs the ODE endpoint Φ(z_t; t -> 0)", (f_t - flow_map(z_t, t, zeros)).abs().max())
s = t * torch.rand(B, generator=generator, dtype=F64)                      # an earlier time on each trajectory
z_s = flow_map(z_t, t, s)
report("self-consistency: |f(z_t, t) - f(z_s, s)| along one trajectory", (f_t - consistency_function(z_s, s)).abs().max())
tiny = torch.full((B,), 1e-12, dtype=F64)
report("boundary: |f(z, t -> 0) - z|", (consistency_function(z_t, tiny) - z_t).abs().max())

# %% [markdown]
# ## 2. sCM's continuous-time condition is the MeanFlow identity at r = 0
#
# Discrete-time consistency training pulls `f(z_t, t)` towards `f(z_{t-Δ}, t - Δ)` for adjacent points
# of a trajectory. In the limit Δ -> 0 (continuous-time CMs, sCM: Lu & Song, 2024) the condition is
# that f does not change along the flow, `df/dt = (∂_z f) v + ∂_t f = 0`, and the training signal is
# that total derivative — **a forward-mode JVP with tangents (v, 1)**, the same JVP MeanFlow computes.
# The two conditions are one: with `f = z - t u(z, 0, t)`,
#
# $$ \frac{df}{dt} = v - u - t\,\frac{du}{dt} = v - V \quad\text{at } r = 0, $$
#
# so `df/dt = 0` *is* the MeanFlow identity `u = v - (t - r) du/dt` on the line r = 0 (V is the
# compound velocity of tutorial 03). Numerically, with `P.average_velocity_jvp` on the exact u and
# against a JVP of f itself computed by central differences along (v, 1):

# %%
v_at = v_true(z_t, t)
jvp = P.average_velocity_jvp(u_true, z_t, zeros, t, v_tangent=v_at)      # u and du/dt at r = 0
df_dt_meanflow = v_at - P.compound_velocity(jvp.u, jvp.dudt, zeros, t)   # v - V
h = 1e-5
df_dt_fd = (consistency_function(z_t + h * v_at, t + h) - consistency_function(z_t - h * v_at, t - h)) / (2 * h)
report("sCM condition df/dt along the flow, from MeanFlow's JVP (exact u: 0)", df_dt_meanflow.abs().max())
report("df/dt by central differences of f (exact u: 0 up to O(h^2))", df_dt_fd.abs().max())

# A network that is *not* the exact u violates both by the same amount: perturb u and compare.
def u_wrong(z, r_, t_):
    return u_true(z, r_, t_) + 0.1 * torch.sin(3 * z) * P.expand_like(t_ - r_, z)


jvp_wrong = P.average_velocity_jvp(u_wrong, z_t, zeros, t, v_tangent=v_at)
f_wrong = lambda z, t_: z - P.expand_like(t_, z) * u_wrong(z, torch.zeros_like(t_), t_)
df_dt_wrong_fd = (f_wrong(z_t + h * v_at, t + h) - f_wrong(z_t - h * v_at, t - h)) / (2 * h)
report("perturbed u: |MeanFlow residual v - V at r = 0| (RMS)",
       (v_at - P.compound_velocity(jvp_wrong.u, jvp_wrong.dudt, zeros, t)).square().mean().sqrt())
report("perturbed u: |df/dt - (v - V)|, same quantity two ways",
       (df_dt_wrong_fd - (v_at - P.compound_velocity(jvp_wrong.u, jvp_wrong.dudt, zeros, t))).abs().max())

# %% [markdown]
# What CMs and sCM leave out is the rest of the plane: they learn only r = 0 (one jump to the data,
# or a chain of such jumps with re-noising in between). pMF's own ablation (paper Table 5, B/16 at 160
# epochs) trained its recipe on r = 0 alone and scored FID 389.28 against 3.53 on the full plane —
# sCM makes the r = 0 line work with a different time parametrisation (TrigFlow) and stabilising
# tricks of its own; MeanFlow gets its training signal from the whole triangle 0 <= r <= t instead.
# <!-- given: 389.28 3.53 -->
#
# ## 3. Shortcut models: the same object on a grid of step sizes, trained by self-consistency
#
# A shortcut model (Frans et al., 2024) conditions its network on the step size d and predicts the
# *normalised jump* `s(z_t, t, d)`, with `z_{t-d} = z_t - d s(z_t, t, d)`: that is MeanFlow's average
# velocity on the interval [t - d, t],
#
# $$ s(z_t, t, d) = u(z_t, t - d, t). $$
#
# At d = 0 it is flow matching's velocity; it is trained at d = 0 by flow matching and at d > 0 by a
# **self-consistency target**: one jump of 2d equals two jumps of d,
#
# $$ s(z_t, t, 2d) = \tfrac12\big(s(z_t, t, d) + s(z_{t-d}, t - d, d)\big), \qquad z_{t-d} = z_t - d\,s(z_t, t, d). $$
#
# For the exact field this holds to rounding for every d — it is the additivity of displacements,
# `(t - r) u(z_t, r, t) = (t - m) u(z_t, m, t) + (m - r) u(z_m, r, m)` for any m in between:

# %%
d = 0.5 * t * torch.rand(B, generator=generator, dtype=F64)               # so that t - 2d >= 0
s_d = u_true(z_t, t - d, t)
z_next = z_t - P.expand_like(d, z_t) * s_d                                # one jump of d
shortcut_target = 0.5 * (s_d + u_true(z_next, t - 2 * d, t - d))
report("shortcut self-consistency: |s(z_t, t, 2d) - (s(z_t, t, d) + s(z_{t-d}, t-d, d)) / 2|",
       (u_true(z_t, t - 2 * d, t) - shortcut_target).abs().max())
r = t * torch.rand(B, generator=generator, dtype=F64)
m = r + (t - r) * torch.rand(B, generator=generator, dtype=F64)
split = (P.expand_like(t - m, z_t) * u_true(z_t, m, t)
         + P.expand_like(m - r, z_t) * u_true(flow_map(z_t, t, m), r, m)) / P.expand_like(t - r, z_t)
report("additivity with an arbitrary split point m in [r, t]", (u_true(z_t, r, t) - split).abs().max())

# %% [markdown]
# **The MeanFlow identity is this self-consistency with an infinitesimal first jump.** Split [r, t] at
# m = t - δ: the first piece is a tiny jump whose average velocity is the instantaneous v, the rest
# is u at the next point. Solving for u(z_t, r, t) gives a target built from one small step,
#
# $$ u(z_t, r, t) \approx \frac{\delta\, v(z_t, t) + (t - \delta - r)\, u(z_t - \delta v, r, t - \delta)}{t - r}, $$
#
# and its error shrinks like δ^2 (each piece is off by O(δ^2)); as δ -> 0 the difference quotient becomes the derivative and the
# target becomes MeanFlow's `v - (t - r) du/dt` — exact, with no step size left (one JVP instead of a
# second network call). Numerically, the discretised target's error against the exact u, and against
# `P.meanflow_target`:

# %%
deltas = [10.0 ** -k for k in range(1, 7)]
jvp_r = P.average_velocity_jvp(u_true, z_t, r, t, v_tangent=v_at)
meanflow = P.meanflow_target(v_at, jvp_r.dudt, r, t)
report("MeanFlow target vs the exact u (the identity, no step size)", (meanflow - jvp_r.u).abs().max())
errors = []
gap = t - r
for delta in deltas:
    step = torch.minimum(torch.full_like(t, delta), 0.5 * gap)              # keep t - delta >= r
    z_next = z_t - P.expand_like(step, z_t) * v_at                          # one Euler step of size delta
    discrete = (P.expand_like(step, z_t) * v_at
                + P.expand_like(gap - step, z_t) * u_true(z_next, r, t - step)) / P.expand_like(gap, z_t)
    errors.append(report(f"one-small-step self-consistency target vs exact u, delta = {delta:g}",
                         (discrete - jvp_r.u).abs().max()))
report("error ratio per 10x smaller delta (second order: ~100)", errors[2] / errors[3])

# %% [markdown]
# ## 4. The map of the plane
#
# Every family is a choice of where on the triangle 0 <= r <= t <= 1 the flow map is learned, and by
# which identity:
#
# | family | learns u(z, r, t) at | trained with | one step |
# |---|---|---|---|
# | flow matching (tutorial 01) | r = t (the velocity v) | regression on e - x | an Euler step: lands on the data mean |
# | consistency models, sCM | r = 0, every t | f(z_t) = f(z_{t-Δ}); sCM: df/dt = 0 by a JVP | `f(z_1, 1)` |
# | shortcut models | r = t - d, d on a dyadic grid | flow matching at d = 0, two d-jumps = one 2d-jump | `s(z_1, 1, 1)` |
# | MeanFlow, pMF | the whole triangle, 0 <= r <= t | the MeanFlow identity (a JVP), half the rows at r = t | `z_1 - u(z_1, 0, 1)` |
#
# The one-step sample of each is the same point, `Φ(z_1; 1 -> 0) = z_1 - u(z_1, 0, 1)`: the corner
# (r, t) = (0, 1) of the plane. The figure draws the lines each family trains on, and a trajectory
# of the Gaussian flow with the consistency function constant along it.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
ax = axes[0]
ax.fill([0, 1, 1], [0, 0, 1], color="C3", alpha=0.15, label="MeanFlow / pMF: 0 <= r <= t")
ax.plot([0, 1], [0, 1], "C0", lw=3, label="flow matching: r = t")
ax.plot([0, 1], [0, 0], "C2", lw=3, label="consistency models / sCM: r = 0")
for k in range(1, 4):
    step = 2.0 ** -k
    ax.plot([step, 1], [0, 1 - step], "C1", lw=1.5, ls="--", label="shortcut: r = t - d, d = 1/2, 1/4, 1/8" if k == 1 else None)
ax.scatter([1], [0], s=80, c="k", zorder=3, label="one-step sample: (r, t) = (0, 1)")
ax.set(xlabel="t", ylabel="r", xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), aspect="equal", title="where each family learns u(z, r, t)")
ax.legend(fontsize=7, loc="upper left")
ax = axes[1]
grid = torch.linspace(0.001, 1, 200, dtype=F64)
for start in torch.linspace(-2, 2, 9, dtype=F64):
    start_point = flow.mu.clone()
    start_point[0] = start_point[0] + start                                  # coordinate 0 at t = 1 (noise)
    z_path = torch.stack([flow_map(start_point, torch.tensor(1.0, dtype=F64), tt) for tt in grid])   # (200, D)
    f_path = consistency_function(z_path, grid)
    ax.plot(grid, z_path[:, 0], color="gray", lw=1)
    ax.plot(grid, f_path[:, 0], color="C2", lw=1, ls="--")
ax.plot([], [], color="gray", label="ODE trajectories z_t (coordinate 0)")
ax.plot([], [], color="C2", ls="--", label="f(z_t, t) = z_t - t u(z_t, 0, t): constant")
ax.set(xlabel="t  (0 = data, 1 = noise)", ylabel="coordinate 0", title="the consistency function along trajectories")
ax.legend(fontsize=7)
save_figure(fig, out / "one_step_families.png")

# %% [markdown]
# ## What to take away
#
# * The flow map `Φ(z_t; t -> r) = z_t - (t - r) u(z_t, r, t)` is the common object. A consistency
#   function is its r = 0 slice, which is pMF's denoised field `x(z_t, 0, t)`; a shortcut model's
#   output is its slice at r = t - d; flow matching's velocity is its r = t limit.
# * The identities are one identity: the continuous consistency condition `df/dt = 0` is the
#   MeanFlow identity at r = 0, and the shortcut's "two half jumps = one jump" is the additivity that
#   the MeanFlow identity differentiates (a one-small-step discretisation of it has error O(δ^2)).
# * Where the families differ is what they train on and how the target is formed: a second network
#   call at a finite step (CM, shortcut) or one JVP (sCM, MeanFlow); one line of the plane or all of it.
#
# ## Try it
#
# 1. Replace `u_true` by `u_wrong` in section 3: how large is the shortcut self-consistency
#    residual now, and does it shrink with d like the MeanFlow residual does?
# 2. A multi-step *consistency* sampler jumps to the data with f, re-noises to a smaller t, and jumps
#    again. With the exact f, show that its samples equal the one-step samples in distribution but not
#    point by point (the re-noising draws a new trajectory), unlike MeanFlow's multi-step sampler
#    `P.sample_multi_step`, which follows one trajectory.
