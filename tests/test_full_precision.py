"""full.precision: the policy's switches, TF32 rounding against a float64 oracle, the du/dt error of each
policy against float64 on B/16's widths, and bf16 gradients of the released step close to fp32's."""
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pmf_ref as P
from full import precision
from full.bench.precision import EmulatedTF32, dudt_errors, randomize_zero_init_, round_to_tf32
from full.model import build_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_policy_names_defaults_and_autocast_dtypes():
    assert precision.PRECISIONS == ("fp32", "tf32", "bf16")
    assert precision.default_precision("cpu") == "fp32"
    assert precision.default_precision(torch.device("cuda")) == "tf32"
    assert precision.autocast_dtype("bf16") is torch.bfloat16
    assert precision.autocast_dtype("fp32") is None and precision.autocast_dtype("tf32") is None
    with precision.autocast("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with precision.autocast("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    precision.apply_precision("tf32", "cpu")   # nothing to set on a CPU, and no error
    with pytest.raises(ValueError, match="precision must be one of fp32, tf32, bf16, got 'fp16'"):
        precision.autocast_dtype("fp16")


def _tf32_oracle(value: float) -> float:
    """Nearest value with an 11-bit significand (10 stored bits), ties away from zero, in float64."""
    if value == 0:
        return 0.0
    mantissa, exponent = math.frexp(value)                  # value = mantissa 2^exponent, 0.5 <= |m| < 1
    scaled = abs(mantissa) * 2 ** 11
    return math.copysign(math.floor(scaled + 0.5) / 2 ** 11, mantissa) * 2 ** exponent


def test_round_to_tf32_matches_float64_oracle():
    generator = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(2000, generator=generator) * 10.0 ** torch.randint(-8, 8, (2000,), generator=generator),
                   torch.tensor([1 + 2 ** -11, 1 + 2 ** -12, -(1 + 3 * 2 ** -11), 0.0, 3.0])])
    rounded = round_to_tf32(x)
    expected = torch.tensor([_tf32_oracle(float(value)) for value in x.double()], dtype=torch.float64)
    assert torch.equal(rounded.double(), expected)
    assert rounded[-5:].tolist() == [1 + 2 ** -10, 1.0, -(1 + 4 * 2 ** -11), 0.0, 3.0]


def test_emulated_tf32_rounds_matmul_operands():
    generator = torch.Generator().manual_seed(1)
    a, b = torch.randn(8, 16, generator=generator), torch.randn(16, 4, generator=generator)
    with EmulatedTF32():
        emulated = a @ b
    assert torch.allclose(emulated, round_to_tf32(a) @ round_to_tf32(b), rtol=0, atol=0)
    assert not torch.equal(emulated, a @ b)


def test_dudt_error_of_each_policy_against_float64():
    """B/16's widths (768, 12 heads) with 2 + 2 + 2 blocks at 32 px: the error grows with the policy's
    mantissa (fp32 23 bits, tf32 10, bf16 8) and stays within bounds derived from its epsilon."""
    result = dudt_errors("pMF-B/16", resolution=32, batch=2, depth=4, head_depth=2)
    errors = result["errors"]
    for quantity in ("u", "dudt", "compound"):
        assert errors["fp32"][quantity] < 50 * 2 ** -24            # a few dozen float32 roundings
        assert errors["tf32"][quantity] < 50 * 2 ** -11
        assert errors["bf16"][quantity] < 50 * 2 ** -9
        assert errors["fp32"][quantity] < errors["tf32"][quantity] < errors["bf16"][quantity]


def test_bf16_step_gradients_close_to_fp32():
    """The released step on pMF-T/4 run under bf16 autocast (every pass, the JVP's included): the loss and every
    parameter's gradient within a few bf16 roundings of the float32 step's (float64 as the yardstick); and the
    JVP pass does run in bf16 (its GEMMs are counted)."""
    from full.step import TrainingStep

    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = randomize_zero_init_(build_model("pMF-T/4", num_classes=10).double(), generator)
    step = TrainingStep.from_preset(model, "pMF-T/4", noise_scale=1.0, t_thr=0.8, omega_beta=1.0)
    n = 8
    randomness = TrainingStep.from_preset(model, "pMF-T/4", noise_scale=1.0, omega_beta=1.0).draw_randomness(
        torch.zeros(n, 3, 32, 32), generator=generator)
    x = torch.rand(n, 3, 32, 32, generator=generator) * 2 - 1
    y = torch.randint(0, 10, (n,), generator=generator)

    def loss_and_grads(dtype, policy):
        model.to(dtype)
        rnd = type(randomness)(*(f.to(dtype) if f.is_floating_point() else f for f in randomness))
        for parameter in model.parameters():
            parameter.grad = None
        with precision.autocast(policy, "cpu"):     # as full.train runs the step: every pass under the policy
            loss = step(x.to(dtype), y, rnd)["loss"]
        assert loss.dtype == dtype                      # the losses stay in the parameters' precision
        loss.backward()
        return loss.detach().double(), [p.grad.double() for p in model.parameters()]

    loss64, grads64 = loss_and_grads(torch.float64, "fp32")
    loss32, grads32 = loss_and_grads(torch.float32, "fp32")
    loss16, grads16 = loss_and_grads(torch.float32, "bf16")
    assert all(g.dtype == torch.float64 for g in grads16)
    assert abs(loss32 - loss64) / loss64 < 1e-5
    assert abs(loss16 - loss64) / loss64 < 2e-2
    flat = {name: torch.cat([g.flatten() for g in grads]) for name, grads in
            (("64", grads64), ("32", grads32), ("16", grads16))}
    error32 = float((flat["32"] - flat["64"]).norm() / flat["64"].norm())
    error16 = float((flat["16"] - flat["64"]).norm() / flat["64"].norm())
    assert error32 < 1e-4
    assert error16 < 5e-2
    cosine = torch.nn.functional.cosine_similarity(flat["16"], flat["64"], dim=0)
    assert cosine > 0.999
    assert error16 > 10 * error32                   # bf16 did happen

    seen = []

    class GemmDtypes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
                seen.append(args[-1].dtype)
            return func(*args, **(kwargs or {}))
    with GemmDtypes(), torch.no_grad(), precision.autocast("bf16", "cpu"):
        terms = step(x, y, randomness)               # guidance pass + JVP pass, no backward
    assert terms["loss"].dtype == torch.float32
    assert seen and set(seen) == {torch.bfloat16}     # no float32 GEMM left in any pass
