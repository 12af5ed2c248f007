"""full.step: the training step built from a preset, and the released recipe's randomness per device batch
(the loss itself is checked against a transcription of the authors' code in test_full_official.py)."""
import contextlib
import inspect

import pytest
import torch
import torch.utils._python_dispatch

import pmf_ref as P
from full.model import build_model
from full.presets import RECIPES
from full.step import TIME_SAMPLERS, GuidanceSampler, TrainingStep, no_guidance


def _step(preset="pMF-T/4", **overrides):
    with torch.device("meta"):   # drawing needs no weights
        model = build_model(preset, num_classes=10)
    return TrainingStep.from_preset(model, preset, **overrides)


def _draw(n, seed=0, **overrides):
    step = _step(noise_scale=2.0, **overrides)
    return step.draw_randomness(torch.zeros(n, 3, 8, 8), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("slices", [1, 2, 4, 8])
def test_every_device_slice_has_an_exact_half_of_r_equal_t_rows(slices):
    n = 16
    for seed in range(20):
        rnd = _draw(n, seed)
        on_diagonal = (rnd.r == rnd.t).reshape(slices, n // slices)
        assert bool((on_diagonal.sum(dim=1) == n // slices // 2).all())
        assert not bool((rnd.dropped & (rnd.r < rnd.t)).any())        # only r = t rows lose their label
        assert bool((rnd.t_min[rnd.r == rnd.t] == 0).all()) and bool((rnd.t_max[rnd.r == rnd.t] == 1).all())


def test_noise_has_the_noise_scale():
    rnd = _draw(64)
    assert abs(rnd.e.std().item() - 2.0) < 0.05


def test_no_guidance_draws_unit_omega_and_no_drops():
    rnd = _draw(8, guidance=False)
    assert bool((rnd.omega == 1).all()) and not bool(rnd.dropped.any())


def test_draw_randomness_draws_the_global_batch_when_asked():
    step = _step()
    rnd = step.draw_randomness(torch.zeros(2, 3, 8, 8), generator=torch.Generator().manual_seed(0), batch_size=6)
    assert rnd.e.shape == (6, 3, 8, 8) and all(field.shape[0] == 6 for field in rnd)


@pytest.mark.parametrize("preset", ["pMF-B/16", "pMF-L/16", "pMF-H/16", "pMF-L/32"])
def test_from_preset_binds_the_presets_recipe_numbers(preset):
    recipe = RECIPES[preset]
    step = _step(preset)
    assert step.t_thr == recipe.t_thr
    assert step.sample_guidance == GuidanceSampler(beta=recipe.omega_beta, label_drop_prob=0.1)
    assert step.sample_time_pair.func is TIME_SAMPLERS["full"]
    assert step.sample_time_pair.keywords == {"mean": recipe.P_mean, "std": recipe.P_std,
                                             "uniform_fraction": recipe.uniform_fraction}
    assert step.noise_scale == recipe.noise_scale
    assert (step.c, step.p, step.weights) == (0.01, 1.0, {"lpips": 0.4, "convnext": 0.1})


def test_from_preset_overrides_and_ablations():
    step = _step("pMF-B/16", t_thr=0.5, omega_beta=3.0, time_sampler="diagonal", label_drop_prob=0.2)
    assert step.t_thr == 0.5 and step.sample_guidance == GuidanceSampler(beta=3.0, label_drop_prob=0.2)
    assert step.sample_time_pair.func is TIME_SAMPLERS["diagonal"]
    assert _step(guidance=False).sample_guidance is no_guidance
    with pytest.raises(ValueError, match="unknown recipe override"):
        _step(t_threshold=0.5)
    with pytest.raises(ValueError, match="time_sampler"):
        _step(time_sampler="uniform")
    with pytest.raises(ValueError, match=r"t_thr must lie in \[0, 1\].*nan"):
        _step(t_thr=float("nan"))


def test_constructor_has_no_recipe_defaults():
    """Nothing builds a step with default recipe numbers: every constructor argument must be given."""
    parameters = list(inspect.signature(TrainingStep.__init__).parameters.values())[2:]
    assert parameters and all(p.default is inspect.Parameter.empty for p in parameters)
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters)


# ----------------------------------------------------------------------------- the tangent-free v-head

def _randomised_vit(preset: str, dtype=torch.float64, seed: int = 7) -> torch.nn.Module:
    """Noise on every weight: the zero-init gates and output layers would make the comparison trivial."""
    torch.manual_seed(seed)
    model = build_model(preset, num_classes=10).to(dtype)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator, dtype=dtype))
    return model


def _batch(step: TrainingStep, n: int, dtype=torch.float64, seed: int = 8):
    model = step.model
    shape = (model.channels, model.resolution, model.resolution)
    generator = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, *shape, generator=generator, dtype=dtype) * 2 - 1)
    y = torch.randint(0, model.num_classes, (n,), generator=generator)
    randomness = step.draw_randomness(x, generator=generator)
    randomness = type(randomness)(*(f.to(dtype) if f.is_floating_point() else f for f in randomness))
    return x, y, randomness


def _previous_formulation(model, x, y, rnd, jvp):
    """The step as it was before the tangent-free v-head: both heads inside the JVP (``forward_uv``), the
    v-head's velocity the JVP's auxiliary output -- ``pmf_ref.pmf_guided_loss``, the released loss."""
    from full.model import make_cond
    cond = make_cond(P.drop_labels(y, rnd.dropped, null_label=model.num_classes), rnd.omega, rnd.t_min, rnd.t_max)

    def guidance_denoise(z, t, omega_target):
        n = z.shape[0]
        labels = torch.cat([y, torch.full_like(y, model.num_classes)])
        x_hat = model.forward_v(torch.cat([z, z]), torch.cat([t, t]),
                                make_cond(labels, torch.cat([omega_target, torch.ones_like(omega_target)]), 0.0, 1.0))
        return x_hat[:n], x_hat[n:]
    return P.pmf_guided_loss(lambda z, r, t: model.forward_uv(z, r, t, cond), guidance_denoise, x, rnd.e, rnd.r,
                             rnd.t, omega=rnd.omega, t_min=rnd.t_min, t_max=rnd.t_max, dropped=rnd.dropped, jvp=jvp)


def _relative_close(actual, expected, tol=1e-10, msg=""):
    scale = expected.abs().max().item() or 1.0
    torch.testing.assert_close(actual, expected, rtol=0, atol=tol * scale, msg=msg)


@pytest.mark.parametrize("engine", ["forward_ad", "func"])
def test_tangent_free_v_head_equals_differentiating_both_heads(engine):
    """u, du/dt, v_theta, the losses and every gradient equal the previous formulation (v-head inside the
    JVP) to 1e-10 relative, float64, on both JVP engines."""
    from full import fast_jvp
    from full.model import core_fns, make_cond
    jvp = fast_jvp.ENGINES[engine]
    model = _randomised_vit("pMF-T/2")
    step = TrainingStep.from_preset(model, "pMF-T/2", jvp=jvp)
    x, y, rnd = _batch(step, 6)
    params = [p for p in model.parameters()]

    terms = step(x, y, rnd)
    grads = torch.autograd.grad(terms["loss"], params, allow_unused=True)
    previous = _previous_formulation(model, x, y, rnd, jvp)
    previous_loss = (previous.loss_u + previous.loss_v).mean()
    previous_grads = torch.autograd.grad(previous_loss, params, allow_unused=True)
    for key, value in {"loss_u": previous.loss_u, "loss_v": previous.loss_v, "raw_u": previous.raw_u,
                       "raw_v": previous.raw_v}.items():
        _relative_close(terms[key].detach(), value.detach(), msg=key)
    for (name, _), grad, grad_ref in zip(model.named_parameters(), grads, previous_grads):
        assert (grad is None) == (grad_ref is None), name
        if grad is not None:
            _relative_close(grad, grad_ref, msg=name)

    # u, du/dt and v_theta themselves, on one JVP of each formulation
    z = P.interpolate(x, rnd.e, rnd.t)
    cond = make_cond(y, rnd.omega, rnd.t_min, rnd.t_max)
    network = core_fns(model, cond)
    tangent = torch.randn(z.shape, generator=torch.Generator().manual_seed(1), dtype=z.dtype)
    new = P.average_velocity_jvp(network.u_and_trunk, z, rnd.r, rnd.t, v_tangent=tangent, has_aux=True, jvp=jvp)

    def both_heads(z_, r_, t_):
        x_hat_u, x_hat_v = model.forward_uv(z_, r_, t_, cond)
        return P.average_velocity_from_x(z_, x_hat_u, t_), P.average_velocity_from_x(z_, x_hat_v, t_)
    old = P.average_velocity_jvp(both_heads, z, rnd.r, rnd.t, v_tangent=tangent, has_aux=True, jvp=jvp)
    _relative_close(new.u, old.u, msg="u")
    _relative_close(new.dudt, old.dudt, msg="du/dt")
    _relative_close(network.v_from_trunk(z, rnd.t, new.aux), old.aux, msg="v_theta")


def test_v_head_does_no_tangent_work():
    """In the JVP pass no v-head op sees a tangent: the v-head runs after the JVP on the trunk's primal."""
    from full import fast_jvp
    model = build_model("pMF-T/2", num_classes=10)
    seen = []

    def record(module, inputs, output):
        seen.append(fast_jvp.has_tangent(inputs[0]))
    handles = [block.register_forward_hook(record) for block in model.v_head.blocks]
    step = TrainingStep.from_preset(model, "pMF-T/2")
    x, y, rnd = _batch(step, 4, dtype=torch.float32)
    step(x, y, rnd)["loss"].backward()
    for handle in handles:
        handle.remove()
    assert seen and not any(seen)   # the guidance pass and the v-loss pass: never a tangent
    assert all(p.grad is not None for p in model.v_head.parameters())


# ----------------------------------------------------------------------------- precision

def test_bf16_precision_is_the_step_under_bf16_autocast():
    """``precision="bf16"``: the step runs every pass under bf16 autocast itself -- the same loss terms and
    gradients, bit for bit, as the fp32 step called inside ``torch.autocast`` (how the trainer ran it before
    the step owned its precision); the default adds no autocast."""
    model = _randomised_vit("pMF-T/4", dtype=torch.float32)

    def run(step, outer):
        model.zero_grad(set_to_none=True)
        x, y, rnd = _batch(step, 6, dtype=torch.float32)
        with outer:
            terms = step(x, y, rnd)
        terms["loss"].backward()
        return terms, [p.grad.clone() for p in model.parameters()]
    expected, expected_grads = run(TrainingStep.from_preset(model, "pMF-T/4"), torch.autocast("cpu", dtype=torch.bfloat16))
    terms, grads = run(TrainingStep.from_preset(model, "pMF-T/4", precision="bf16"), contextlib.nullcontext())
    fp32, _ = run(TrainingStep.from_preset(model, "pMF-T/4"), contextlib.nullcontext())
    assert terms.keys() == expected.keys() and all(torch.equal(terms[k], expected[k]) for k in expected)
    assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads))
    assert terms["loss"].dtype == torch.float32 and not torch.equal(terms["raw_u"], fp32["raw_u"])   # it ran
    with pytest.raises(ValueError, match="precision must be one of fp32, tf32, bf16"):
        TrainingStep.from_preset(model, "pMF-T/4", precision="fp16")


# ----------------------------------------------------------------------------- no host syncs

SYNC_OPS = ("aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.is_nonzero")
"""Ops that read a tensor's value into Python (a device-to-host sync on a GPU) or give it a data-dependent
shape (which needs the value too)."""


class _CountSyncs(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in SYNC_OPS:
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("perceptual", [False, True])
def test_a_released_step_makes_no_host_sync(perceptual):
    """draw_randomness, forward and backward of pMF-T/4 (perceptual nets random-weight, as in
    tests/test_full_perceptual.py): no op that reads a value into Python."""
    from full.perceptual import PerceptualDistances, build_convnext_v2, build_lpips_vgg
    torch.manual_seed(0)
    distances = (PerceptualDistances(build_lpips_vgg(pretrained_backbone=False),
                                     build_convnext_v2(arch="convnextv2_atto", pretrained=False), crop_size=32)
                 if perceptual else None)
    model = build_model("pMF-T/4", num_classes=10)
    step = TrainingStep.from_preset(model, "pMF-T/4", perceptual=distances)
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 32, 32, generator=generator) * 2 - 1
    y = torch.randint(0, 10, (4,), generator=generator)
    step(x, y, step.draw_randomness(x, generator=generator))["loss"].backward()   # warm-up (lazy inits)
    with _CountSyncs() as counter:
        randomness = step.draw_randomness(x, generator=generator)
        step(x, y, randomness)["loss"].backward()
    assert counter.counts == {}
