"""Closed-form float64 ground truth for the tests: Gaussian data and a single data point.

With data x ~ N(mu, sigma^2 I) and noise e ~ N(0, s^2 I), the point ``z_t = (1 - t) x + t e``
is Gaussian with mean ``(1 - t) mu`` and per-coordinate standard deviation

    sd(t) = sqrt(S(t)),   S(t) = (1 - t)^2 sigma^2 + t^2 s^2.

The probability-flow ODE transports these Gaussians affinely, so with ``w = z - (1 - t) mu``:

    flow map          phi_{t->r}(z) = (1 - r) mu + sd(r) / sd(t) * w
    velocity          v(z, t)       = d/dr phi_{t->r}(z) at r = t = -mu + S'(t) / (2 S(t)) * w
    average velocity  u(z, r, t)    = (z - phi_{t->r}(z)) / (t - r) = g(r, t) * w - mu,

    g(r, t) = (1 - sd(r)/sd(t)) / (t - r) = (sigma^2 (t + r - 2) + s^2 (t + r)) / (sd(t) (sd(t) + sd(r))),

using S(t) - S(r) = (t - r) (sigma^2 (t + r - 2) + s^2 (t + r)); the second form has no 0/0 at r = t
and gives g(t, t) = S'/(2S), i.e. u(z, t, t) = v(z, t). Along a trajectory dw/dt = (S'/2S) w, so the
total derivative is, analytically,

    du/dt = (d_t g(r, t) + g(r, t) S'(t) / (2 S(t))) * w.

sigma = 0 is a single data point mu: sd(t) = t s, u = (z - mu) / t for every r (straight lines),
defined for t > 0. Everything here is plain torch float64 written from these formulas, so the
core can also differentiate it (``average_velocity_jvp`` on :meth:`GaussianOracle.u_fn`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def _col(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ..., 1), written here so the oracle does not depend on ``pmf_ref``."""
    return t.reshape(t.shape[0], *([1] * (like.ndim - 1)))


@dataclass(frozen=True)
class GaussianOracle:
    """Analytic fields of the linear path for data N(mu, sigma^2 I) (sigma = 0: one point)."""

    mu: torch.Tensor            # data mean, (*sample_shape,), float64
    sigma: float                # data std per coordinate, >= 0
    s: float = 1.0              # noise scale: e ~ N(0, s^2 I)

    # ------------------------------------------------------------------ marginal statistics
    def variance(self, t: torch.Tensor) -> torch.Tensor:
        """S(t) = (1 - t)^2 sigma^2 + t^2 s^2, same shape as t."""
        return (1 - t) ** 2 * self.sigma ** 2 + t ** 2 * self.s ** 2

    def variance_dot(self, t: torch.Tensor) -> torch.Tensor:
        """S'(t) = -2 (1 - t) sigma^2 + 2 t s^2."""
        return -2 * (1 - t) * self.sigma ** 2 + 2 * t * self.s ** 2

    def sd(self, t: torch.Tensor) -> torch.Tensor:
        """sd(t) = sqrt(S(t))."""
        return self.variance(t).sqrt()

    def centred(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """w = z - (1 - t) mu."""
        return z - (1 - _col(t, z)) * self.mu

    # ------------------------------------------------------------------ fields
    def velocity(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Marginal velocity v(z, t) = E[e - x | z_t = z] = -mu + S'/(2S) w."""
        ratio = self.variance_dot(t) / (2 * self.variance(t))
        return -self.mu + _col(ratio, z) * self.centred(z, t)

    def flow_map(self, z: torch.Tensor, t: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """phi_{t->r}(z) = (1 - r) mu + sd(r)/sd(t) (z - (1 - t) mu)."""
        return (1 - _col(r, z)) * self.mu + _col(self.sd(r) / self.sd(t), z) * self.centred(z, t)

    def g(self, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """g(r, t) = (sigma^2 (t + r - 2) + s^2 (t + r)) / (sd(t) (sd(t) + sd(r))), no 0/0 at r = t."""
        if self.sigma == 0:
            # One point: g = 1/t. Written apart because sd(r) = r s has an infinite derivative
            # in sqrt at r = 0, which a JVP would turn into 0 * inf = nan.
            return 1 / t
        numerator = self.sigma ** 2 * (t + r - 2) + self.s ** 2 * (t + r)
        return numerator / (self.sd(t) * (self.sd(t) + self.sd(r)))

    def g_dot_t(self, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """d g(r, t) / dt at fixed r, by the quotient rule on the form of :meth:`g`."""
        if self.sigma == 0:
            return -1 / t ** 2
        numerator = self.sigma ** 2 * (t + r - 2) + self.s ** 2 * (t + r)
        numerator_dot = self.sigma ** 2 + self.s ** 2
        sd_t, sd_r = self.sd(t), self.sd(r)
        sd_t_dot = self.variance_dot(t) / (2 * sd_t)
        denominator = self.variance(t) + sd_t * sd_r
        denominator_dot = self.variance_dot(t) + sd_t_dot * sd_r
        return (numerator_dot * denominator - numerator * denominator_dot) / denominator ** 2

    def average_velocity(self, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """u(z, r, t) = g(r, t) (z - (1 - t) mu) - mu (equals v at r = t)."""
        return _col(self.g(r, t), z) * self.centred(z, t) - self.mu

    def average_velocity_by_definition(self, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """u = (z - phi_{t->r}(z)) / (t - r), only for r < t (a check of :meth:`average_velocity`)."""
        return (z - self.flow_map(z, t, r)) / _col(t - r, z)

    def average_velocity_dudt(self, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Analytic total derivative du/dt = d_z u . v + d_t u = (d_t g + g S'/(2S)) w."""
        ratio = self.variance_dot(t) / (2 * self.variance(t))
        return _col(self.g_dot_t(r, t) + self.g(r, t) * ratio, z) * self.centred(z, t)

    def u_fn(self, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The true average velocity as a network callable ``(z, r, t) -> u``."""
        return self.average_velocity(z, r, t)

    def v_fn(self, z: torch.Tensor, r: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """A flow-matching 'network' ``(z, r, t) -> v(z, t)`` that ignores r."""
        return self.velocity(z, t)

    # ------------------------------------------------------------------ posterior of the data
    def posterior_mean(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """E[x | z_t = z] = mu + (1 - t) sigma^2 / S(t) * w."""
        return self.mu + _col((1 - t) * self.sigma ** 2 / self.variance(t), z) * self.centred(z, t)

    def posterior_std(self, t: torch.Tensor) -> torch.Tensor:
        """Std of x | z_t per coordinate: sigma s t / sd(t)."""
        return self.sigma * self.s * t / self.sd(t)

    def sample_posterior(self, z: torch.Tensor, t: torch.Tensor, generator: torch.Generator
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw (x, e) with (1 - t) x + t e = z exactly in distribution: x | z_t, then e = (z - (1-t) x) / t."""
        noise = torch.randn(z.shape, generator=generator, dtype=z.dtype)
        x = self.posterior_mean(z, t) + _col(self.posterior_std(t), z) * noise
        e = (z - (1 - _col(t, z)) * x) / _col(t, z)
        return x, e

    def sample_data(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """x ~ N(mu, sigma^2 I), (batch, *mu.shape)."""
        return self.mu + self.sigma * torch.randn((batch, *self.mu.shape), generator=generator, dtype=self.mu.dtype)


def integrate_velocity(velocity, z: torch.Tensor, t: float, r: float, steps: int = 200) -> torch.Tensor:
    """Classical RK4 for dz/ds = velocity(z, s) from s = t to s = r (float64); error O(h^4)."""
    h = (r - t) / steps
    batch = z.shape[0]
    s = t
    for _ in range(steps):
        def at(time: float) -> torch.Tensor:
            return torch.full((batch,), time, dtype=z.dtype)
        k1 = velocity(z, at(s))
        k2 = velocity(z + h / 2 * k1, at(s + h / 2))
        k3 = velocity(z + h / 2 * k2, at(s + h / 2))
        k4 = velocity(z + h * k3, at(s + h))
        z = z + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        s = s + h
    return z
