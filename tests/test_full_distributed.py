"""DDP around TrainingStep: 2 gloo processes on CPU reproduce a 1-process run on the same global batch.

Each rank also accumulates two micro-batches (``no_sync`` on the first). The JVP runs inside ``DDP.forward`` (the objective computes the whole loss), so DDP's gradient
all-reduce covers it; a wrong set-up (calling the inner network, so gradients are not synced)
would leave the two ranks' parameters different from each other and from the 1-process run.
"""
from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from full.data import SyntheticDataset
from full.train import TrainConfig, train

STEPS = 3


pytestmark = pytest.mark.usefixtures("one_thread")

GLOBAL_BATCH = 4
OPTIMIZER = "adam"
# Not Muon: its Newton-Schulz runs in bf16, which turns the ~1e-7 float reduction-order differences
# between 2 processes and 1 (present even between accumulation and a full batch in one process)
# into ~5% differences of some updates. Gradient sync does not depend on the optimiser.


def _config(out: str, accum_steps: int = 1) -> TrainConfig:
    return TrainConfig(preset="pMF-T/2", num_classes=10, batch_size=GLOBAL_BATCH, accum_steps=accum_steps,
                       steps=STEPS, perceptual="none", out=out, ckpt_every=10_000, log_every=10_000,
                       ema_half_lives_kimg=(1.0,), device="cpu", num_workers=0, optimizer=OPTIMIZER)


def _dataset() -> SyntheticDataset:
    return SyntheticDataset(8, 16, num_classes=10, seed=3)


def _worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        # Two micro-batches per rank: also checks that DDP's no_sync accumulation adds up.
        result = train(_config(out_dir, accum_steps=2), _dataset(), progress=False)
        torch.save({"params": {k: v.detach().clone() for k, v in result.model.state_dict().items()},
                    "losses": [record["loss"] for record in result.history]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_parameters_match_single_process(tmp_path):
    init_file = os.path.join(tempfile.mkdtemp(dir=tmp_path), "init")
    mp.spawn(_worker, args=(2, init_file, str(tmp_path)), nprocs=2, join=True)
    single = train(_config(str(tmp_path / "single")), _dataset(), progress=False)
    reference = single.model.state_dict()
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for key, value in reference.items():
        # Both ranks hold identical weights (gradients were all-reduced) ...
        assert torch.equal(ranks[0]["params"][key], ranks[1]["params"][key]), key
        # ... equal to the 1-process run up to float reduction order (sum of two halves vs one sum).
        torch.testing.assert_close(ranks[0]["params"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    torch.testing.assert_close(torch.tensor(ranks[0]["losses"]), torch.tensor([r["loss"] for r in single.history]),
                               rtol=1e-5, atol=1e-6)
    # The run moved the weights: a test of equality between unchanged weights would prove nothing.
    initial = _initial_state()
    moved = max((reference[key] - initial[key]).abs().max().item() for key in reference)
    assert moved > 1e-4


def _initial_state() -> dict:
    from full.model import build_model

    torch.manual_seed(_config("unused").seed)
    return build_model("pMF-T/2", num_classes=10).state_dict()


def _flag_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    from full.distributed import any_rank

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        answers = [any_rank(rank == 1), any_rank(False), any_rank(True)]
        torch.save(answers, os.path.join(out_dir, f"flags{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_any_rank_agrees_on_a_host_flag_raised_by_one_rank(tmp_path):
    """The stop signal's agreement: a CPU all-reduce, True on every rank when one rank was signalled."""
    init_file = os.path.join(tempfile.mkdtemp(dir=tmp_path), "init")
    mp.spawn(_flag_worker, args=(2, init_file, str(tmp_path)), nprocs=2, join=True)
    assert [torch.load(tmp_path / f"flags{rank}.pt") for rank in range(2)] == [[True, False, True]] * 2
