"""pmf_ref -- every equation of Pixel MeanFlow (pMF) as a small pure function on tensors.

Notation, used by every function here and stated only once:

* t in [0, 1]; **t = 0 is data, t = 1 is noise**. ``z_t = (1 - t) x + t e``, e ~ N(0, s^2 I).
  (JiT and facebookresearch/flow_matching run time the other way: their t is our 1 - t.)
* ``v = e - x`` is the conditional instantaneous velocity; ``u(z_t, r, t)`` the average velocity
  over [r, t], 0 <= r <= t; ``h = t - r``. ``u(z, t, t) = v(z, t)``.
* MeanFlow identity: ``u = v - (t - r) du/dt`` with ``du/dt = (d_z u) v + d_t u``.
* pMF predicts the denoised image ``x_theta(z_t, r, t)`` and converts ``u = (z_t - x_theta) / t``.
* Layouts: images (B, C, H, W), vectors (B, D); per-example times (B,).
* Network callables: ``u_fn(z, r, t) -> u`` (or ``-> (u, aux)``), ``x_fn(z, r, t) -> x_hat``;
  bind labels and parameters by closure or ``torch.func.functional_call``.

Nothing here draws random numbers except the samplers, which take a ``torch.Generator``.
The JVP is ``torch.func.jvp`` unless a caller passes another engine (``jvp=``); value checks (host
syncs) can be skipped with ``check_values=False`` where the values were checked on entry.
"""
from .meanflow import (ADAPTIVE_C, ADAPTIVE_P, AverageVelocityJVP, GuidedLossTerms, JVPFn, MeanFlowLossTerms,
                       adaptively_weighted, average_velocity_jvp, compound_velocity, drop_labels,
                       effective_guidance_scale, flow_matching_loss, guidance_scale_for_target, guided_velocity,
                       meanflow_loss, meanflow_target, perceptual_term, pmf_guided_loss, pmf_loss, squared_error,
                       tangent_conditional, tangent_from_model, tangent_from_v_head, u_fn_from_x_fn, velocity_loss)
from .path import (EQUAL_FRACTION, LABEL_DROP_PROB, OMEGA_S_MAX, P_MEAN, P_STD, T_EPS, average_velocity_from_x,
                   conditional_velocity, denoised_image, diagonal_rows, expand_like, interpolate, label_drop_mask,
                   label_drop_mask_diagonal, sample_guidance_interval, sample_logit_normal, sample_omega,
                   sample_time_pair, sample_time_pair_diagonal, sample_time_pair_endpoint, sample_time_pair_released,
                   sample_time_pair_two_lines, target_velocity, x_from_average_velocity)
from .sampling import sample_multi_step, sample_one_step

__all__ = [name for name in dir() if not name.startswith("_")]
