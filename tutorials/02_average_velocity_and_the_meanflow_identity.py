# %% [markdown]
# # 02 — The average velocity and the MeanFlow identity
#
# Flow matching learns the instantaneous velocity `v(z, t)` and needs many small steps to sample
# (tutorial 01). MeanFlow learns the *average* velocity over an interval instead, which jumps from
# noise to data in one step. This tutorial defines it, derives the identity that makes it
# trainable, and checks everything numerically on a flow whose answer is known in closed form:
# Gaussian data. It then computes the identity's time derivative the way the training code does —
# one forward-mode JVP — and compares it with finite differences and with a Jacobian, one example
# at a time under `vmap`.
#
# Run: `python tutorials/02_average_velocity_and_the_meanflow_identity.py`, or cell by cell in
# Jupyter / VS Code (about 10 CPU-seconds). Figures go to `runs/tutorials/02/`. Everything here is
# float64, so the checks are to rounding error; every tensor is created with `dtype=F64` (torch's
# global default stays float32, so nothing leaks into other cells or tutorials).

# %%
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.func

import pmf_ref as P

sys.path.insert(0, str(Path(P.__file__).resolve().parents[1] / "tutorials"))  # _common, from any folder
from _common import GaussianFlow, report, save_figure, setup, steps  # noqa: E402

out = setup("02")
F64 = torch.float64
generator = torch.Generator().manual_seed(0)

# %% [markdown]
# ## 1. A flow with a closed-form answer
#
# Let the data be Gaussian, `x ~ N(mu, sigma^2 I)`, and the noise `e ~ N(0, I)`. Then
# `z_t = (1 - t) x + t e` is Gaussian too, `N(m(t), s(t)^2 I)` with
#
# $$ m(t) = (1 - t)\,\mu, \qquad s(t)^2 = (1 - t)^2 \sigma^2 + t^2. $$
#
# The marginal velocity `v(z, t) = E[e - x | z_t = z]` is affine in z, and the ODE `dz/dt = v`
# moves every point along its own "standardised coordinate" `(z - m(t)) / s(t)`:
#
# $$ v(z, t) = m'(t) + \frac{s'(t)}{s(t)}\big(z - m(t)\big), \qquad
#    z_r = m(r) + \frac{s(r)}{s(t)}\big(z_t - m(t)\big). $$
#
# These formulas are the **reference** this tutorial checks `pmf_ref` against; they are not
# part of the method (which never knows the data distribution). They live in
# `tutorials/_common.py` as `GaussianFlow`, shared with tutorials 07 and 09 (one reference, not copies).

# %%
D = 4
mu = torch.tensor([1.0, -0.5, 2.0, 0.0], dtype=F64)                  # (D,) data mean
sigma = 0.3                                                          # data standard deviation
flow = GaussianFlow(mu, sigma)
m, s = flow.m, flow.s                                                # m(t) (.., D), s(t)
v_true = flow.velocity                                               # v(z, t) = m'(t) + s'(t)/s(t) (z - m(t))
flow_map = flow.flow_map                                             # z_r = m(r) + s(r)/s(t) (z_t - m(t))


# %% [markdown]
# ## 2. The average velocity
#
# MeanFlow's network learns the average of v along the trajectory over [r, t]:
#
# $$ u(z_t, r, t) = \frac{1}{t - r}\int_r^t v(z_s, s)\,ds = \frac{z_t - z_r}{t - r}, \qquad u(z, t, t) = v(z, t). $$
#
# It is the slope of the *secant* of the trajectory, where v is the slope of the *tangent*. For the
# Gaussian flow the secant form is closed: this `u_true(z, r, t)` is the ideal network.

# %%
u_true = flow.average_velocity                                       # (z - flow_map(z, t, r)) / (t - r)
print("u_true is GaussianFlow.average_velocity: (z_t - z_r) / (t - r) along the exact trajectory")

B = 512
x = mu + sigma * torch.randn(B, D, generator=generator, dtype=F64)
e = torch.randn(B, D, generator=generator, dtype=F64)
t = 0.2 + 0.75 * torch.rand(B, generator=generator, dtype=F64)       # keep t - h, t + h inside [0, 1]
r = t * 0.8 * torch.rand(B, generator=generator, dtype=F64)          # 0 <= r <= 0.8 t < t
z_t = P.interpolate(x, e, t)

# The defining integral, by the trapezoid rule along the exact trajectory.
nodes = steps(4001, 1001)
s_grid = r[None, :] + (t - r)[None, :] * torch.linspace(0, 1, nodes, dtype=F64)[:, None]          # (nodes, B)
v_along = torch.stack([v_true(flow_map(z_t, t, s_k), s_k) for s_k in s_grid])          # (nodes, B, D)
u_integral = torch.trapezoid(v_along, dx=1.0 / (nodes - 1), dim=0)                      # mean over [r, t]
report("time-average of v vs closed-form u", (u_integral - u_true(z_t, r, t)).abs().max())
report("u(z, t - 1e-7, t) vs v(z, t)", (u_true(z_t, t - 1e-7, t) - v_true(z_t, t)).abs().max())

# %% [markdown]
# (The trapezoid error is O(1/nodes^2); the second number is the r -> t limit, O(1e-7).)
#
# The picture, in one dimension: trajectories of the flow, the tangent at t (slope v) and the secant
# back to r (slope u).

# %%
fig, ax = plt.subplots(figsize=(6.5, 4.5))
time_grid = torch.linspace(0, 1, 201, dtype=F64)
for xi in torch.linspace(-2, 2, 9, dtype=F64):
    ax.plot(time_grid, (m(time_grid) + s(time_grid)[:, None] * xi)[:, 0], color="lightgray", lw=1)
xi = torch.tensor(-1.5, dtype=F64)
t_show, r_show = torch.tensor(0.45, dtype=F64), torch.tensor(0.05, dtype=F64)
z_show = m(t_show) + s(t_show) * xi                                  # (D,); we draw coordinate 0
z_r_show = flow_map(z_show, t_show, r_show)
ax.plot(time_grid, (m(time_grid) + s(time_grid)[:, None] * xi)[:, 0], color="k", lw=1.5, label="trajectory")
v_slope = v_true(z_show, t_show)[0]
u_slope = u_true(z_show, r_show, t_show)[0]
ax.plot([t_show - 0.3, t_show + 0.3], [z_show[0] - 0.3 * v_slope, z_show[0] + 0.3 * v_slope], "C0",
        lw=2, label=f"tangent at t: slope v = {v_slope:.2f}")
ax.plot([r_show, t_show], [z_r_show[0], z_show[0]], "C3", lw=2, label=f"secant r -> t: slope u = {u_slope:.2f}")
ax.scatter([r_show, t_show], [z_r_show[0], z_show[0]], color="C3", zorder=3)
ax.set(xlabel="t  (0 = data, 1 = noise)", ylabel="z (coordinate 0)", title="Instantaneous vs average velocity")
ax.legend(loc="upper right", fontsize=8)
save_figure(fig, out / "average_velocity.png")

# %% [markdown]
# ## 3. Why average velocities: one-step sampling
#
# The secant form rearranges into a displacement, `z_r = z_t - (t - r) u(z_t, r, t)`; with
# (r, t) = (0, 1) a single network call maps noise to data, `x = e - u(e, 0, 1)`
# (`P.sample_one_step`). With the true u this is exact; with the instantaneous velocity in its
# place it is one Euler step, which lands near the mean of the data.

# %%
e_sample = torch.randn(B, D, generator=generator, dtype=F64)
x_exact = flow_map(e_sample, torch.ones(B, dtype=F64), torch.zeros(B, dtype=F64))
x_one_step = P.sample_one_step(u_true, e_sample)
x_euler = P.sample_one_step(lambda z, r_, t_: v_true(z, t_), e_sample)
report("one-step sample with the true u vs the exact ODE endpoint", (x_one_step - x_exact).abs().max())
report("one Euler step with v vs the exact ODE endpoint", (x_euler - x_exact).abs().max())
report("per-coordinate std of one-step samples (data sigma = 0.3)", x_one_step.std(dim=0).mean())

# %% [markdown]
# ## 4. The MeanFlow identity
#
# Multiply the definition by (t - r) and differentiate in t (with r fixed):
#
# $$ u(z_t, r, t) = v(z_t, t) - (t - r)\,\frac{d}{dt}u(z_t, r, t), \qquad
#    \frac{d}{dt}u = (\partial_z u)\,v + \partial_t u. $$
#
# The right side contains no integral: a network `u_theta` can be trained to satisfy it with the
# target built from v and its own derivative. The total derivative is a Jacobian-vector product of
# `(z, r, t) -> u` with tangents `(dz, dr, dt) = (v, 0, 1)` — one forward-mode pass,
# `P.average_velocity_jvp(u_fn, z, r, t, v_tangent=v)`, named tangents inside. `P.compound_velocity`
# forms `V = u + (t - r) du/dt`, which the identity says equals v; `P.meanflow_target` the other side.

# %%
jvp = P.average_velocity_jvp(u_true, z_t, r, t, v_tangent=v_true(z_t, t))
v_at_z = v_true(z_t, t)
report("MeanFlow identity residual |u - (v - (t - r) du/dt)|",
       (jvp.u - P.meanflow_target(v_at_z, jvp.dudt, r, t)).abs().max())
report("compound velocity V vs v", (P.compound_velocity(jvp.u, jvp.dudt, r, t) - v_at_z).abs().max())

# %% [markdown]
# **Which velocity is the tangent?** `du/dt` is the derivative of u along the ODE path through
# `z_t`, and on that path `dz/dt` is the *marginal* velocity `v(z_t, t)` — one vector per point
# `z_t`, whatever (x, e) produced it. That is what the check above used. The per-sample line
# velocity `e - x` is a different vector for every pair behind the same `z_t`; with it in the tangent
# (and on the right-hand side) the identity fails sample by sample:

# %%
v_line = P.conditional_velocity(x, e)
jvp_line = P.average_velocity_jvp(u_true, z_t, r, t, v_tangent=v_line)
report("identity residual with the per-sample tangent e - x (RMS; not 0)",
       (jvp_line.u - P.meanflow_target(v_line, jvp_line.dudt, r, t)).square().mean().sqrt())

# %% [markdown]
# It still holds *on average* over the pairs behind one `z_t`, because the right-hand side is affine
# in the velocity — that is why MeanFlow can train with `e - x`. Training never knows the marginal v,
# so every method plugs in an estimate: pMF's Alg. 1 the network's own `u(z_t, t, t)`, the released
# code a separate v-head, MeanFlow `e - x`. Tutorial 07 trains the three side by side.

# %% [markdown]
# ## 5. The JVP against finite differences
#
# The derivative along the flow is also the limit of a central difference along the tangent,
#
# $$ \frac{du}{dt} \approx \frac{u(z + h v, r, t + h) - u(z - h v, r, t - h)}{2h}, $$
#
# whose error is O(h^2) from truncation plus O(eps/h) from rounding: a V-shaped curve in h, while
# the JVP is exact to rounding. We check it on the Gaussian u and on a random network in pMF's
# parametrisation (an MLP predicting x, read as `u = (z - x_hat)/t` by `P.u_fn_from_x_fn`).

# %%
def finite_difference_dudt(u_fn, z, r, t, v, h):
    return (u_fn(z + h * v, r, t + h) - u_fn(z - h * v, r, t - h)) / (2 * h)


mlp = torch.nn.Sequential(torch.nn.Linear(D + 2, 64), torch.nn.SiLU(), torch.nn.Linear(64, 64),
                          torch.nn.SiLU(), torch.nn.Linear(64, D)).to(F64)


def x_net(z, r, t):
    return mlp(torch.cat([z, t[:, None], (t - r)[:, None]], dim=1))


u_net = P.u_fn_from_x_fn(x_net)
u_net_only = lambda z, r_, t_: u_net(z, r_, t_)[0]                   # drop the aux x_hat for FD
tangent_net = P.tangent_from_model(u_net, z_t, t, has_aux=True)      # pMF Alg. 1: sg(u(z, t, t))
jvp_net = P.average_velocity_jvp(u_net, z_t, r, t, v_tangent=tangent_net, has_aux=True)

step_sizes = torch.logspace(-2, -9, 15).tolist()          # t + h stays inside [0, 1]
errors = {"Gaussian u": [], "MLP (x-prediction)": []}
for h in step_sizes:
    fd = finite_difference_dudt(u_true, z_t, r, t, v_at_z, h)
    errors["Gaussian u"].append(((fd - jvp.dudt).abs().max() / jvp.dudt.abs().max()).item())
    fd = finite_difference_dudt(u_net_only, z_t, r, t, tangent_net, h)
    errors["MLP (x-prediction)"].append(((fd - jvp_net.dudt).abs().max() / jvp_net.dudt.abs().max()).item())
report("best relative JVP vs finite-difference error, Gaussian u", min(errors["Gaussian u"]))
report("best relative JVP vs finite-difference error, MLP", min(errors["MLP (x-prediction)"]))

fig, ax = plt.subplots(figsize=(6, 4))
for name, curve in errors.items():
    ax.loglog(step_sizes, curve, "o-", label=name)
ax.set(xlabel="finite-difference step h", ylabel="max |FD - JVP| / max |JVP|",
       title="du/dt: forward-mode JVP vs central differences")
ax.legend()
save_figure(fig, out / "jvp_vs_finite_differences.png")

# %% [markdown]
# ## 6. One example at a time: `vmap`
#
# The JVP runs on the whole batch at once; nothing in it may mix examples. `torch.func.vmap` maps a
# function written for *one* example (z of shape (D,), scalar r and t) over the batch. Two checks:
#
# * the same `P.average_velocity_jvp`, vmapped over single examples, equals the batched call;
# * a second formulation of the total derivative, built from the full per-example Jacobian
#   (`torch.func.jacfwd`): `du/dt = (d u / d z) v + d u / d t`.

# %%
def dudt_one(z1, r1, t1):
    return P.average_velocity_jvp(u_true, z1, r1, t1, v_tangent=v_true(z1, t1)).dudt


def dudt_by_jacobian(z1, r1, t1):
    du_dz, du_dt = torch.func.jacfwd(u_true, argnums=(0, 2))(z1, r1, t1)     # (D, D), (D,)
    return du_dz @ v_true(z1, t1) + du_dt


dudt_vmapped = torch.func.vmap(dudt_one)(z_t, r, t)
dudt_jacobian = torch.func.vmap(dudt_by_jacobian)(z_t, r, t)
report("vmapped per-example JVP vs batched JVP", (dudt_vmapped - jvp.dudt).abs().max())
report("Jacobian formulation vs JVP", (dudt_jacobian - jvp.dudt).abs().max())

# %% [markdown]
# The JVP costs about one extra forward pass, where the Jacobian costs D of them — at 256x256x3
# pixels that difference is what makes MeanFlow trainable. Tutorial 03 puts the JVP into pMF's loss.

# %% [markdown]
# ## What to take away
#
# * The average velocity `u(z_t, r, t)` is the slope of the secant of an ODE trajectory; with the
#   exact u, one step `x = e - u(e, 0, 1)` is the exact ODE endpoint, where one Euler step is not.
# * The MeanFlow identity `u = v - (t - r) du/dt` replaces the integral by a derivative along the
#   flow, `du/dt = (∂_z u) v + ∂_t u`: one forward-mode JVP with tangents (v, 0, 1).
# * The tangent must be the marginal velocity; the per-pair `e - x` satisfies the identity only on
#   average (tutorial 07 follows this up).
#
# ## Try it
#
# 1. Set `sigma = 1.0` (data as wide as the noise, centred at mu): what do the trajectories look like,
#    and why is one Euler step now exact?
# 2. Time `P.average_velocity_jvp` against a plain forward of the MLP at D = 4, 64 and 1024: the JVP's
#    cost stays a small multiple of a forward, where the Jacobian of section 6 grows with D.
