"""Watching a run (full/monitor.py): the fixed grid, in-training FID / IS, TensorBoard.

Oracles: the one-step sampler transcribed from pMF Alg. 2 (``x = x_theta(z_1, 0, 1)``, or
``z_1 - u`` for the u-prediction ablation); the offline route ``full.sample`` -> ``.npz`` ->
``full.evaluate`` for the in-training FID (1 process and 2 gloo processes, with a tiny stand-in
for the Inception network: the plumbing is under test, not Inception); TensorBoard's own event
reader for what the writer wrote.
"""
from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from full import fid as F
from full import monitor as M
from full.evaluate import EvalConfig, evaluate
from full.model import build_model, make_cond
from full.sample import GRID_PADDING, SampleConfig, sample_to_folder

pytestmark = pytest.mark.usefixtures("one_thread")

NUM_CLASSES = 10
RESOLUTION = 16           # pMF-T/2
FID_NUM = 5               # odd: two ranks hold 2 and 3 samples (the gather pads)
OMEGA, T_MIN, T_MAX = 2.0, 0.1, 0.7


def _model(seed: int = 0, channels: int = 3) -> torch.nn.Module:
    """A pMF-T/2 with randomised weights (the zero-initialised output layer would give blank images)."""
    torch.manual_seed(seed)
    model = build_model("pMF-T/2", num_classes=NUM_CLASSES, channels=channels, v_head=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=generator))
    return model.eval()


class TinyFeatures(torch.nn.Module):
    """A stand-in for the Inception network with the same call: uint8 (B, 3, H, W) -> (pool, logits).

    Fixed random projections (float32, like the Inception's outputs): FID plumbing in milliseconds.
    """

    def __init__(self, seed: int = 0, pool_dim: int = 16, classes: int = 12):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.pool = torch.nn.Parameter(torch.randn(3 * RESOLUTION ** 2, pool_dim, generator=generator) / RESOLUTION)
        self.logits = torch.nn.Parameter(torch.randn(pool_dim, classes, generator=generator))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pool = torch.tanh((images.float() / 255 - 0.5).flatten(1) @ self.pool)
        return pool, pool @ self.logits


def _reference(path) -> M.FIDReference:
    """TinyFeatures and the statistics of its features on a few random images (also written to ``path``)."""
    extractor = TinyFeatures()
    images = torch.randint(0, 256, (6, 3, RESOLUTION, RESOLUTION), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(5))
    mu, sigma = F.feature_statistics(F.extract_features(extractor, [images], progress=False).pool)
    F.save_statistics(path, mu, sigma)
    return M.FIDReference(extractor, mu, sigma)


# ---------------------------------------------------------------------------- settings

def test_sampling_settings_default_to_the_preset_and_to_no_guidance():
    assert M.sampling_settings("pMF-B/16") == (8.5, 0.1, 0.7)            # the paper's best B/16 settings
    assert M.sampling_settings("pMF-B/16", omega=3.0) == (3.0, 0.1, 0.7)
    assert M.sampling_settings("pMF-B/16", guidance=False) == (1.0, 0.0, 1.0)
    assert M.sampling_settings("pMF-B/16", guidance=False, t_min=0.2, t_max=0.5) == (1.0, 0.2, 0.5)


def test_default_fid_ema_is_the_presets_or_the_longest():
    assert M.default_fid_ema("pMF-B/16", (500.0, 1000.0, 2000.0)) == "2000"
    assert M.default_fid_ema("pMF-H/32", (500.0, 1000.0, 2000.0)) == "500"       # H/32 samples with EMA 500
    assert M.default_fid_ema("pMF-B/16", (0.5, 1.0)) == "1"


# ---------------------------------------------------------------------------- grid

def test_grid_classes_cover_the_label_range():
    assert M.grid_classes(10, 10).tolist() == list(range(10))
    assert M.grid_classes(10, 4).tolist() == [0, 1, 2, 3]
    spread = M.grid_classes(10, 1000).tolist()
    assert spread[0] == 0 and spread[-1] == 999 and len(set(spread)) == 10 and spread == sorted(spread)


def test_grid_inputs_are_stored_once_and_reread(tmp_path):
    shape = (3, RESOLUTION, RESOLUTION)
    first = M.load_or_make_grid_inputs(tmp_path, NUM_CLASSES, shape, seed=0, noise_scale=1.0)
    assert (tmp_path / M.GRID_INPUTS_FILE).is_file()
    assert first.y.tolist() == [k for k in range(NUM_CLASSES) for _ in range(M.GRID_COLUMNS)]
    assert first.z_1.shape == (NUM_CLASSES * M.GRID_COLUMNS, *shape)
    # A resumed run with another seed still gets the stored inputs: the grid stays comparable.
    again = M.load_or_make_grid_inputs(tmp_path, NUM_CLASSES, shape, seed=7, noise_scale=2.0)
    assert torch.equal(again.y, first.y) and torch.equal(again.z_1, first.z_1)
    fresh = M.make_grid_inputs(NUM_CLASSES, shape, seed=7, noise_scale=2.0)
    assert not torch.allclose(fresh.z_1, first.z_1)
    with pytest.raises(ValueError, match=M.GRID_INPUTS_FILE):
        M.load_or_make_grid_inputs(tmp_path, NUM_CLASSES, (1, RESOLUTION, RESOLUTION), seed=0, noise_scale=1.0)


@pytest.mark.parametrize("prediction", ["x", "u"])
def test_grid_samples_are_one_network_call(prediction):
    model = _model()
    model.prediction = prediction   # what the output means is the model's (checkpoints record it)
    inputs = M.make_grid_inputs(NUM_CLASSES, (3, RESOLUTION, RESOLUTION), seed=0, noise_scale=1.0, rows=3, columns=2)
    images = M.grid_samples(model, inputs, omega=OMEGA, t_min=T_MIN, t_max=T_MAX, batch_size=4)
    n = len(inputs.y)
    with torch.no_grad():   # pMF Alg. 2 transcribed: the network at (z_1, r = 0, t = 1)
        output = model.forward_u(inputs.z_1, torch.zeros(n), torch.ones(n), make_cond(inputs.y, OMEGA, T_MIN, T_MAX))
    x = output if prediction == "x" else inputs.z_1 - output
    expected = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    assert images.dtype == torch.uint8 and torch.equal(images, expected)


def test_grid_samples_restore_training_mode():
    model = _model().train()
    inputs = M.make_grid_inputs(NUM_CLASSES, (3, RESOLUTION, RESOLUTION), seed=0, noise_scale=1.0, rows=1, columns=1)
    M.grid_samples(model, inputs, omega=1.0, t_min=0.0, t_max=1.0)
    assert model.training


def test_write_sample_grids_names_and_pixels(tmp_path):
    networks = {"500": _model(0, channels=1), "raw": _model(1, channels=1)}
    inputs = M.make_grid_inputs(NUM_CLASSES, (1, RESOLUTION, RESOLUTION), seed=0, noise_scale=1.0, rows=2, columns=3)
    tiles = M.write_sample_grids(tmp_path, 1500, networks, inputs, omega=1.0, t_min=0.0, t_max=1.0)
    side = RESOLUTION + GRID_PADDING
    for name, expected_file in (("500", "step000001500-ema500.png"), ("raw", "step000001500-raw.png")):
        path = tmp_path / M.SAMPLES_DIR / expected_file
        assert path.is_file() and M.grid_path(tmp_path, 1500, name) == path
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        assert pixels.shape == (2 * side + GRID_PADDING, 3 * side + GRID_PADDING, 3)
        assert np.array_equal(pixels, tiles[name].permute(1, 2, 0).numpy())
        # The first cell is the first sample (grey repeated to RGB).
        first = M.grid_samples(networks[name], M.GridInputs(inputs.y[:1], inputs.z_1[:1]), omega=1.0, t_min=0.0,
                               t_max=1.0)[0, 0].numpy()
        assert np.array_equal(pixels[GRID_PADDING:side, GRID_PADDING:side, 0], first)
    assert not np.array_equal(tiles["500"].numpy(), tiles["raw"].numpy())


# ---------------------------------------------------------------------------- FID

def _offline_fid(model, folder) -> dict:
    """python -m full.sample, then python -m full.evaluate (with the same feature network), in-process."""
    reference = _reference(folder / "ref.npz")
    sample_to_folder(model, SampleConfig(out=str(folder), num=FID_NUM, omega=OMEGA, t_min=T_MIN, t_max=T_MAX,
                                         seed=3, batch_size=2, formats=("npz",), grid=0, progress=False))
    return evaluate(EvalConfig(samples=str(folder / "samples.npz"), ref=str(folder / "ref.npz"), batch_size=2,
                               is_splits=2, progress=False), extractor=reference.extractor)


def test_in_training_fid_equals_sample_then_evaluate(tmp_path):
    model = _model()
    online = M.in_training_fid(model, _reference(tmp_path / "ref.npz"), num=FID_NUM, omega=OMEGA, t_min=T_MIN,
                               t_max=T_MAX, seed=3, batch_size=2, is_splits=2)
    offline = _offline_fid(model, tmp_path / "offline")
    assert online["num"] == offline["num"] == FID_NUM
    assert online["fid"] == pytest.approx(offline["fid"], rel=1e-12)
    assert online["is_mean"] == pytest.approx(offline["is_mean"], rel=1e-12)
    assert online["fid"] > 1e-3
    other = M.in_training_fid(_model(seed=1), _reference(tmp_path / "ref.npz"), num=FID_NUM, omega=OMEGA,
                              t_min=T_MIN, t_max=T_MAX, seed=3, batch_size=2, is_splits=2)
    assert other["fid"] != pytest.approx(online["fid"], rel=1e-3)     # the number depends on the weights


def _fid_worker(rank: int, world_size: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        reference = _reference(os.path.join(out, f"ref{rank}.npz"))
        # Only rank 0 holds the network (the EMAs live there); rank 1 receives it into other weights.
        network = M.broadcast_weights(_model(seed=0 if rank == 0 else 1))
        result = M.in_training_fid(network, reference, num=FID_NUM, omega=OMEGA, t_min=T_MIN, t_max=T_MAX, seed=3,
                                   batch_size=2, is_splits=2, rank=rank, world_size=world_size)
        with open(os.path.join(out, f"rank{rank}.json"), "w") as file:
            json.dump(result, file)
    finally:
        dist.destroy_process_group()


def test_in_training_fid_two_processes_equals_one_with_rank0s_weights(tmp_path):
    init_file = os.path.join(tempfile.mkdtemp(dir=tmp_path), "init")
    mp.spawn(_fid_worker, args=(2, init_file, str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert ranks[1] is None                               # rank 0 scores
    offline = _offline_fid(_model(), tmp_path / "offline")
    assert ranks[0]["num"] == FID_NUM
    assert ranks[0]["fid"] == pytest.approx(offline["fid"], rel=1e-12)
    assert ranks[0]["is_mean"] == pytest.approx(offline["is_mean"], rel=1e-12)


def test_prepare_fid_refuses_missing_files_up_front(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_hub"))
    _reference(tmp_path / "ref.npz")
    with pytest.raises(FileNotFoundError, match=F.INCEPTION_WEIGHTS_FILENAME):
        M.prepare_fid(tmp_path / "ref.npz", None, "cpu")
    with pytest.raises(FileNotFoundError, match="ref-stats"):
        M.prepare_fid(tmp_path / "absent.npz", None, "cpu")
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    with pytest.raises(ValueError, match="mu"):
        M.prepare_fid(tmp_path / "bad.npz", None, "cpu")
    with pytest.raises(ValueError, match="at least 2"):
        M.in_training_fid(_model(), _reference(tmp_path / "ref.npz"), num=1, omega=1.0, t_min=0.0, t_max=1.0)


def test_append_jsonl_keeps_every_line(tmp_path):
    path = tmp_path / M.FID_LOG
    M.append_jsonl(path, {"step": 1, "fid": 3.5})
    M.append_jsonl(path, {"step": 2, "fid": 2.5})
    path.write_bytes(path.read_bytes() + b'{"step": 3, "fid": 1.5}')    # a hand-edited line without newline
    M.append_jsonl(path, {"step": 4, "fid": 0.5})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
    assert not [p for p in tmp_path.iterdir() if p.name != M.FID_LOG]   # no temp files left


# ---------------------------------------------------------------------------- TensorBoard

def test_tensorboard_scalars_and_images_read_back(tmp_path):
    early = M.TensorBoard(tmp_path)          # a first process logs steps 1..4, then dies after step 2's checkpoint
    for step in range(1, 5):
        early.scalars("train", {"raw_u": 99.0}, step)
    early.close()
    board = M.TensorBoard(tmp_path, purge_step=1)
    records = [{"step": step, "raw_u": 10.0 / step, "grad_norm": float(step), "images_per_s": 100.0,
                "lr": 1e-3, "note": "text", "flag": True, "bad": float("nan")} for step in (1, 2, 3)]
    for record in records:
        board.scalars("train", record, record["step"])
    board.scalars("fid", {"step": 3, "fid": 12.5, "is_mean": 1.5}, 3)
    grid = M.tile(torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8))
    board.image("samples/ema500", grid, 3)
    board.close()

    events = event_accumulator.EventAccumulator(str(tmp_path / M.TENSORBOARD_DIR),
                                                size_guidance={event_accumulator.IMAGES: 0})
    events.Reload()
    tags = events.Tags()
    assert set(tags["scalars"]) == {"train/raw_u", "train/grad_norm", "train/images_per_s", "train/lr",
                                    "fid/fid", "fid/is_mean"}
    raw_u = events.Scalars("train/raw_u")
    assert [event.step for event in raw_u] == [1, 2, 3]                   # the first process's steps purged
    assert [event.value for event in raw_u] == pytest.approx([10.0, 5.0, 10.0 / 3], rel=1e-6)
    assert events.Scalars("fid/fid")[0].value == pytest.approx(12.5)
    assert tags["images"] == ["samples/ema500"]
    image = events.Images("samples/ema500")[0]
    assert image.step == 3 and (image.height, image.width) == tuple(grid.shape[1:])


def test_prepare_fid_refuses_statistics_of_another_dimension_at_start(tmp_path, random_weights):
    """A reference of 16-d features would pass every check and fail only at the first in-training FID."""
    _reference(tmp_path / "ref16.npz")                                    # TinyFeatures: 16-d statistics
    with pytest.raises(ValueError, match="16-d features.*2048-d"):
        M.prepare_fid(tmp_path / "ref16.npz", str(random_weights), "cpu")


def test_prepare_fid_refuses_a_reference_of_another_resolution(tmp_path, random_weights):
    np.savez(tmp_path / "ref64.npz", mu=np.zeros(2048), sigma=np.eye(2048), resolution=np.array(64))
    M.prepare_fid(tmp_path / "ref64.npz", str(random_weights), "cpu", resolution=64)
    with pytest.raises(ValueError, match="64 px images but the model makes 32 px"):
        M.prepare_fid(tmp_path / "ref64.npz", str(random_weights), "cpu", resolution=32)
    np.savez(tmp_path / "jit.npz", mu=np.zeros(2048), sigma=np.eye(2048))      # records no resolution
    M.prepare_fid(tmp_path / "jit.npz", str(random_weights), "cpu", resolution=32)
