"""Bad input raises one ``ValueError`` whose message names the argument and the allowed range.

Each case is (id, call, pattern the message must match). The checks look at values only outside
``torch.func`` transforms; the last tests show what that means for a caller.
"""
import pytest
import torch

import pmf_ref as P

B = 3
X = torch.randn(B, 2, generator=torch.Generator().manual_seed(0))
E = torch.randn(B, 2, generator=torch.Generator().manual_seed(1))
T = torch.tensor([0.1, 0.5, 0.9])
R = torch.tensor([0.0, 0.5, 0.2])
T_ABOVE = torch.tensor([0.1, 1.5, 0.9])
T_BELOW = torch.tensor([0.1, -0.2, 0.9])
T_NAN = torch.tensor([0.1, float("nan"), 0.9])
T_INT = torch.tensor([0, 1, 1])
R_ABOVE_T = torch.tensor([0.0, 0.7, 0.2])
OMEGA = torch.tensor([1.0, 2.0, 3.0])

T_RANGE = r"t must lie in \[0, 1\]"
R_ORDER = r"r must satisfy 0 <= r <= t"


def identity_u(z, r, t):
    return z


def identity_x(z, r, t):
    return 0.5 * z


def denoise_uv(z, r, t):
    return 0.5 * z, 0.5 * z


def guidance_denoise(z, t, omega):
    return 0.5 * z, 0.25 * z


GUIDED = dict(omega=OMEGA, t_min=torch.zeros(B), t_max=torch.ones(B),
              dropped=torch.zeros(B, dtype=torch.bool))

CASES = [
    # path
    ("interpolate t > 1", lambda: P.interpolate(X, E, T_ABOVE), T_RANGE),
    ("interpolate t < 0", lambda: P.interpolate(X, E, T_BELOW), T_RANGE),
    ("interpolate t nan", lambda: P.interpolate(X, E, T_NAN), T_RANGE + r".*NaN"),
    ("interpolate int t", lambda: P.interpolate(X, E, T_INT), r"t must have a floating dtype"),
    ("interpolate int x", lambda: P.interpolate(X.long(), E, T), r"x must have a floating dtype"),
    ("interpolate shapes", lambda: P.interpolate(X, E[:, :1], T), r"x and e must have the same shape"),
    ("interpolate batch", lambda: P.interpolate(X, E, torch.rand(B + 1)), r"t has batch size 4 .* batch dimension"),
    ("interpolate 2-d t", lambda: P.interpolate(X, E, T[:, None]), r"t must be a scalar or a \(B,\) vector"),
    ("conditional_velocity shapes", lambda: P.conditional_velocity(X, E[:2]), r"x and e must have the same shape"),
    ("average_velocity_from_x t > 1", lambda: P.average_velocity_from_x(X, E, T_ABOVE), T_RANGE),
    ("average_velocity_from_x shapes", lambda: P.average_velocity_from_x(X, E[:, :1], T),
     r"z_t and x_hat must have the same shape"),
    ("x_from_average_velocity nan", lambda: P.x_from_average_velocity(X, E, T_NAN), T_RANGE),
    ("x_from_average_velocity int u", lambda: P.x_from_average_velocity(X, E.int(), T),
     r"u must have a floating dtype"),
    ("target_velocity t < 0", lambda: P.target_velocity(X, E, T_BELOW), T_RANGE),
    # meanflow
    ("jvp r > t", lambda: P.average_velocity_jvp(identity_u, X, R_ABOVE_T, T, v_tangent=E), R_ORDER),
    ("jvp t > 1", lambda: P.average_velocity_jvp(identity_u, X, R, T_ABOVE, v_tangent=E), T_RANGE),
    ("jvp r nan", lambda: P.average_velocity_jvp(identity_u, X, T_NAN * 0, T, v_tangent=E),
     r"r must lie in \[0, 1\].*NaN"),
    ("jvp tangent shape", lambda: P.average_velocity_jvp(identity_u, X, R, T, v_tangent=E[:2]),
     r"z and v_tangent must have the same shape"),
    ("jvp batch", lambda: P.average_velocity_jvp(identity_u, X, R[:2], T[:2], v_tangent=E),
     r"r has batch size 2"),
    ("jvp int z", lambda: P.average_velocity_jvp(identity_u, X.long(), R, T, v_tangent=E),
     r"z must have a floating dtype"),
    ("compound_velocity r > t", lambda: P.compound_velocity(X, E, R_ABOVE_T, T), R_ORDER),
    ("compound_velocity shapes", lambda: P.compound_velocity(X, E[:, :1], R, T), r"u and dudt must have the same shape"),
    ("compound_velocity batch", lambda: P.compound_velocity(X, E, R[:2], T[:2]), r"r has batch size 2"),
    ("meanflow_target r > t", lambda: P.meanflow_target(X, E, R_ABOVE_T, T), R_ORDER),
    ("tangent_conditional shapes", lambda: P.tangent_conditional(X, E[:2]), r"x and e must have the same shape"),
    # loss
    ("squared_error shapes", lambda: P.squared_error(X, E[:, :1]), r"prediction and target must have the same shape"),
    ("squared_error int", lambda: P.squared_error(X.long(), E), r"prediction must have a floating dtype"),
    ("adaptively_weighted c", lambda: P.adaptively_weighted(T, c=0.0), r"c must be > 0"),
    ("adaptively_weighted p", lambda: P.adaptively_weighted(T, p=-1.0), r"p must be >= 0"),
    ("pmf_loss r > t", lambda: P.pmf_loss(identity_x, X, E, R_ABOVE_T, T), R_ORDER),
    ("pmf_loss t nan", lambda: P.pmf_loss(identity_x, X, E, R, T_NAN), T_RANGE),
    ("pmf_loss batch", lambda: P.pmf_loss(identity_x, X, E, R[:2], T[:2]), r"r has batch size 2"),
    ("pmf_loss shapes", lambda: P.pmf_loss(identity_x, X, E[:, :1], R, T), r"x and e must have the same shape"),
    ("velocity_loss t > 1", lambda: P.velocity_loss(identity_u, X, E, R, T_ABOVE), T_RANGE),
    ("meanflow_loss target shape", lambda: P.meanflow_loss(identity_u, X, R, T, v_target=E[:2], v_tangent=E),
     r"z_t and v_target must have the same shape"),
    ("flow_matching_loss t > 1", lambda: P.flow_matching_loss(identity_x, X, E, T_ABOVE), T_RANGE),
    ("flow_matching_loss batch", lambda: P.flow_matching_loss(identity_x, X, E, T[:2]), r"t has batch size 2"),
    ("pmf_guided_loss r > t", lambda: P.pmf_guided_loss(denoise_uv, guidance_denoise, X, E, R_ABOVE_T, T, **GUIDED), R_ORDER),
    ("pmf_guided_loss omega < 1", lambda: P.pmf_guided_loss(denoise_uv, guidance_denoise, X, E, R, T,
                                                            **dict(GUIDED, omega=OMEGA - 0.5)), r"omega must be >= 1"),
    # guidance
    ("sample_omega s_max", lambda: P.sample_omega(4, s_max=-1.0), r"s_max must be >= 0"),
    ("sample_omega beta", lambda: P.sample_omega(4, beta=-0.5), r"beta must be >= 0"),
    ("sample_omega n", lambda: P.sample_omega(-1), r"n must be a non-negative int"),
    ("sample_omega dtype", lambda: P.sample_omega(4, dtype=torch.int64), r"dtype must be a floating dtype"),
    ("sample_guidance_interval r > t", lambda: P.sample_guidance_interval(R_ABOVE_T, T), R_ORDER),
    ("sample_guidance_interval t > 1", lambda: P.sample_guidance_interval(R, T_ABOVE), T_RANGE),
    ("effective_guidance_scale omega", lambda: P.effective_guidance_scale(OMEGA * 0.5, T, t_min=0.1, t_max=0.7),
     r"omega must be >= 1"),
    ("effective_guidance_scale t", lambda: P.effective_guidance_scale(OMEGA, T_ABOVE, t_min=0.1, t_max=0.7), T_RANGE),
    ("effective_guidance_scale t_min", lambda: P.effective_guidance_scale(OMEGA, T, t_min=-0.1, t_max=0.7),
     r"t_min must lie in \[0, 1\]"),
    ("effective_guidance_scale t_max", lambda: P.effective_guidance_scale(OMEGA, T, t_min=T * 0, t_max=T + 1),
     r"t_max must lie in \[0, 1\]"),
    ("effective_guidance_scale shapes", lambda: P.effective_guidance_scale(OMEGA[:2], T, t_min=0.1, t_max=0.7),
     r"omega and t must have the same shape"),
    ("effective_guidance_scale dropped", lambda: P.effective_guidance_scale(OMEGA, T, t_min=0.1, t_max=0.7,
                                                                            dropped=torch.zeros(B)),
     r"dropped must be a bool tensor"),
    ("guided_velocity omega batch", lambda: P.guided_velocity(X, E, E, OMEGA[:2]), r"omega must have shape \(B,\)"),
    ("guided_velocity omega < 1", lambda: P.guided_velocity(X, E, E, OMEGA * 0.5), r"omega must be >= 1"),
    ("guided_velocity int omega", lambda: P.guided_velocity(X, E, E, OMEGA.long()), r"omega must have a floating dtype"),
    ("guided_velocity shapes", lambda: P.guided_velocity(X, E[:, :1], E, OMEGA), r"v_t and v_c must have the same shape"),
    ("label_drop_mask p", lambda: P.label_drop_mask(4, p=1.5), r"p must lie in \[0, 1\]"),
    ("drop_labels float", lambda: P.drop_labels(T, torch.zeros(B, dtype=torch.bool), null_label=10),
     r"y must be an integer"),
    ("drop_labels mask", lambda: P.drop_labels(T_INT, torch.zeros(B), null_label=10), r"dropped must be a bool tensor"),
    # NaN where a check reads "<= 0" would let it through (issue 24): each is a clear error
    ("adaptively_weighted c nan", lambda: P.adaptively_weighted(T, c=float("nan")), r"c must be > 0 and finite, got nan"),
    ("adaptively_weighted p nan", lambda: P.adaptively_weighted(T, p=float("nan")), r"p must be >= 0 and finite, got nan"),
    ("sample_logit_normal std nan", lambda: P.sample_logit_normal(4, std=float("nan")), r"std must be > 0 and finite"),
    ("sample_logit_normal mean nan", lambda: P.sample_logit_normal(4, mean=float("nan")), r"mean must be a finite"),
    ("sample_omega beta nan", lambda: P.sample_omega(4, beta=float("nan")), r"beta must be >= 0 and finite"),
    ("sample_omega s_max nan", lambda: P.sample_omega(4, s_max=float("nan")), r"s_max must be >= 0 and finite"),
    ("effective_guidance_scale empty interval", lambda: P.effective_guidance_scale(OMEGA, T, t_min=0.7, t_max=0.1),
     r"t_min <= t_max .*got \[0.7, 0.1\]"),
    ("effective_guidance_scale empty interval rows", lambda: P.effective_guidance_scale(
        OMEGA, T, t_min=torch.tensor([0.1, 0.8, 0.2]), t_max=torch.tensor([0.7, 0.6, 0.9])), r"t_min <= t_max"),
    ("guidance_scale_for_target empty interval", lambda: P.guidance_scale_for_target(
        OMEGA, R, T, t_min=torch.full((B,), 0.9), t_max=torch.full((B,), 0.2)), r"t_min <= t_max"),
    ("perceptual_term t_thr nan", lambda: P.perceptual_term(T, T, t_thr=float("nan"), weight=0.4),
     r"t_thr must lie in \[0, 1\].*nan"),
    ("perceptual_term t_thr > 1", lambda: P.perceptual_term(T, T, t_thr=1.5, weight=0.4), r"t_thr must lie in \[0, 1\]"),
    # time
    ("sample_logit_normal std", lambda: P.sample_logit_normal(4, std=0.0), r"std must be > 0"),
    ("sample_logit_normal dtype", lambda: P.sample_logit_normal(4, dtype=torch.int32), r"dtype must be a floating"),
    ("sample_time_pair equal_fraction", lambda: P.sample_time_pair(4, equal_fraction=1.5),
     r"equal_fraction must lie in \[0, 1\]"),
    ("sample_time_pair uniform_fraction", lambda: P.sample_time_pair(4, uniform_fraction=-0.1),
     r"uniform_fraction must lie in \[0, 1\]"),
    ("sample_time_pair n", lambda: P.sample_time_pair(-2), r"n must be a non-negative int"),
    ("sample_time_pair_two_lines fraction", lambda: P.sample_time_pair_two_lines(4, equal_fraction=2.0),
     r"equal_fraction must lie in \[0, 1\]"),
    ("sample_time_pair_diagonal dtype", lambda: P.sample_time_pair_diagonal(4, dtype=torch.int64),
     r"dtype must be a floating"),
    # sampling
    ("sample_one_step int e", lambda: P.sample_one_step(identity_u, X.long()), r"e must have a floating dtype"),
    ("sample_one_step 0-d e", lambda: P.sample_one_step(identity_u, torch.tensor(1.0)), r"e must have a batch dimension"),
    ("sample_multi_step steps 0", lambda: P.sample_multi_step(identity_u, X, steps=0), r"steps must be an int >= 1"),
    ("sample_multi_step steps float", lambda: P.sample_multi_step(identity_u, X, steps=2.5),
     r"steps must be an int >= 1"),
    # helper
    ("expand_like batch", lambda: P.expand_like(T, X[:2]), r"cannot be broadcast per example"),
]


@pytest.mark.parametrize("call,pattern", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_input_raises_value_error_naming_argument(call, pattern):
    with pytest.raises(ValueError, match=pattern):
        call()


def test_valid_edge_input_is_accepted():
    """The edges of the allowed ranges are allowed: t in {0, 1}, r = t, omega = 1, empty batches."""
    zeros, ones = torch.zeros(B), torch.ones(B)
    P.interpolate(X, E, zeros)
    P.interpolate(X, E, ones)
    P.compound_velocity(X, E, T, T)
    P.average_velocity_jvp(identity_u, X, zeros, ones, v_tangent=E)
    P.guided_velocity(X, E, E, ones)
    P.effective_guidance_scale(ones, T, t_min=zeros, t_max=ones)
    assert P.sample_time_pair(0)[0].shape == (0,)


def test_value_checks_are_skipped_inside_transforms_but_not_outside():
    """Inside ``vmap`` the times are wrapped tensors: no data-dependent checks (documented)."""
    per_example = torch.func.vmap(lambda x1, e1, t1: P.interpolate(x1[None], e1[None], t1[None])[0])
    per_example(X, E, T_ABOVE)  # no error: a transform cannot branch on values
    with pytest.raises(ValueError, match=T_RANGE):
        P.interpolate(X, E, T_ABOVE)


def test_check_values_false_skips_only_the_value_checks():
    """A training step passes check_values=False (its samplers guarantee the ranges): no host sync, no value
    check; the static checks (dtype, shape) still run."""
    P.interpolate(X, E, T_ABOVE, check_values=False)
    P.guided_velocity(X, E, E, OMEGA * 0.5, check_values=False)
    P.average_velocity_jvp(identity_u, X, R_ABOVE_T, T, v_tangent=E, check_values=False)
    with pytest.raises(ValueError, match="x and e must have the same shape"):
        P.interpolate(X, E[:, :1], T_ABOVE, check_values=False)
