"""FSDP2 training (full.fsdp) on 2 gloo CPU processes, pMF-T/2: the same training as 1 process and as DDP,
Muon steps equal to unsharded ones, and sharded checkpoints that survive a kill and resume exactly, on
the same or another number of processes.

One spawned 2-process group runs every 2-process scenario and saves what it saw; the 1-process runs
happen in this process (unsharded: DCP reads and writes whole tensors too); the tests compare. The loop
``_train`` is the trainer's step (global randomness, this rank's rows, micro-batches, optimiser, EMA) in a
few lines; one scenario goes through ``full.train.train(fsdp=True)`` itself, stopped and resumed.
"""
from __future__ import annotations

import os
import signal
import tempfile
from contextlib import nullcontext

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from full import fsdp
from full.data import SyntheticDataset
from full.ema import EMASet
from full.model import build_model
from full.optim import build_optimizer
from full.step import TrainingStep
from full.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

GLOBAL_BATCH, ACCUM, STEPS, SAVE_AT = 4, 2, 4, 2
HALF_LIVES = (0.002, 1.0)     # kimg: the first EMA moves visibly in 4 steps of 4 images
LR = 1e-3
# Adam, not Muon, where 1 and 2 processes are compared: Muon's Newton-Schulz runs in bf16 and turns the
# ~1e-7 reduction-order differences of the gradients into ~5% differences of some updates (see
# tests/test_full_distributed.py). Muon itself is checked on identical gradients (GatheredMuon test).
OPTIMIZER = "adam"
PRESET = "pMF-T/2"   # the recipe numbers of the step (the model is a 3-block variant of it)


def _model(perturbed: bool = False) -> torch.nn.Module:
    """pMF-T/2 with 3 blocks (trunk, u-head, v-head: one each; the cost of a step is per block);
    ``perturbed``: every weight moved off its init (the zero-init output layers and gates
    would otherwise leave most gradients zero)."""
    torch.manual_seed(0)
    model = build_model("pMF-T/2", num_classes=10, depth=2, head_depth=1)
    if perturbed:
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.01 * torch.randn_like(param))
    return model


def _dataset() -> SyntheticDataset:
    return SyntheticDataset(GLOBAL_BATCH * STEPS, 16, num_classes=10, seed=3)


def _step_inputs(step: int):
    """The global batch and randomness of step ``step`` (a pure function of the step)."""
    data = _dataset()
    rows = range(step * GLOBAL_BATCH, (step + 1) * GLOBAL_BATCH)
    x = torch.stack([data[i][0] for i in rows])
    y = torch.tensor([data[i][1] for i in rows])
    with torch.device("meta"):   # the step only draws here: a weightless model, no global RNG consumed
        training_step = TrainingStep.from_preset(build_model(PRESET, num_classes=10), PRESET)
    randomness = training_step.draw_randomness(x, generator=torch.Generator().manual_seed(100 + step))
    return x, y, randomness


def _setup(sharded: bool, *, optimizer: str = OPTIMIZER, mixed_precision=None, perturbed: bool = False):
    model = _model(perturbed)
    objective = TrainingStep.from_preset(model, PRESET)
    if sharded:
        fsdp.shard_objective(objective, mixed_precision=mixed_precision)
    opt = build_optimizer(model, kind=optimizer, lr=LR)
    if sharded:
        fsdp.use_gathered_muon(opt)
    emas = fsdp.ShardedEMA(model, HALF_LIVES) if sharded else EMASet(model, HALF_LIVES)
    return model, objective, opt, emas


def _train(model, objective, opt, emas, start: int, stop: int, rank: int = 0, world: int = 1) -> None:
    local, micro = GLOBAL_BATCH // world, GLOBAL_BATCH // world // ACCUM
    for step in range(start, stop):
        x, y, randomness = _step_inputs(step)
        opt.zero_grad(set_to_none=True)
        for index in range(ACCUM):
            first = rank * local + index * micro
            rows = slice(first, first + micro)
            last = index == ACCUM - 1
            with objective.no_sync() if isinstance(objective, DistributedDataParallel) and not last else nullcontext():
                terms = objective(x[rows], y[rows], randomness.rows(first, first + micro))
                (terms["loss"] / ACCUM).backward()
        opt.step()
        emas.update(model, batch=GLOBAL_BATCH, images_seen=step * GLOBAL_BATCH)


def _whole_state(model, emas) -> dict:
    if isinstance(emas, fsdp.ShardedEMA):
        return {"model": fsdp.full_model_state_dict(model), "ema": emas.full_state_dict()}
    return {"model": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "ema": {key: average.state_dict() for key, average in emas.models.items()}}


def _meta(step: int) -> dict:
    return {"step": step, "images_seen": step * GLOBAL_BATCH, "data": {"epoch": 0, "batch": step},
            "rng": {"step_generator": torch.Generator().manual_seed(step).get_state()},
            "config": {"model": {"preset": "pMF-T/2", "num_classes": 10, "depth": 2, "head_depth": 1},
                       "noise_scale": 1.0, "num_classes": 10,
                       "resolution": 16, "train": {"ema_half_lives_kimg": list(HALF_LIVES)}}}


class SimulatedKill(Exception):
    """Raised by a save's fault hook: nothing after that point runs, as if the processes died there."""


def _kill_at(stage: str):
    def fault(seen: str) -> None:
        if seen == stage:
            raise SimulatedKill(stage)
    return fault


# ----------------------------------------------------------------------------- the runs

def _train_config(out: str, *, steps: int, resume: str | None = None, sharded: bool = True, **watch) -> TrainConfig:
    settings = dict(preset="pMF-T/2", num_classes=10, batch_size=GLOBAL_BATCH, accum_steps=ACCUM, steps=steps,
                    perceptual="none", out=out, resume=resume, ckpt_every=10_000, log_every=1,
                    ema_half_lives_kimg=(1.0,), device="cpu", num_workers=0, optimizer=OPTIMIZER, fsdp=sharded)
    return TrainConfig(**{**settings, **watch})


def _watched_config(out: str, fid: dict, *, steps: int, resume: str | None = None) -> TrainConfig:
    """--fsdp with every watch flag: grids every step, FID every 2 (random-weight Inception), 2 snapshots."""
    return _train_config(out, steps=steps, resume=resume, sample_every=1, fid_every=2, fid_num=4, keep_last=2,
                         ckpt_every=1, ema_half_lives_kimg=(0.002, 1.0), **fid)


def _init(rank: int, world: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)


def _two_processes(rank: int, world: int, init_file: str, out: str, fid: dict) -> None:
    """2 processes. FSDP: train 4 steps saving at 2 (two saves at 3 are killed); resume the step-2
    checkpoint in fresh objects, and the 1-process one, to step 4. DDP: 4 steps. Muon on shards."""
    _init(rank, world, init_file)
    try:
        records = {}
        model, objective, opt, emas = _setup(True)
        link = os.path.join(out, "two", fsdp.SHARDED_NAME)
        _train(model, objective, opt, emas, 0, SAVE_AT, rank, world)
        fsdp.save_sharded_checkpoint(link, model=model, optimizer=opt, emas=emas, meta=_meta(SAVE_AT))
        _train(model, objective, opt, emas, SAVE_AT, 3, rank, world)
        for stage in ("shards", "folder"):   # killed after the shards are written / after the rename
            try:
                fsdp.save_sharded_checkpoint(link, model=model, optimizer=opt, emas=emas, meta=_meta(3),
                                             fault=_kill_at(stage))
            except SimulatedKill:   # "folder" fires on rank 0 only: rank 1 waits in the save's last barrier
                dist.barrier()
            records[f"after_kill_{stage}"] = fsdp.read_sharded_meta(link)["step"]
        _train(model, objective, opt, emas, 3, STEPS, rank, world)
        records["fsdp"] = _whole_state(model, emas)

        for name, source in (("resumed", link), ("from_one", os.path.join(out, "one", fsdp.SHARDED_NAME))):
            model, objective, opt, emas = _setup(True)
            meta = fsdp.load_sharded_checkpoint(source, model=model, optimizer=opt, emas=emas)
            records[f"{name}_meta_step"] = meta["step"]
            _train(model, objective, opt, emas, meta["step"], STEPS, rank, world)
            records[name] = _whole_state(model, emas)

        model, objective, opt, emas = _setup(False)
        _train(model, DistributedDataParallel(objective), opt, emas, 0, STEPS, rank, world)
        records["ddp"] = _whole_state(model, emas)

        records["muon"] = _muon_on_identical_gradients()
        records["mixed"] = _mixed_precision_against_rounded_weights(rank, world)

        # The trainer: --fsdp for 2 steps, then --resume (in place) to 3.
        trained = train(_train_config(os.path.join(out, "trainer"), steps=2), _dataset(), progress=False)
        resumed = train(_train_config(os.path.join(out, "trainer"), steps=3, resume=str(trained.checkpoint)),
                        _dataset(), progress=False)
        records["trainer"] = {"model": fsdp.full_model_state_dict(resumed.model),
                              "steps": [record["step"] for record in trained.history + resumed.history]}
        watched = train(_watched_config(os.path.join(out, "watched"), fid, steps=2), _dataset(), progress=False)
        records["watched"] = {"checkpoint": str(watched.checkpoint), "model": fsdp.full_model_state_dict(watched.model)}
        if rank == 0:
            torch.save(records, os.path.join(out, "two.pt"))
    finally:
        dist.destroy_process_group()


def _muon_on_identical_gradients() -> dict:
    """GatheredMuon on shards vs torch Muon unsharded, and torch Muon on the DTensor shards, after a step
    on the same gradients; returns the largest differences (0.0 = bit-identical)."""
    sharded, objective, _, _ = _setup(True, optimizer="muon", perturbed=True)
    x, y, randomness = _step_inputs(0)
    objective(x, y, randomness)["loss"].backward()      # every rank: the whole batch
    plain_model = _model(perturbed=True)
    for param, source in zip(plain_model.parameters(), sharded.parameters()):
        param.grad = source.grad.full_tensor().clone()
    torch_muon_on_shards = _setup(True, optimizer="muon", perturbed=True)[0]
    for param, source in zip(torch_muon_on_shards.parameters(), sharded.parameters()):
        param.grad = source.grad.clone()
    gathered = fsdp.use_gathered_muon(build_optimizer(sharded, kind="muon", lr=LR))
    reference = build_optimizer(plain_model, kind="muon", lr=LR)
    naive = build_optimizer(torch_muon_on_shards, kind="muon", lr=LR)
    for opt in (gathered, reference, naive):
        opt.step()
    muon_names = {name for name, param in sharded.named_parameters() if param.ndim == 2}

    def largest(model) -> float:
        return max((model_param.full_tensor() - ref).abs().max().item() for (name, model_param), ref in
                   zip(model.named_parameters(), plain_model.parameters()) if name in muon_names)
    update = min((ref.detach() - start).abs().max().item() for (name, ref), start in
                 zip(plain_model.named_parameters(), _model(perturbed=True).parameters()) if name in muon_names)
    return {"gathered": largest(sharded), "torch_on_shards": largest(torch_muon_on_shards),
            "smallest_update": update}


def _mixed_precision_against_rounded_weights(rank: int, world: int) -> dict:
    """One forward and backward with bf16 all-gathers, next to fp32 runs of the same network with its
    weights rounded to bf16 ("rounded") and unrounded ("exact"); returns relative differences of the raw
    u-loss (its JVP target included) and of the gradients."""
    sharded, objective, _, _ = _setup(True, mixed_precision="bf16", perturbed=True)
    x, y, randomness = _step_inputs(0)
    local = GLOBAL_BATCH // world
    rows = slice(rank * local, (rank + 1) * local)
    terms = objective(x[rows], y[rows], randomness.rows(rank * local, (rank + 1) * local))
    terms["loss"].backward()
    raw = terms["raw_u"].sum().item()    # the adaptively weighted loss sits near 1 whatever the error; the raw one
    result = {}
    for name, round_weights in (("rounded", True), ("exact", False)):
        reference = _model(perturbed=True)
        if round_weights:
            with torch.no_grad():
                for param in reference.parameters():
                    param.copy_(param.bfloat16().float())
        reference_objective = TrainingStep.from_preset(reference, PRESET)
        reference_loss = reference_objective(x[rows], y[rows], randomness.rows(rank * local, (rank + 1) * local))
        reference_objective(x, y, randomness)["loss"].backward()     # the mean over ranks = the whole batch
        result[f"loss_{name}"] = abs(raw - reference_loss["raw_u"].sum().item()) / abs(raw)
        result[f"grad_{name}"] = max(((param.grad.full_tensor() - ref.grad).abs().max()
                                      / ref.grad.abs().max().clamp(min=1e-30)).item()
                                     for param, ref in zip(sharded.parameters(), reference.parameters()))
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory, random_weights):
    """1 process (here, unsharded: DCP reads and writes whole tensors too) and 2 processes (spawned)."""
    out = str(tmp_path_factory.mktemp("fsdp"))
    model, objective, opt, emas = _setup(False)
    fsdp.use_gathered_muon(opt)
    _train(model, objective, opt, emas, 0, SAVE_AT)
    fsdp.save_sharded_checkpoint(os.path.join(out, "one", fsdp.SHARDED_NAME), model=model, optimizer=opt,
                                 emas=emas, meta=_meta(SAVE_AT))
    _train(model, objective, opt, emas, SAVE_AT, STEPS)
    records = {"plain": _whole_state(model, emas), "out": out}

    init_file = os.path.join(tempfile.mkdtemp(dir=out), "init")
    fid = {"fid_ref": os.path.join(out, "ref.npz"), "inception_weights": str(random_weights)}
    np.savez(fid["fid_ref"], mu=np.zeros(2048), sigma=np.eye(2048))
    mp.spawn(_two_processes, args=(2, init_file, out, fid), nprocs=2, join=True)
    records.update(torch.load(os.path.join(out, "two.pt")))
    # The watched 2-process --fsdp run, resumed on 1 process from its run folder (FSDP on a 1-rank group).
    try:
        resumed = train(_watched_config(os.path.join(out, "watched"), fid, steps=3,
                                        resume=os.path.join(out, "watched")), _dataset(), progress=False)
        records["watched_resumed"] = {"model": fsdp.full_model_state_dict(resumed.model),
                                      "steps": [record["step"] for record in resumed.history]}
    finally:
        dist.destroy_process_group()

    plain_trainer = train(_train_config(os.path.join(out, "plain_trainer"), steps=3, sharded=False),
                          SyntheticDataset(GLOBAL_BATCH * STEPS, 16, num_classes=10, seed=3), progress=False)
    records["plain_trainer"] = {k: v.detach() for k, v in plain_trainer.model.state_dict().items()}

    model, objective, opt, emas = _setup(False)       # resume the 2-process checkpoint on 1 process
    meta = fsdp.load_sharded_checkpoint(os.path.join(out, "two", fsdp.SHARDED_NAME), model=model,
                                        optimizer=opt, emas=emas)
    _train(model, objective, opt, emas, meta["step"], STEPS)
    records["from_two"] = _whole_state(model, emas)
    return records


def _assert_states_close(actual: dict, expected: dict, exact: bool = False) -> None:
    for part in ("model", "ema"):
        flat_actual = _flatten(actual[part])
        flat_expected = _flatten(expected[part])
        assert flat_actual.keys() == flat_expected.keys()
        for key, value in flat_expected.items():
            if exact:
                assert torch.equal(flat_actual[key], value), key
            else:
                torch.testing.assert_close(flat_actual[key], value, rtol=1e-4, atol=1e-5, msg=key)


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


# ----------------------------------------------------------------------------- tests

def test_fsdp_training_matches_one_process_and_ddp(runs):
    _assert_states_close(runs["fsdp"], runs["plain"])
    _assert_states_close(runs["ddp"], runs["plain"])
    initial = _model().state_dict()
    moved = max((runs["plain"]["model"][k] - initial[k]).abs().max().item() for k in initial)
    assert moved > 1e-4                  # equal weights that never moved would prove nothing
    ema = runs["plain"]["ema"][fsdp.format_half_life(HALF_LIVES[0])]
    assert max((ema[k] - initial[k]).abs().max().item() for k in initial) > 1e-5


def test_trainer_fsdp_run_resumed_in_place_matches_one_process(runs):
    """``train(fsdp=True)`` on 2 processes, stopped at step 2 and resumed (RNG, data position, optimiser,
    EMAs from the sharded folder) to step 3, equals an uninterrupted 1-process run."""
    assert runs["trainer"]["steps"] == [1, 2, 3]
    for key, value in runs["plain_trainer"].items():
        torch.testing.assert_close(runs["trainer"]["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_gathered_muon_step_is_bit_identical_to_unsharded_muon(runs):
    muon = runs["muon"]
    assert muon["smallest_update"] > 1e-5    # every matrix moved
    assert muon["gathered"] == 0.0
    # torch.optim.Muon on the DTensor shards is close but not equal (bf16 partial sums across ranks).
    assert 0.0 < muon["torch_on_shards"] < 10 * LR


def test_bf16_all_gather_computes_in_fp32_on_the_rounded_weights(runs):
    """--fsdp-mixed-precision bf16: the forward (JVP included) is the fp32 computation of the network
    with bf16-rounded weights -- not bf16 arithmetic, whose loss would differ at ~1e-3 -- and the
    gradients carry one bf16 rounding (relative 2^-8)."""
    mixed = runs["mixed"]
    assert mixed["loss_rounded"] < 1e-5
    assert mixed["loss_exact"] > 10 * mixed["loss_rounded"]      # the weights really were gathered in bf16
    assert mixed["grad_rounded"] < 2 ** -7


def test_sharded_resume_is_bit_exact_on_the_same_process_count(runs):
    assert runs["resumed_meta_step"] == SAVE_AT
    _assert_states_close(runs["resumed"], runs["fsdp"], exact=True)


def test_kill_during_save_keeps_the_previous_checkpoint(runs):
    assert runs["after_kill_shards"] == SAVE_AT
    assert runs["after_kill_folder"] == SAVE_AT


def test_save_on_two_resume_on_one_and_the_reverse(runs):
    _assert_states_close(runs["from_two"], runs["fsdp"])
    assert runs["from_one_meta_step"] == SAVE_AT
    _assert_states_close(runs["from_one"], runs["plain"])


def test_stale_folders_of_a_killed_save_are_removed(runs):
    link = os.path.join(runs["out"], "two", fsdp.SHARDED_NAME)
    removed = fsdp.remove_stale_sharded(link)
    assert removed                       # the killed saves left a temp folder and an unlinked folder
    assert fsdp.read_sharded_meta(link)["step"] == SAVE_AT
    assert fsdp.remove_stale_sharded(link) == []


def test_export_is_a_single_file_the_sampler_reads(runs, tmp_path):
    from full.checkpoint import load_checkpoint, load_model

    target = fsdp.export_checkpoint(os.path.join(runs["out"], "two", fsdp.SHARDED_NAME), tmp_path / "checkpoint.pt")
    state = load_checkpoint(target)
    assert state["step"] == SAVE_AT and set(state["optimizer"]) == {"adam"}
    network = load_model(target, ema=fsdp.format_half_life(HALF_LIVES[0]))
    assert isinstance(network, torch.nn.Module)
    # The exported optimiser state loads into the unsharded trainer's optimiser.
    build_optimizer(_model(), kind=OPTIMIZER, lr=LR).load_state_dict(state["optimizer"])


def _killed_save(directory: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1")
    torch.set_num_threads(1)
    fsdp.ensure_process_group(torch.device("cpu"))
    model, objective, opt, emas = _setup(True)
    link = os.path.join(directory, fsdp.SHARDED_NAME)
    fsdp.save_sharded_checkpoint(link, model=model, optimizer=opt, emas=emas, meta=_meta(1))
    fsdp.save_sharded_checkpoint(link, model=model, optimizer=opt, emas=emas, meta=_meta(2),
                                 fault=lambda stage: os.kill(os.getpid(), signal.SIGKILL))


def test_sigkill_during_save_leaves_the_last_checkpoint_loadable(tmp_path):
    process = mp.get_context("spawn").Process(target=_killed_save, args=(str(tmp_path),))
    process.start()
    process.join(timeout=120)
    assert process.exitcode == -signal.SIGKILL
    link = tmp_path / fsdp.SHARDED_NAME
    tensors, meta = fsdp.load_sharded_whole(link)
    assert meta["step"] == 1 and set(tensors) == {"model", "ema", "optimizer"}


def test_fsdp_run_writes_grids_fid_and_numbered_snapshots_and_resumes_on_one_process(runs):
    """--fsdp goes through the trainer's one loop: grids of every EMA and the raw weights, in-training FID
    (random-weight Inception), --keep-last snapshots named like the single-file ones (9 digits), resume
    from the run folder on another process count, and full.sample / full.export read the folder as it is."""
    import json
    from pathlib import Path

    from full.checkpoint import load_checkpoint, load_model
    from full.monitor import FID_LOG, SAMPLES_DIR

    run = Path(runs["out"]) / "watched"
    grids = sorted(path.name for path in (run / SAMPLES_DIR).iterdir())
    assert grids == [f"step00000000{step}-{name}.png" for step in (1, 2, 3) for name in ("ema0.002", "ema1", "raw")]
    fid = [json.loads(line) for line in (run / FID_LOG).read_text().splitlines()]
    assert [row["step"] for row in fid] == [2, 3] and all(np.isfinite(row["fid"]) for row in fid)
    logged = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == [1, 2, 3] and "fid" in logged[1]
    assert runs["watched_resumed"]["steps"] == [3]
    folders = sorted(path.name for path in run.glob("checkpoint-*.dcp"))
    assert folders == ["checkpoint-000000002.dcp", "checkpoint-000000003.dcp"]       # --keep-last 2
    assert os.readlink(run / fsdp.SHARDED_NAME) == "checkpoint-000000003.dcp"
    state = load_checkpoint(run / fsdp.SHARDED_NAME)           # what full.export and full.sample read
    assert state["step"] == 3
    for key, value in runs["watched_resumed"]["model"].items():
        assert torch.equal(state["model"][key], value), key
    assert isinstance(load_model(run / fsdp.SHARDED_NAME, ema="1"), torch.nn.Module)
    from full import export
    export.main([str(run / fsdp.SHARDED_NAME), "--out", str(run / "export"), "--ema", "1"])
    assert any((run / "export").iterdir())


def test_dcp_metadata_is_read_without_running_code_and_a_corrupt_one_is_one_line(runs, tmp_path):
    import pickle
    import shutil

    from full.checkpoint import CheckpointError, load_checkpoint

    source = os.path.join(runs["out"], "two", fsdp.SHARDED_NAME)
    good = tmp_path / "good"
    shutil.copytree(os.path.realpath(source), good)
    assert load_checkpoint(good)["step"] == SAVE_AT          # the allow-list reads DCP's own metadata
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for name, content, message in (("planted", pickle.dumps(Payload()), "refused"),
                                   ("corrupt", b"\x80\x04garbage", "corrupt"), ("empty", b"", "unreadable or corrupt")):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        (folder / ".metadata").write_bytes(content)
        with pytest.raises(CheckpointError, match=message) as raised:
            load_checkpoint(folder)
        assert ".metadata" in str(raised.value) and "\n" not in str(raised.value)
        with pytest.raises(CheckpointError, match=message):
            fsdp.read_dcp_metadata(folder)
    assert not marker.exists()


def test_export_of_a_missing_folder_is_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        fsdp.main(["export", str(tmp_path / "absent.dcp"), "--out", str(tmp_path)])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert raised.value.code == 2 and len(errors) == 1 and "is not a complete sharded checkpoint" in errors[0], errors

@pytest.mark.parametrize("argv, message", [
    (["--processes", "0"], "--processes must be >= 1, got 0"),
    (["--resolution", "7"], "--resolution: resolution 7 must be divisible by patch 16"),
    (["--resolution", "-32"], "--resolution: resolution must be a positive integer"),
])
def test_memory_cli_bad_input_is_one_line_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as raised:
        fsdp.main(["memory", *argv])
    error = capsys.readouterr().err
    assert raised.value.code == 2 and error.count("\n") == 1 and message in error, error


def test_compile_wraps_the_sharded_step_and_trains_the_same(tmp_path, monkeypatch):
    """--fsdp --compile compiles the FSDP-sharded training step (measured on CPU, 1 process: inductor compiles
    the sharded step, JVP included, and trains; here torch.compile is recorded, not run, to stay fast)."""
    from torch.distributed.fsdp import FSDPModule

    from full.step import TrainingStep

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, *args, **kwargs: compiled.append(module) or module)
    try:
        eager = train(_train_config(str(tmp_path / "eager"), steps=1), _dataset(), progress=False)
        with_flag = train(_train_config(str(tmp_path / "compiled"), steps=1, compile=True), _dataset(),
                          progress=False)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert len(compiled) == 1 and isinstance(compiled[0], TrainingStep) and isinstance(compiled[0], FSDPModule)
    assert [r["loss"] for r in with_flag.history] == [r["loss"] for r in eager.history]
