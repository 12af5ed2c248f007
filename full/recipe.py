"""The per-step pMF objective of the authors' released recipe, as one ``nn.Module`` that DDP can wrap.

Why a module: the core's JVP (``pmf_ref.average_velocity_jvp``) cannot take a DDP-wrapped network, and
calling the inner network directly bypasses DDP's gradient hooks set up in ``DDP.forward`` (gradients
would silently not be averaged across ranks). Wrapping :class:`PMFObjective` -- whose ``forward`` runs
the whole loss, the JVP included -- puts every use of the parameters inside one ``DDP.forward``, so
DDP's all-reduce covers them (checked by tests/test_full_distributed.py against a 1-process run).

Every equation comes from ``pmf_ref``: the loss is ``pmf_guided_loss`` (the released
``pixelMeanFlow.forward``: one no-grad v-head pass for the guided target and the tangent, one JVP pass
through both heads, adaptive weights, per-sample sums, t_eps clip) plus ``pmf_ref.perceptual_term`` for
``0.4 adp(LPIPS) + 0.1 adp(ConvNeXt)`` on rows with t < t_thr. The randomness follows the released
code too: every device batch has an exact half of its rows at r = t, and only those rows can lose
their label. The ablations (x vs u prediction, time sampler, guidance off)
are functions chosen at the entry point and passed in here.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import nn

import pmf_ref as P

from .model import make_cond, x_hat_from_output
from .perceptual import CONVNEXT_WEIGHT, LPIPS_WEIGHT, PerceptualDistances, sample_crop_boxes

TimePairSampler = Callable[..., tuple[torch.Tensor, torch.Tensor]]   # (n, *, generator, device) -> (r, t)


class StepRandomness(NamedTuple):
    """Everything random in one training step, for the *global* batch (rows sliced per rank)."""
    e: torch.Tensor          # noise, (B, C, H, W), N(0, noise_scale^2)
    r: torch.Tensor          # (B,)
    t: torch.Tensor          # (B,)
    omega: torch.Tensor      # guidance scale, (B,) >= 1
    t_min: torch.Tensor      # guidance interval, (B,)
    t_max: torch.Tensor      # (B,)
    dropped: torch.Tensor    # label-drop mask, bool (B,); True only on rows with r = t
    crop_boxes: torch.Tensor  # paired random-resized-crop boxes (top, left, h, w), int64 (B, 4)

    def rows(self, start: int, stop: int) -> "StepRandomness":
        return StepRandomness(*(field[start:stop] for field in self))


@dataclass(frozen=True)
class GuidanceSampler:
    """Trained-in CFG draws of the released code for one device batch (pMF App. A): interval
    [t_min, t_max] ([0, 1] on r = t rows), omega ∝ omega^-beta on [1, 8], label drop on r = t rows only."""
    beta: float = 1.0
    label_drop_prob: float = P.LABEL_DROP_PROB

    def __call__(self, r: torch.Tensor, t: torch.Tensor, generator: torch.Generator):
        n = t.shape[0]
        t_min, t_max = P.sample_guidance_interval(r, t, generator=generator)
        omega = P.sample_omega(n, beta=self.beta, generator=generator, device=t.device)
        dropped = P.label_drop_mask_diagonal(r, t, p=self.label_drop_prob, generator=generator)
        return omega, t_min, t_max, dropped


def no_guidance(r: torch.Tensor, t: torch.Tensor, generator: torch.Generator):
    """Guidance off: omega = 1 (so v_g = v_t), interval [0, 1], no label drop."""
    del r, generator
    return torch.ones_like(t), torch.zeros_like(t), torch.ones_like(t), torch.zeros_like(t, dtype=torch.bool)


def draw_step_randomness(n: int, image_shape: tuple[int, int, int], *, generator: torch.Generator,
                         noise_scale: float, sample_time_pair: TimePairSampler,
                         sample_guidance: Callable, device: torch.device) -> StepRandomness:
    """Draw one step's randomness for ``n`` rows from ``generator`` (on ``device``), in a fixed order:
    times, guidance, crop boxes, noise. Every rank draws the same global numbers and keeps its rows,
    so 1 process and N processes train on the same batch; the released sampler's exact r = t share
    holds in every even-sized slice (:func:`pmf_ref.diagonal_rows`)."""
    r, t = sample_time_pair(n, generator=generator, device=device)
    omega, t_min, t_max, dropped = sample_guidance(r, t, generator)
    boxes = sample_crop_boxes(n, image_shape[1], image_shape[2], generator=generator)
    e = noise_scale * torch.randn(n, *image_shape, generator=generator, device=device)
    return StepRandomness(e, r, t, omega, t_min, t_max, dropped, boxes.to(device))


class PMFObjective(nn.Module):
    """The pMF training objective around a PMFViT; ``forward`` returns per-sample terms and the total.

    Args:
        model: PMFViT with a v-head (``forward_uv(z, r, t, cond)``, ``forward_v(z, t, cond)``).
        perceptual: frozen :class:`PerceptualDistances`, or None (MSE-only recipe).
        t_thr: perceptual terms only on rows with t < t_thr (pMF: 0.8 for B/L-16, B/32; 0.6 for L/32, H).
        autocast_dtype: e.g. torch.bfloat16 to run the no-grad guidance pass and the perceptual nets under
            autocast; the JVP pass stays in fp32.
    """

    def __init__(self, model: nn.Module, *, perceptual: PerceptualDistances | None = None, t_thr: float = 0.8,
                 autocast_dtype: torch.dtype | None = None,
                 lpips_weight: float = LPIPS_WEIGHT, convnext_weight: float = CONVNEXT_WEIGHT,
                 c: float = P.ADAPTIVE_C, p: float = P.ADAPTIVE_P):
        super().__init__()
        self.model, self.perceptual = model, perceptual
        self.t_thr, self.autocast_dtype = t_thr, autocast_dtype
        self.weights = {"lpips": lpips_weight, "convnext": convnext_weight}
        self.c, self.p = c, p

    def _autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def _as_image(self, z: torch.Tensor, output: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x_hat_from_output(self.model, z, output, t)   # x- or u-prediction: the model says which

    def denoise_uv(self, z, r, t, cond):
        """Both heads of one fp32 forward at h = t - r: ``(x_hat_u, x_hat_v)``, each (B, C, H, W)."""
        # No autocast: this is the function the core's JVP differentiates, and bf16 rounding in
        # du/dt would enter the target through (t - r) du/dt.
        x_hat_u, x_hat_v = self.model.forward_uv(z, r, t, cond)
        return self._as_image(z, x_hat_u, t), self._as_image(z, x_hat_v, t)

    def guidance_denoise(self, z, t, omega_target, y):
        """The v-head at h = 0, interval [0, 1], one batched 2B pass: ``(x_hat_c, x_hat_n)`` with the
        original label ``y`` at ``omega_target`` and the null label at omega 1; fp32 outputs (the pass
        runs under autocast when ``autocast_dtype`` is set)."""
        n = z.shape[0]
        labels = torch.cat([y, torch.full_like(y, self.model.num_classes)])
        omegas = torch.cat([omega_target, torch.ones_like(omega_target)])
        z2, t2 = torch.cat([z, z]), torch.cat([t, t])
        with self._autocast(z.device):
            output = self.model.forward_v(z2, t2, make_cond(labels, omegas, 0.0, 1.0))
        x_hat = self._as_image(z2, output.float(), t2)
        return x_hat[:n], x_hat[n:]

    def forward(self, x: torch.Tensor, y: torch.Tensor, randomness: StepRandomness) -> dict[str, torch.Tensor]:
        """Args: x (B, C, H, W) in [-1, 1]; y (B,) labels; randomness for these B rows.

        Returns:
            ``{"loss": scalar batch mean of "total", "total", "loss_u", "loss_v", "raw_u", "raw_v",
            "lpips", "convnext"}``, all but "loss" per-sample (B,); absent perceptual terms are zeros.
        """
        rnd = randomness
        cond = make_cond(P.drop_labels(y, rnd.dropped, null_label=self.model.num_classes),
                         rnd.omega, rnd.t_min, rnd.t_max)
        terms = P.pmf_guided_loss(
            lambda z, r, t: self.denoise_uv(z, r, t, cond),
            lambda z, t, omega_target: self.guidance_denoise(z, t, omega_target, y),
            x, rnd.e, rnd.r, rnd.t, omega=rnd.omega, t_min=rnd.t_min, t_max=rnd.t_max, dropped=rnd.dropped,
            c=self.c, p=self.p)
        per_sample = {"loss_u": terms.loss_u, "loss_v": terms.loss_v,
                      "raw_u": terms.raw_u.detach(), "raw_v": terms.raw_v.detach(),
                      "lpips": torch.zeros_like(terms.loss_u), "convnext": torch.zeros_like(terms.loss_u)}
        if self.perceptual is not None:
            rows = torch.nonzero(rnd.t < self.t_thr).flatten()   # only low-noise rows need the networks
            if rows.numel():
                with self._autocast(x.device):
                    distances = self.perceptual(terms.x_pred[rows], x[rows], rnd.crop_boxes[rows])
                for name, distance in distances.items():
                    full = torch.zeros_like(terms.loss_u).index_put((rows,), distance.to(terms.loss_u.dtype))
                    per_sample[name] = P.perceptual_term(full, rnd.t, t_thr=self.t_thr, weight=self.weights[name],
                                                         c=self.c, p=self.p)
        per_sample["total"] = (per_sample["loss_u"] + per_sample["loss_v"] + per_sample["lpips"]
                               + per_sample["convnext"])
        per_sample["loss"] = per_sample["total"].mean()    # batch mean last (DDP then averages over ranks)
        return per_sample
