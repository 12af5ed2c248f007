"""Fine-tuning from a file in the authors' layout, measured on digits: the v-head rule of full.finetune.

    python -m full.digits.finetune                    # ~15 min on 2 cores: release 600 steps, 200 fine-tune steps
    python -m full.digits.finetune --quick            # a minute: the same at a tiny budget (plumbing only)

1. A "release": ``full.train.train`` (the unchanged trainer) on 10-class digits (pMF-T/4, 16 px, patch 4),
   its raw weights written as the authors' inference file (``full.official.to_official_state_dict`` of the
   network without v-head: no ``v_heads.*``, as in ``pMF-B-16.pt``).
2. Fine-tuning from that file with each v-head rule of ``full.finetune.init_from_official`` ("copy-u",
   "fresh"), and from scratch: the trainer's step (``full.step.TrainingStep``), Muon at lr 1e-3, batch 32, the
   same data order and step randomness for every arm. FD and accuracy of 500 one-step samples of the raw
   weights (``full.digits.metrics``) after each of ``--checks`` steps.
3. Fewer classes: the release fine-tuned on digits 5..9 alone (labels 0..4), its label table from the
   matching rows (``class_rows=[5..9]``) vs the default first rows; FD against the training digits 5..9.

Writes ``--out/finetune.json``. The numbers quoted in full/finetune.py were measured with this procedure
(its first version; other seeds give other data orders, and the data order alone moves FD by about 5).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import cli
from ..fid import feature_statistics, frechet_distance
from ..finetune import V_HEAD_RULES, init_from_official
from ..io import atomic_write, write_json
from ..model import build_model
from ..official import to_official_state_dict
from ..optim import build_optimizer
from ..sample import generate, sample_noise
from ..step import TrainingStep
from ..train import TrainConfig, train
from .classifier import load_or_train_classifier
from .data import NUM_CLASSES, DigitsDataset, load_digits_split, to_digits_coordinates
from .metrics import DigitsEvaluator
from .runs import PRESET, SAMPLE_SEED

ARCH = dict(channels=1, resolution=16, patch=4)
BATCH, LR = 32, 1e-3
PER_CLASS = 50
FEWER = (5, 6, 7, 8, 9)
"""The digits of the fewer-classes arm (labels 0..4 in the fine-tuned model)."""


def make_release(out: Path, steps: int, progress: bool) -> Path:
    """Train the 10-class release with the trainer and write its raw weights in the authors' layout."""
    path = out / f"release-{steps}.pt"
    if path.exists():
        return path
    cfg = TrainConfig(preset=PRESET, num_classes=NUM_CLASSES, **ARCH, batch_size=BATCH, steps=steps, lr=LR, seed=0,
                      perceptual="none", ckpt_every=steps, log_every=max(1, steps // 10), out=str(out / "release"),
                      device="cpu", num_workers=0, overwrite=True, ema_half_lives_kimg=(2000.0,))
    trained = train(cfg, dataset=DigitsDataset(ARCH["resolution"]), progress=progress)
    inference = build_model(PRESET, num_classes=NUM_CLASSES, **ARCH, v_head=False)
    inference.load_state_dict({name: value for name, value in trained.model.state_dict().items()
                               if not name.startswith("v_head.")})
    state = to_official_state_dict(inference)
    atomic_write(path, lambda file: torch.save(state, file))
    return path


@torch.no_grad()
def score(model, evaluator: DigitsEvaluator, digits: tuple[int, ...], reference) -> dict:
    """FD (against ``reference``) and accuracy of PER_CLASS one-step samples of each label 0..len(digits)-1,
    label k asked to show digit ``digits[k]``."""
    model.eval()
    indices = torch.arange(PER_CLASS * len(digits))
    y = indices % len(digits)
    z_1 = sample_noise(indices, (1, ARCH["resolution"], ARCH["resolution"]), seed=SAMPLE_SEED, noise_scale=1.0)
    x = generate(model, z_1, y, omega=1.0, t_min=0.0, t_max=1.0)
    model.train()
    features, logits = evaluator._features_and_logits(to_digits_coordinates(x.double().clamp(-1, 1)))
    asked = torch.tensor(digits)[y]
    return {"fd": frechet_distance(*feature_statistics(features), *reference),
            "accuracy": float((logits.argmax(dim=1) == asked).double().mean())}


def fine_tune(release: Path | None, *, digits: tuple[int, ...], rule: str = "copy-u", class_rows=None,
              steps: int, checks: list[int], seed: int, evaluator: DigitsEvaluator, reference) -> dict:
    """Fine-tune from ``release`` (None: from scratch) on ``digits``; {step: score} at 0 and every check."""
    torch.manual_seed(seed)
    model = build_model(PRESET, num_classes=len(digits), **ARCH)
    if release is not None:
        init_from_official(model, release, num_classes=len(digits), class_rows=class_rows, v_head_rule=rule)
    step_fn = TrainingStep.from_preset(model, PRESET)
    optimizer = build_optimizer(model, kind="muon", lr=LR)
    data = DigitsDataset(ARCH["resolution"])
    rows = [i for i in range(len(data)) if data[i][1] in digits]
    label = {digit: k for k, digit in enumerate(digits)}
    generator, data_generator = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    scores = {0: score(model, evaluator, digits, reference)}
    for step in range(1, steps + 1):
        batch = [rows[i] for i in torch.randint(len(rows), (BATCH,), generator=data_generator).tolist()]
        x = torch.stack([data[i][0] for i in batch])
        y = torch.tensor([label[data[i][1]] for i in batch])
        optimizer.zero_grad(set_to_none=True)
        step_fn(x, y, step_fn.draw_randomness(x, generator=generator))["loss"].backward()
        optimizer.step()
        if step in checks:
            scores[step] = score(model, evaluator, digits, reference)
    return scores


def main(argv: list[str] | None = None) -> None:
    parser = cli.Parser("python -m full.digits.finetune", __doc__.split("\n\n")[0])
    cli.add_out(parser, "runs/digits/finetune", "release-<steps>.pt (the authors' layout), finetune.json")
    parser.add_argument("--quick", action="store_true", help="tiny budget: release 20 steps, fine-tune 4")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2], help="fine-tuning seeds (data order, noise)")
    parser.add_argument("--no-progress", action="store_true", help="hide the release's progress bar")
    args = parser.parse_args(argv)
    cli.check_out(parser, args.out)
    release_steps, steps, checks = (20, 4, [2, 4]) if args.quick else (600, 200, [25, 50, 100, 200])
    out = Path(args.out)
    evaluator = DigitsEvaluator(load_or_train_classifier(out))
    release = make_release(out, release_steps, progress=not args.no_progress)
    split = load_digits_split()
    fewer_reference = feature_statistics(evaluator._features_and_logits(
        split.x_train[torch.isin(split.y_train, torch.tensor(FEWER))])[0])
    all_digits = tuple(range(NUM_CLASSES))
    results: dict = {"release_steps": release_steps, "steps": steps, "v_head": {}, "fewer_classes": {}}
    for seed in args.seeds:
        arms = {rule: release for rule in V_HEAD_RULES} | {"scratch": None}
        for name, source in arms.items():
            results["v_head"].setdefault(name, {})[str(seed)] = fine_tune(
                source, digits=all_digits, rule=name if source else "copy-u", steps=steps, checks=checks, seed=seed,
                evaluator=evaluator, reference=evaluator.reference)
            print(name, seed, {step: round(s["fd"], 1) for step, s in results["v_head"][name][str(seed)].items()},
                  flush=True)
    for name, rows in (("rows 5..9", list(FEWER)), ("first rows (default)", None)):
        results["fewer_classes"][name] = fine_tune(release, digits=FEWER, class_rows=rows, steps=steps // 2,
                                                   checks=[c for c in checks if c <= steps // 2], seed=args.seeds[0],
                                                   evaluator=evaluator, reference=fewer_reference)
        print(name, {step: (round(s["fd"], 1), s["accuracy"]) for step, s in results["fewer_classes"][name].items()},
              flush=True)
    write_json(out / "finetune.json", results)
    print(json.dumps({"wrote": str(out / "finetune.json")}))


if __name__ == "__main__":
    main()
