"""One pMF training step of the authors' released recipe, as one ``nn.Module`` that DDP and FSDP can wrap.

Build it from a preset -- ``TrainingStep.from_preset(model, "pMF-B/16")`` is the one place where a
preset's recipe numbers (time sampler, t_thr, omega's beta, label drop, noise scale) meet the step --
then per batch::

    randomness = step.draw_randomness(x, generator=generator)   # times, guidance draws, crops, noise
    terms = step(x, y, randomness)                               # {"loss", "total", "loss_u", ...}
    terms["loss"].backward()

The step owns its precision (``precision="bf16"``: ``forward`` runs every pass under bf16 autocast, the JVP's
included). :meth:`TrainingStep.loss_terms` reads top to bottom like the loss of the released
``pixelMeanFlow.forward``: z_t and v_t, the guidance pass, the guided target, one JVP, the losses, the
perceptual terms -- every equation a call into ``pmf_ref``. The only function the core calls back is the one
its JVP differentiates.

Why a module: the core's JVP cannot take a DDP-wrapped network, and calling the inner network directly
bypasses DDP's gradient hooks set up in ``DDP.forward`` (gradients would silently not be averaged across
ranks). Wrapping the step -- whose ``forward`` runs the whole loss, the JVP included -- puts every use of
the parameters inside one ``DDP.forward``, so DDP's all-reduce covers them (checked by
tests/test_full_distributed.py against a 1-process run).

The randomness follows the released code: every device batch has an exact half of its rows at r = t, and
only those rows can lose their label. The ablations (time sampler, guidance off) are ``from_preset``
overrides; x- vs u-prediction is the model's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import nn

import pmf_ref as P

from . import fast_jvp
from .model import core_fns, make_cond
from .perceptual import CONVNEXT_WEIGHT, LPIPS_WEIGHT, PerceptualDistances, sample_crop_boxes
from .precision import autocast_dtype as precision_autocast_dtype
from .presets import RECIPES, Recipe, check_preset

TimePairSampler = Callable[..., tuple[torch.Tensor, torch.Tensor]]   # (n, *, generator, device) -> (r, t)

TIME_SAMPLERS = {"full": P.sample_time_pair_released, "diagonal": P.sample_time_pair_diagonal,
                 "endpoint": P.sample_time_pair_endpoint, "two_lines": P.sample_time_pair_two_lines}
"""(r, t) samplers by name: "full" is pMF's (as the released code draws it); the others are the ablations
of pMF Table 5."""


class StepRandomness(NamedTuple):
    """Everything random in one training step, for the *global* batch (rows sliced per rank)."""
    e: torch.Tensor          # noise, (B, C, H, W), N(0, noise_scale^2)
    r: torch.Tensor          # (B,)
    t: torch.Tensor          # (B,)
    omega: torch.Tensor      # guidance scale, (B,) >= 1
    t_min: torch.Tensor      # guidance interval, (B,)
    t_max: torch.Tensor      # (B,)
    dropped: torch.Tensor    # label-drop mask, bool (B,); True only on rows with r = t
    crop_boxes: torch.Tensor  # paired random-resized-crop boxes (top, left, h, w), int64 (B, 4), on the CPU

    def rows(self, start: int, stop: int) -> "StepRandomness":
        return StepRandomness(*(field[start:stop] for field in self))


@dataclass(frozen=True)
class GuidanceSampler:
    """Trained-in CFG draws of the released code for one device batch (pMF App. A): interval
    [t_min, t_max] ([0, 1] on r = t rows), omega ∝ omega^-beta on [1, 8], label drop on r = t rows only."""
    beta: float
    label_drop_prob: float

    def __call__(self, r: torch.Tensor, t: torch.Tensor, generator: torch.Generator):
        n = t.shape[0]
        # r and t come from a pmf_ref sampler (0 <= r <= t <= 1 by construction): no value checks, no host sync
        t_min, t_max = P.sample_guidance_interval(r, t, generator=generator, check_values=False)
        omega = P.sample_omega(n, beta=self.beta, generator=generator, device=t.device)
        dropped = P.label_drop_mask_diagonal(r, t, p=self.label_drop_prob, generator=generator, check_values=False)
        return omega, t_min, t_max, dropped


def no_guidance(r: torch.Tensor, t: torch.Tensor, generator: torch.Generator):
    """Guidance off: omega = 1 (so v_g = v_t), interval [0, 1], no label drop."""
    del r, generator
    return torch.ones_like(t), torch.zeros_like(t), torch.ones_like(t), torch.zeros_like(t, dtype=torch.bool)


class TrainingStep(nn.Module):
    """The pMF training step around a PMFViT: ``draw_randomness``, then ``forward`` -> per-sample terms and
    the total. Build it with :meth:`from_preset`; the constructor takes every recipe number explicitly.

    Args:
        model: PMFViT with a v-head, seen through ``full.model.core_fns`` (what its output means is its own).
        sample_time_pair: ``(n, *, generator, device) -> (r, t)``, a ``pmf_ref`` time sampler.
        sample_guidance: ``(r, t, generator) -> (omega, t_min, t_max, dropped)``: :class:`GuidanceSampler`
            or :func:`no_guidance`.
        noise_scale: s of the noise e ~ N(0, s^2 I).
        perceptual: frozen :class:`PerceptualDistances`, or None (MSE-only recipe).
        t_thr: perceptual terms only on rows with t < t_thr (pMF: 0.8 for B/L-16, B/32; 0.6 for L/32, H).
        lpips_weight, convnext_weight: the perceptual terms' weights (pMF: 0.4, 0.1).
        c, p: the adaptive weight's constant and power (pMF: 0.01, 1).
        precision: the step's precision policy (``full.precision``: "fp32", "tf32" or "bf16"). "bf16" runs every
            pass of the step under bf16 autocast -- the guidance pass, the JVP (primal and tangent), the
            perceptual nets -- while the losses, the tangent combination and the optimiser stay float32
            (``full.train --precision bf16``); "fp32" and "tf32" add no autocast (TF32 is a global switch).
        autocast_dtype: e.g. torch.bfloat16 to run only the no-grad guidance pass and the perceptual nets under
            autocast, the JVP pass in fp32 (``full.train --bf16``, the older switch). None: no autocast.
        jvp: the JVP engine handed to ``pmf_ref.average_velocity_jvp`` (``full.fast_jvp.jvp``, or
            ``torch.func.jvp``, the reference).
    """

    def __init__(self, model: nn.Module, *, sample_time_pair: TimePairSampler, sample_guidance: Callable,
                 noise_scale: float, perceptual: PerceptualDistances | None, t_thr: float,
                 lpips_weight: float, convnext_weight: float, c: float, p: float, precision: str,
                 autocast_dtype: torch.dtype | None, jvp: P.JVPFn):
        super().__init__()
        if not 0.0 <= t_thr <= 1.0:   # NaN fails too: it would turn the perceptual terms off without a word
            raise ValueError(f"t_thr must lie in [0, 1] (perceptual terms where t < t_thr), got {t_thr}")
        self.model, self.perceptual = model, perceptual
        self.sample_time_pair, self.sample_guidance = sample_time_pair, sample_guidance
        self.noise_scale, self.t_thr, self.autocast_dtype, self.jvp = noise_scale, t_thr, autocast_dtype, jvp
        self.precision, self.step_autocast_dtype = precision, precision_autocast_dtype(precision)   # checks the name
        self.weights = {"lpips": lpips_weight, "convnext": convnext_weight}
        self.c, self.p = c, p

    @classmethod
    def from_preset(cls, model: nn.Module, preset: str | Recipe, *, perceptual: PerceptualDistances | None = None,
                    precision: str = "fp32", autocast_dtype: torch.dtype | None = None, time_sampler: str = "full",
                    guidance: bool = True, jvp: P.JVPFn = fast_jvp.jvp, **overrides) -> "TrainingStep":
        """The released recipe of ``preset`` (a name of ``full.presets.RECIPES``, or a ``Recipe``).

        Args:
            model: the PMFViT; its ``noise_scale`` (the preset's, unless overridden when it was built) is used.
            perceptual: the perceptual nets, or None (MSE only).  precision, autocast_dtype: as in the class.
            time_sampler: a key of :data:`TIME_SAMPLERS` ("full" = pMF).  guidance: trained-in CFG (pMF) or off.
            jvp: the JVP engine (default: the fast one, ``full.fast_jvp.jvp``).
            overrides: fields of ``Recipe`` (t_thr, P_mean, P_std, uniform_fraction, omega_beta, noise_scale)
                or ``label_drop_prob``.
        """
        recipe = RECIPES[check_preset(preset)] if isinstance(preset, str) else preset
        if not isinstance(recipe, Recipe):
            raise ValueError(f"preset must be a preset name or a full.presets.Recipe, got {type(preset).__name__}")
        label_drop_prob = overrides.pop("label_drop_prob", P.LABEL_DROP_PROB)
        noise_scale = overrides.pop("noise_scale", model.noise_scale)
        unknown = set(overrides) - {f.name for f in dataclasses.fields(Recipe)}
        if unknown:
            raise ValueError(f"unknown recipe override(s) {sorted(unknown)}; allowed: "
                             f"{[f.name for f in dataclasses.fields(Recipe)] + ['label_drop_prob']}")
        if time_sampler not in TIME_SAMPLERS:
            raise ValueError(f"time_sampler must be one of {list(TIME_SAMPLERS)}, got {time_sampler!r}")
        recipe = dataclasses.replace(recipe, **overrides)
        sampler_kwargs = {"mean": recipe.P_mean, "std": recipe.P_std}
        if time_sampler == "full":
            sampler_kwargs["uniform_fraction"] = recipe.uniform_fraction
        sample_guidance = (GuidanceSampler(beta=recipe.omega_beta, label_drop_prob=label_drop_prob) if guidance
                           else no_guidance)
        return cls(model, sample_time_pair=functools.partial(TIME_SAMPLERS[time_sampler], **sampler_kwargs),
                   sample_guidance=sample_guidance, noise_scale=noise_scale, perceptual=perceptual,
                   t_thr=recipe.t_thr, lpips_weight=LPIPS_WEIGHT, convnext_weight=CONVNEXT_WEIGHT,
                   c=P.ADAPTIVE_C, p=P.ADAPTIVE_P, precision=precision, autocast_dtype=autocast_dtype, jvp=jvp)

    # ------------------------------------------------------------------ randomness
    def draw_randomness(self, x: torch.Tensor, *, generator: torch.Generator,
                        batch_size: int | None = None) -> StepRandomness:
        """Draw one step's randomness from ``generator`` (on x's device), in a fixed order: times, guidance,
        crop boxes, noise.

        Args:
            x: a batch of images (B, C, H, W): gives the image shape, the device and, by default, the rows.
            batch_size: rows to draw (default B). The trainer draws the *global* batch: every rank draws the
                same numbers and keeps its rows, so 1 process and N processes train on the same batch; the
                released sampler's exact r = t share holds in every even-sized slice
                (:func:`pmf_ref.diagonal_rows`).
        """
        n = x.shape[0] if batch_size is None else batch_size
        r, t = self.sample_time_pair(n, generator=generator, device=x.device)
        omega, t_min, t_max, dropped = self.sample_guidance(r, t, generator)
        boxes = sample_crop_boxes(n, x.shape[2], x.shape[3], generator=generator)
        e = self.noise_scale * torch.randn(n, *x.shape[1:], generator=generator, device=x.device)
        # The crop boxes stay on the CPU: the crop reads them as Python ints, which needs no device sync.
        return StepRandomness(e, r, t, omega, t_min, t_max, dropped, boxes)

    # ------------------------------------------------------------------ the guidance pass
    @staticmethod
    def _autocast(device: torch.device, dtype: torch.dtype | None):
        """``torch.autocast`` to ``dtype`` on ``device``'s type, or a no-op context for None."""
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    def guidance_velocities(self, z: torch.Tensor, t: torch.Tensor, omega_target: torch.Tensor,
                            y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The v-head at h = 0, interval [0, 1], one batched 2B pass: ``(v_c, v_n)`` with the original label
        ``y`` at ``omega_target`` and the null label at omega 1; fp32 (the pass runs under autocast when
        ``autocast_dtype`` is set, z's dtype out).  z: (B, C, H, W); t, omega_target, y: (B,)."""
        n = z.shape[0]
        labels = torch.cat([y, torch.full_like(y, self.model.num_classes)])
        omegas = torch.cat([omega_target, torch.ones_like(omega_target)])
        z2, t2 = torch.cat([z, z]), torch.cat([t, t])
        with self._autocast(z.device, self.autocast_dtype):
            v = core_fns(self.model, make_cond(labels, omegas, 0.0, 1.0)).v(z2, t2).to(z.dtype)
        return v[:n], v[n:]

    # ------------------------------------------------------------------ the loss
    def forward(self, x: torch.Tensor, y: torch.Tensor, randomness: StepRandomness) -> dict[str, torch.Tensor]:
        """:meth:`loss_terms` under the step's precision: with ``precision="bf16"`` every pass of the step runs
        under bf16 autocast (the JVP's too); the backward, which the caller runs, follows the forward's dtypes."""
        with self._autocast(x.device, self.step_autocast_dtype):
            return self.loss_terms(x, y, randomness)

    def loss_terms(self, x: torch.Tensor, y: torch.Tensor, randomness: StepRandomness) -> dict[str, torch.Tensor]:
        """The released loss (``pixelMeanFlow.forward``) of one batch, without a host sync.

        Args: x (B, C, H, W) in [-1, 1]; y (B,) labels; randomness for these B rows (drawn by
        :meth:`draw_randomness`, whose samplers guarantee 0 <= r <= t <= 1 and omega >= 1: the core's value
        checks, each a host sync, are skipped with ``check_values=False``).

        Returns:
            ``{"loss": scalar batch mean of "total", "total", "loss_u", "loss_v", "raw_u", "raw_v",
            "lpips", "convnext"}``, all but "loss" per-sample (B,); absent perceptual terms are zeros.
        """
        rnd, unchecked = randomness, {"check_values": False}
        r, t = rnd.r, rnd.t
        # 1. the point on the path and the clipped regression target v_t = (z_t - x) / max(t, t_eps)
        z_t = P.interpolate(x, rnd.e, t, **unchecked)
        v_t = P.target_velocity(z_t, x, t, **unchecked)

        # 2. the guidance pass: v-head at h = 0, interval [0, 1]; original label at omega', null label at 1
        omega_target = P.guidance_scale_for_target(rnd.omega, r, t, t_min=rnd.t_min, t_max=rnd.t_max, **unchecked)
        with torch.no_grad():
            v_c, v_n = self.guidance_velocities(z_t, t, omega_target, y)
            # 3. the guided target v_g = v_t + (1 - 1/omega')(v_c - v_n); label-dropped rows regress v_t
            v_g = P.guided_velocity(v_t, v_c, v_n, omega_target, **unchecked)
            v_g = torch.where(P.expand_like(rnd.dropped, v_t), v_t, v_g)

        # 4. one JVP of (z, r, t) -> u with tangents (v_c, 0, 1), on the dropped label, h = t - r and the row's
        #    interval. The v-head reads the same trunk pass: the trunk's tokens come back as the JVP's auxiliary
        #    output (primal, no tangent), and the v-head runs on them after it -- same value and gradient as
        #    differentiating both heads, without the v-head's tangent work.
        network = core_fns(self.model, make_cond(P.drop_labels(y, rnd.dropped, null_label=self.model.num_classes),
                                                 rnd.omega, rnd.t_min, rnd.t_max))
        u, dudt, tokens = P.average_velocity_jvp(network.u_and_trunk, z_t, r, t, v_tangent=P.tangent_from_v_head(v_c),
                                                 has_aux=True, jvp=self.jvp, **unchecked)
        v_theta = network.v_from_trunk(z_t, t, tokens)

        # 5. L_u = adp(||u + (t - r) sg(du/dt) - v_g||^2), L_v = adp(||v_theta - v_g||^2)  (pMF Eq. 12)
        raw_u = P.squared_error(P.compound_velocity(u, dudt, r, t, **unchecked), v_g.detach())
        raw_v = P.squared_error(v_theta, v_g)
        per_sample = {"loss_u": P.adaptively_weighted(raw_u, c=self.c, p=self.p),
                      "loss_v": P.adaptively_weighted(raw_v, c=self.c, p=self.p),
                      "raw_u": raw_u.detach(), "raw_v": raw_v.detach(),
                      "lpips": torch.zeros_like(raw_u), "convnext": torch.zeros_like(raw_u)}

        # 6. perceptual terms on x_pred = z_t - t u (unclipped t), masked to rows with t < t_thr: every row goes
        #    through the nets (a row select would be a data-dependent shape, a host sync), masked rows get 0
        if self.perceptual is not None:
            x_pred = P.denoised_image(z_t, u, t, **unchecked)
            with self._autocast(x.device, self.autocast_dtype):
                distances = self.perceptual(x_pred, x, rnd.crop_boxes)
            for name, distance in distances.items():
                per_sample[name] = P.perceptual_term(distance.to(raw_u.dtype), t, t_thr=self.t_thr,
                                                     weight=self.weights[name], c=self.c, p=self.p, **unchecked)
        per_sample["total"] = (per_sample["loss_u"] + per_sample["loss_v"] + per_sample["lpips"]
                               + per_sample["convnext"])
        per_sample["loss"] = per_sample["total"].mean()    # batch mean last (DDP then averages over ranks)
        return per_sample
