"""What each precision policy costs in accuracy: u and du/dt of the JVP pass against float64.

    python -m full.bench.precision                            # pMF-B/16 shapes at 64 px, batch 2
    python -m full.bench.precision --resolution 256 --json    # B/16 at its own resolution

One network, built in float64 with every zero-initialised gate and output layer given random values
(at initialisation the blocks are identities and the heads output 0, and every policy would be exact),
then copied to float32. The JVP ``(u, du/dt) = jvp((z, r, t) -> u, tangents (v, 0, 1))`` of the released
step (``pmf_ref.average_velocity_jvp`` with the trainer's engine ``full.fast_jvp.jvp``; u from the u-head's
x_hat) runs once in float64 (the reference) and once per policy (``full.precision``):

* ``fp32`` -- IEEE float32;
* ``tf32`` -- emulated on the CPU (:class:`EmulatedTF32`: every matmul and convolution rounds its two
  operands to TensorFloat-32's 10-bit mantissa and accumulates in float32, as a GPU's TF32 mode does);
* ``bf16`` -- the pass under ``torch.autocast(dtype=torch.bfloat16)``, outputs cast back to float32.

Reported per policy: the relative error ``||a - a_64|| / ||a_64||`` of u, of du/dt and of the compound
velocity ``u + (t - r) du/dt`` that the loss regresses onto the target (rows with 0.2 <= t, r < t). tests/test_full_precision.py asserts bounds on the same function.
"""
from __future__ import annotations

import contextlib
import json

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pmf_ref as P

from .. import cli, fast_jvp
from ..model import PMFViT, build_model, make_cond
from ..precision import PRECISIONS, autocast
from ..presets import PRESETS

TF32_DROPPED_BITS = 13     # float32 has 23 mantissa bits, TensorFloat-32 has 10
GATE_STD = 0.5             # the random values given to the zero-initialised residual gates ...
OUT_INIT_SCALE = 1.0       # ... and to the heads' zero-initialised output layers (Var = scale / fan_in)
NUM_CLASSES = 10


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """Round a float32 tensor to the nearest TensorFloat-32 value (10-bit mantissa; ties away from zero)."""
    if x.dtype != torch.float32:
        return x
    bits = x.contiguous().view(torch.int32)
    half, mask = 1 << (TF32_DROPPED_BITS - 1), ~((1 << TF32_DROPPED_BITS) - 1)
    return ((bits + half) & mask).view(torch.float32)


class EmulatedTF32(TorchDispatchMode):
    """Inside this mode, float32 matmuls and convolutions see TF32-rounded operands (float32 accumulation)."""

    OPS = {torch.ops.aten.mm.default: (0, 1), torch.ops.aten.bmm.default: (0, 1),
           torch.ops.aten.addmm.default: (1, 2), torch.ops.aten.convolution.default: (0, 1)}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        positions = self.OPS.get(func)
        if positions is not None:
            args = tuple(round_to_tf32(a) if i in positions else a for i, a in enumerate(args))
        return func(*args, **(kwargs or {}))


def randomize_zero_init_(model: PMFViT, generator: torch.Generator) -> PMFViT:
    """Give the residual gates N(0, GATE_STD^2) and the heads' output layers N(0, 1/fan_in) weights:
    a network whose blocks and heads all contribute, as after training (in place; returns ``model``)."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "gate_" in name:
                parameter.copy_(GATE_STD * torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
            elif name.endswith("head.out.weight"):
                std = (OUT_INIT_SCALE / parameter.shape[1]) ** 0.5
                parameter.copy_(std * torch.randn(parameter.shape, generator=generator, dtype=torch.float64))
    return model


def _jvp(model: PMFViT, z, r, t, cond, v) -> tuple[torch.Tensor, torch.Tensor]:
    def u_fn(z_, r_, t_):
        return P.average_velocity_from_x(z_, model.forward_u(z_, r_, t_, cond).to(z_.dtype), t_)
    u, dudt, _ = P.average_velocity_jvp(u_fn, z, r, t, v_tangent=v, jvp=fast_jvp.jvp)   # the trainer's engine
    return u.detach(), dudt.detach()


def dudt_errors(preset: str = "pMF-B/16", *, resolution: int | None = 64, batch: int = 2, seed: int = 0,
                precisions: tuple[str, ...] = PRECISIONS, **overrides) -> dict:
    """Relative errors of u, du/dt and (t - r) du/dt under each policy, against float64; see the module doc.
    ``overrides`` go to ``build_model`` (e.g. ``depth=4, head_depth=2``: B/16's widths, fewer blocks)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if resolution is not None:
        overrides["resolution"] = resolution
    model64 = randomize_zero_init_(build_model(preset, num_classes=NUM_CLASSES, **overrides).double(), generator)
    model64.eval()
    model32 = build_model(preset, num_classes=NUM_CLASSES, **overrides)
    model32.load_state_dict({key: value.float() for key, value in model64.state_dict().items()})
    shape = (batch, model64.channels, model64.resolution, model64.resolution)
    x = torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1
    e = torch.randn(shape, generator=generator, dtype=torch.float64)
    # t away from the t_eps clip (where u = (z - x_hat) / t amplifies every error), r < t on every row
    t = 0.2 + 0.8 * torch.rand(batch, generator=generator, dtype=torch.float64)
    r = t * torch.rand(batch, generator=generator, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
    z = P.interpolate(x, e, t)
    v = e - x
    cond64 = make_cond(y, torch.full((batch,), 3.0, dtype=torch.float64), 0.1, 0.7)
    u64, dudt64 = _jvp(model64, z, r, t, cond64, v)
    h = P.expand_like(t - r, z)
    cond32 = {key: (value.float() if value.is_floating_point() else value) for key, value in cond64.items()}
    rows = {}
    for name in precisions:
        mode = EmulatedTF32() if name == "tf32" else None
        with torch.no_grad(), autocast(name, "cpu"), (mode if mode is not None else contextlib.nullcontext()):
            u, dudt = _jvp(model32, z.float(), r.float(), t.float(), cond32, v.float())
        u, dudt = u.double(), dudt.double()

        def relative(a, b):
            return float((a - b).norm() / b.norm())
        rows[name] = {"u": relative(u, u64), "dudt": relative(dudt, dudt64),
                      "compound": relative(u + h * dudt, u64 + h * dudt64)}
    return {"preset": preset, "resolution": model64.resolution, "batch": batch, "seed": seed,
            "dudt_norm_per_element": float(dudt64.norm() / dudt64.numel() ** 0.5), "errors": rows}


def format_table(result: dict) -> str:
    lines = [f"{result['preset']} at {result['resolution']} px, batch {result['batch']}: relative error against float64",
             "", "| precision | u | du/dt | u + (t - r) du/dt |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {row['u']:.1e} | {row['dudt']:.1e} | {row['compound']:.1e} |"
              for name, row in result["errors"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = cli.Parser("python -m full.bench.precision", __doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="pMF-B/16", help=f"one of {' '.join(sorted(PRESETS))}")
    parser.add_argument("--resolution", type=int, default=64, help="image side in px (default 64; the preset's own: 0)")
    parser.add_argument("--batch", type=int, default=2, help="images")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0 .. N-1, one table each")
    cli.add_json(parser, "the errors")
    args = parser.parse_args(argv)
    if args.preset not in PRESETS:
        parser.error(f"--preset: unknown preset {args.preset!r}; choose one of {sorted(PRESETS)}")
    for flag, value, low in (("--batch", args.batch, 1), ("--seeds", args.seeds, 1), ("--resolution", args.resolution, 0)):
        if value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")
    results = [dudt_errors(args.preset, resolution=args.resolution or None, batch=args.batch, seed=seed)
               for seed in range(args.seeds)]
    print(json.dumps(results, indent=2) if args.json else "\n\n".join(format_table(r) for r in results))


if __name__ == "__main__":
    main()
