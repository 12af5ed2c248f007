"""Tests of one-step sampling (full/sample.py).

Oracles: the network's own x_hat at (r, t) = (0, 1) (one-step generation of an x-prediction
network is exactly that), per-index noise drawn alone vs in a batch, single-batch vs any batch
size / process count, the PNG files vs the .npz, closed-form uint8 values, and a checkpoint
written by full.train sampled through the command line vs in-process.

``python -m full.sample`` under bad input: one error line and exit 2 for every bad file, flag and folder;
stale samples are never mixed with new ones; the authors' released layout (``--official-ckpt``) samples
exactly what the network gives.

Oracles: the in-process network's one-step images (``x_hat(z_1, 0, 1)``) for the released layout, the
folder listing before and after, and a planted pickle shown to run under ``weights_only=False``.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import socket
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from hypothesis import given, strategies as st

from full import sample as S
from full.checkpoint import load_model, save_checkpoint
from full.model import build_model, make_cond
from full.official import to_official_state_dict

PRESET = "pMF-T/2"      # 16 px, patch 2: the smallest network
NUM_CLASSES = 10
BATCH_TOL = 1e-5        # float32 differences between batch compositions (matmul blocking)


def _tiny_model(seed: int = 0) -> torch.nn.Module:
    """pMF-T/2 with every parameter perturbed: zero-init heads and gates would make x_hat = 0."""
    torch.manual_seed(seed)
    model = build_model(PRESET, num_classes=NUM_CLASSES, v_head=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=generator))
    return model.eval()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return _tiny_model()


def _all_images(model, num, batch_size, indices=None, **settings):
    indices = torch.arange(num) if indices is None else indices
    settings = {"omega": 3.0, "t_min": 0.1, "t_max": 0.7, "seed": 5, **settings}
    return torch.cat([images for _, _, images in S.iter_samples(model, indices, batch_size=batch_size,
                                                                 progress=False, **settings)])


# ---------------------------------------------------------------------------- noise, labels, uint8

@given(seed=st.integers(0, 2 ** 31 - 1), index=st.integers(0, 2 ** 40), scale=st.sampled_from([1.0, 2.0, 4.0]))
def test_sample_noise_depends_only_on_seed_and_index(seed, index, scale):
    alone = S.sample_noise(torch.tensor([index]), (1, 4, 4), seed=seed, noise_scale=scale)
    neighbours = torch.tensor([max(index - 1, 0), index, index + 1])
    in_batch = S.sample_noise(neighbours, (1, 4, 4), seed=seed, noise_scale=scale)
    assert torch.equal(alone[0], in_batch[1])
    reference = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, index]))).standard_normal(
        (1, 4, 4), dtype=np.float32)
    assert torch.equal(alone[0], scale * torch.from_numpy(reference))
    other_seed = S.sample_noise(torch.tensor([index]), (1, 4, 4), seed=seed + 1, noise_scale=scale)
    assert not torch.equal(alone, other_seed)


@given(num_classes=st.integers(1, 50), num=st.integers(1, 400))
def test_class_labels_balanced_for_every_prefix(num_classes, num):
    counts = torch.bincount(S.class_labels(torch.arange(num), num_classes), minlength=num_classes)
    assert counts.max() - counts.min() <= 1 and counts.sum() == num
    if num % num_classes == 0:
        assert torch.all(counts == num // num_classes)


def test_to_uint8_closed_form():
    x = torch.tensor([-1.5, -1.0, -1 + 0.4 / 127.5, -1 + 0.6 / 127.5, 0.0, 1.0, 7.0])
    expected = torch.tensor([0, 0, 0, 1, 128, 255, 255], dtype=torch.uint8)   # (0 + 1) * 127.5 = 127.5 -> 128
    assert torch.equal(S.to_uint8(x), expected)


# ---------------------------------------------------------------------------- the one network call

def test_generate_equals_network_x_hat_at_one_step(model):
    """x = z_1 - u(z_1, 0, 1) with u = (z_1 - x_hat) / 1 must return the network's x_hat."""
    generator = torch.Generator().manual_seed(1)
    z_1 = torch.randn(6, 3, 16, 16, generator=generator)
    y = torch.tensor([0, 3, 9, 10, 1, 2])                   # 10 = the null label
    x = S.generate(model, z_1, y, omega=4.0, t_min=0.2, t_max=0.6)
    with torch.no_grad():
        x_hat = model.forward_u(z_1, torch.zeros(6), torch.ones(6), make_cond(y, 4.0, 0.2, 0.6))
    torch.testing.assert_close(x, x_hat, atol=1e-6, rtol=0)
    assert x.std() > 0.1   # not the constant output of an untrained head


def test_samples_batch_size_and_shard_invariant(model):
    reference = _all_images(model, 10, batch_size=10)
    for batch_size in (1, 3, 4):
        assert (_all_images(model, 10, batch_size).int() - reference.int()).abs().max() <= 1
    shards = [_all_images(model, 10, 2, indices=S.shard(10, rank, 3)) for rank in range(3)]
    assert (torch.cat(shards).int() - reference.int()).abs().max() <= 1
    assert not torch.equal(_all_images(model, 10, 10, seed=6), reference)
    assert not torch.equal(_all_images(model, 10, 10, omega=1.0), reference)   # guidance is an input


# ---------------------------------------------------------------------------- the output folder

def test_sample_folder_png_npz_grid_agree(model, tmp_path):
    cfg = S.SampleConfig(out=str(tmp_path), num=12, omega=2.0, t_min=0.1, t_max=0.7, batch_size=5, grid=9,
                         progress=False)
    S.sample_to_folder(model, cfg)
    with np.load(tmp_path / "samples.npz") as data:
        images, labels = data["arr_0"], data["labels"]
    assert images.shape == (12, 16, 16, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, np.arange(12) % NUM_CLASSES)
    pngs = sorted(os.listdir(tmp_path / "images"))
    assert pngs == [f"{i:06d}.png" for i in range(12)]
    for i, name in enumerate(pngs):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "images" / name)), images[i])
    expected = _all_images(model, 12, 12, omega=2.0, seed=0).permute(0, 2, 3, 1).numpy()
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (2 + 3 * 18, 2 + 3 * 18, 3)                 # 3 x 3 tiles of 16 px, 2 px padding
    np.testing.assert_array_equal(grid[2:18, 2:18], images[0])
    info = json.loads((tmp_path / "sample_config.json").read_text())
    assert info["omega"] == 2.0 and info["num"] == 12
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]   # no temp files left


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sample_rank(rank: int, world_size: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        cfg = S.SampleConfig(out=out, num=7, omega=2.0, t_min=0.1, t_max=0.7, batch_size=2, grid=4, progress=False)
        S.sample_to_folder(_tiny_model(), cfg, rank=rank, world_size=world_size)
    finally:
        dist.destroy_process_group()


def test_sample_two_processes_match_one(model, tmp_path):
    """Two gloo processes write one .npz and one PNG folder equal to a single process's."""
    single = S.sample_to_folder(model, S.SampleConfig(out=str(tmp_path / "one"), num=7, omega=2.0, t_min=0.1,
                                                      t_max=0.7, batch_size=7, grid=0, progress=False))
    # fork: the children reuse the imported modules (spawn would re-import torch in each).
    mp.start_processes(_sample_rank, args=(2, _free_port(), str(tmp_path / "two")), nprocs=2, join=True,
                       start_method="fork")
    with np.load(single / "samples.npz") as one, np.load(tmp_path / "two" / "samples.npz") as two:
        assert np.abs(one["arr_0"].astype(int) - two["arr_0"].astype(int)).max() <= 1
        np.testing.assert_array_equal(one["labels"], two["labels"])
    assert sorted(os.listdir(tmp_path / "two" / "images")) == sorted(os.listdir(single / "images"))


# ---------------------------------------------------------------------------- checkpoints and the CLI

@pytest.fixture(scope="module")
def train_checkpoint(tmp_path_factory):
    """One optimiser step of full.train on synthetic data: a real checkpoint of the trainer's format."""
    from full.train import TrainConfig, train

    out = tmp_path_factory.mktemp("train")
    cfg = TrainConfig(preset=PRESET, num_classes=NUM_CLASSES, batch_size=4, steps=1, perceptual="none",
                      ema_half_lives_kimg=(0.001, 2.0), out=str(out), num_workers=0, device="cpu", log_every=1)
    return train(cfg, progress=False).checkpoint


def test_sample_cli_on_train_checkpoint_matches_in_process(train_checkpoint, tmp_path, capsys):
    S.main(["--ckpt", str(train_checkpoint), "--ema", "0.001", "--omega", "3", "--interval", "0.2,0.6",
            "--per-class", "1", "--batch-size", "4", "--out", str(tmp_path), "--device", "cpu", "--no-progress"])
    assert "wrote 10 samples" in capsys.readouterr().out
    with np.load(tmp_path / "samples.npz") as data:
        images = data["arr_0"]
    assert images.shape == (NUM_CLASSES, 16, 16, 3)
    reference = load_model(train_checkpoint, "0.001")
    expected = _all_images(reference, NUM_CLASSES, 10, omega=3.0, t_min=0.2, t_max=0.6, seed=0)
    assert np.abs(images.astype(int) - expected.permute(0, 2, 3, 1).numpy().astype(int)).max() <= 1
    info = json.loads((tmp_path / "sample_config.json").read_text())
    assert info["ema"] == "0.001" and info["preset"] == PRESET


@pytest.mark.parametrize("flags, message", [
    (["--omega", "0.5"], "--omega must be"),
    (["--interval", "0.7,0.2"], "--interval needs"),
    (["--num", "7", "--per-class", "1", "--ema", "2"], "disagrees with --per-class"),
    (["--batch-size", "0"], "--batch-size must be"),
    (["--ema", "123"], "it kept --ema 0.001, --ema 2, or pass --ema raw"),   # the kept EMAs, as flags
    (["--ema", "2000"], "--ema 2000: the checkpoint has no EMA '2000'"),
    (["--ema", "abc"], "--ema must be a half-life in kimg or 'raw', got 'abc'"),
    (["--class", "10"], "--class 10: the model has 10 classes, labels 0..9"),
    (["--class", "-1"], "--class -1"),
    (["--class", "3", "3"], "--class lists a label twice"),
    (["--class", "3", "4", "--num", "5", "--per-class", "2"], "--num 5 disagrees with --per-class 2 x 2 classes"),
])
def test_sample_cli_rejects_bad_arguments(train_checkpoint, tmp_path, capsys, flags, message):
    num = [] if "--num" in flags else ["--num", "10"]
    with pytest.raises(SystemExit) as exit_info:
        S.main(["--ckpt", str(train_checkpoint), "--out", str(tmp_path), *num, "--device", "cpu",
                "--no-progress", *flags])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in error and "ema=None" not in error
    assert len(error.strip().splitlines()) == 1


def test_sample_cli_chosen_classes(train_checkpoint, tmp_path, capsys):
    """--class 7 2 --per-class 3: six images, labels 7, 2, 7, 2, ...; each image is the one the network gives
    for its (label, noise index) pair."""
    S.main(["--ckpt", str(train_checkpoint), "--ema", "0.001", "--class", "7", "2", "--per-class", "3",
            "--omega", "3", "--interval", "0.2,0.6", "--out", str(tmp_path), "--device", "cpu", "--no-progress"])
    assert "wrote 6 samples" in capsys.readouterr().out
    with np.load(tmp_path / "samples.npz") as data:
        images, labels = data["arr_0"], data["labels"]
    assert labels.tolist() == [7, 2, 7, 2, 7, 2]
    reference = load_model(train_checkpoint, "0.001")
    z_1 = S.sample_noise(torch.arange(6), (3, 16, 16), seed=0, noise_scale=reference.noise_scale)
    with torch.no_grad():   # one-step generation of an x-prediction network: x_hat(z_1, r=0, t=1 | y, omega, interval)
        x_hat = reference.forward_u(z_1, torch.zeros(6), torch.ones(6),
                                    make_cond(torch.tensor([7, 2, 7, 2, 7, 2]), 3.0, 0.2, 0.6))
    expected = S.to_uint8(x_hat).permute(0, 2, 3, 1).numpy()
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1
    assert json.loads((tmp_path / "sample_config.json").read_text())["classes"] == [7, 2]


def test_sample_cli_default_ema_is_one_the_run_kept(train_checkpoint, tmp_path, capsys):
    """The run kept EMAs 0.001 and 2 kimg, not the preset's 2000: without --ema the nearest kept one (2) is
    sampled, and a note says so."""
    S.main(["--ckpt", str(train_checkpoint), "--num", "2", "--out", str(tmp_path), "--device", "cpu",
            "--no-progress"])
    captured = capsys.readouterr()
    assert json.loads((tmp_path / "sample_config.json").read_text())["ema"] == "2"
    assert "EMA 2" in captured.out and "did not keep EMA 2000" in captured.err


@pytest.mark.parametrize("classes, expected", [(None, [0, 1, 2, 0, 1]), ((5, 1), [5, 1, 5, 1, 5])])
def test_class_labels_with_chosen_classes(classes, expected):
    assert S.class_labels(torch.arange(5), 3 if classes is None else 10, classes).tolist() == expected


def test_load_model_hand_written_checkpoint(model, tmp_path):
    """The contract's minimal checkpoint (config + EMA dict) loads to the same network."""
    state = {"model": model.state_dict(), "ema": {"500": model.state_dict()},
             "config": {"model": {"preset": PRESET, "num_classes": NUM_CLASSES}}}
    save_checkpoint(tmp_path / "ckpt.pt", state)
    loaded, preset, ema = S.load_for_sampling(str(tmp_path / "ckpt.pt"), "500.0", torch.device("cpu"))
    assert (preset, ema) == (PRESET, "500")
    assert torch.equal(_all_images(loaded, 4, 4), _all_images(model, 4, 4))


@pytest.mark.parametrize("preset, expected", [     # pMF §4 and the released configs: (omega, t_min, t_max, EMA kimg)
    ("pMF-B/16", (8.5, 0.1, 0.7, "2000")), ("pMF-L/16", (7.0, 0.2, 0.7, "1000")),
    ("pMF-H/16", (7.0, 0.2, 0.6, "1000")), ("pMF-B/32", (6.5, 0.1, 0.7, "2000")),
    ("pMF-L/32", (7.5, 0.2, 0.6, "2000")), ("pMF-H/32", (5.5, 0.1, 0.6, "500")),
])
def test_sampling_defaults_are_the_paper_best_settings(preset, expected):
    defaults = S.sampling_defaults(preset)
    assert (defaults["omega"], defaults["t_min"], defaults["t_max"], defaults["ema"]) == expected


def test_sample_cli_defaults_come_from_the_preset(model, tmp_path):
    """No --omega/--interval/--ema: the preset's best settings (T/2 copies B/16's: 8.5, [0.1, 0.7], 2000)."""
    save_checkpoint(tmp_path / "ckpt.pt", {"model": model.state_dict(), "ema": {"2000": model.state_dict()},
                                           "config": {"model": {"preset": PRESET, "num_classes": NUM_CLASSES}}})
    S.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--num", "3", "--out", str(tmp_path / "out"), "--format", "png",
            "--grid", "0", "--device", "cpu", "--no-progress"])
    info = json.loads((tmp_path / "out" / "sample_config.json").read_text())
    assert (info["omega"], info["t_min"], info["t_max"], info["ema"]) == (8.5, 0.1, 0.7, "2000")
    first = np.asarray(Image.open(tmp_path / "out" / "images" / "000000.png"))
    expected = _all_images(model, 1, 1, omega=8.5, t_min=0.1, t_max=0.7, seed=0)[0].permute(1, 2, 0).numpy()
    assert np.abs(first.astype(int) - expected.astype(int)).max() <= 1
    assert not (tmp_path / "out" / "samples.npz").exists()


def test_sample_cli_reads_a_u_prediction_checkpoint_as_u(tmp_path, capsys):
    """A checkpoint trained with prediction='u' is sampled as u: the CLI's images equal the one-step
    samples x = z_1 - output(z_1, 0, 1) transcribed here (and differ from reading the output as x)."""
    from full.train import TrainConfig, train

    cfg = TrainConfig(preset=PRESET, num_classes=NUM_CLASSES, batch_size=4, steps=3, perceptual="none",
                      prediction="u", ema_half_lives_kimg=(0.001,), out=str(tmp_path / "run"), num_workers=0,
                      device="cpu", log_every=1, lr=3e-3)
    checkpoint = train(cfg, progress=False).checkpoint
    S.main(["--ckpt", str(checkpoint), "--ema", "raw", "--omega", "2", "--interval", "0.1,0.7", "--num", "4",
            "--batch-size", "4", "--out", str(tmp_path / "samples"), "--device", "cpu", "--no-progress",
            "--format", "npz", "--grid", "0"])
    with np.load(tmp_path / "samples" / "samples.npz") as data:
        images = torch.from_numpy(data["arr_0"]).permute(0, 3, 1, 2).int()
    model = load_model(checkpoint, None)      # the raw weights
    assert model.prediction == "u"
    indices = torch.arange(4)
    y = S.class_labels(indices, NUM_CLASSES)
    z_1 = S.sample_noise(indices, (3, 16, 16), seed=0, noise_scale=model.noise_scale)
    cond = make_cond(y, 2.0, 0.1, 0.7)
    with torch.no_grad():
        expected = S.to_uint8(z_1 - model.forward_u(z_1, torch.zeros(4), torch.ones(4), cond)).int()
    assert (images - expected).abs().max() <= 1
    read_as_x = S.to_uint8(model.forward_u(z_1, torch.zeros(4), torch.ones(4), cond)).int()
    assert (images - read_as_x).abs().max() > 1


COMMON = ["--num", "4", "--device", "cpu", "--no-progress", "--grid", "0"]


def _perturbed(preset: str = PRESET, seed: int = 0, scale: float = 0.2, **overrides) -> torch.nn.Module:
    """A network whose zero-initialised heads and gates are perturbed, so its samples are not constant."""
    torch.manual_seed(seed)
    model = build_model(preset, v_head=False, **overrides)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def _contract(model) -> dict:
    return {"model": model.state_dict(), "ema": {"2000": model.state_dict()},
            "config": {"model": {"preset": PRESET, "num_classes": 10}}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    save_checkpoint(path, _contract(_perturbed(num_classes=10)))
    return path


def run_cli(argv, capsys) -> tuple[int, list[str]]:
    try:
        S.main([str(arg) for arg in argv])
        code = 0
    except SystemExit as stop:
        code = stop.code
    return code, [line for line in capsys.readouterr().err.splitlines() if "error:" in line]


def _file(tmp_path, name, content: bytes):
    (tmp_path / name).write_bytes(content)
    return tmp_path / name


def _nan_checkpoint(tmp_path):
    state = _contract(_perturbed(num_classes=10))
    state["ema"]["2000"]["u_head.out.bias"] = torch.full_like(state["ema"]["2000"]["u_head.out.bias"], float("inf"))
    save_checkpoint(tmp_path / "nan.pt", state)
    return tmp_path / "nan.pt"


def _exploding_checkpoint(tmp_path):
    """Finite but absurd weights (what one step at lr 1e30 leaves): the images come out NaN."""
    save_checkpoint(tmp_path / "huge.pt", _contract(_perturbed(num_classes=10, scale=1e25)))
    return tmp_path / "huge.pt"


def _planted(tmp_path):
    from test_full_checkpoint import plant_pickle   # the payload's helper lives with the checkpoint tests
    plant_pickle(tmp_path / "pickle.pt", tmp_path / "payload-ran")
    return tmp_path / "pickle.pt"


def _earlier_samples(tmp_path):
    (tmp_path / "out" / "images").mkdir(parents=True)
    (tmp_path / "out" / "images" / "000000.png").write_bytes(b"an earlier sample")
    return tmp_path / "out"


def _official(tmp_path, preset="pMF-T/4"):
    torch.save(to_official_state_dict(_perturbed(preset)), tmp_path / "official.pt")
    return tmp_path / "official.pt"


BAD_INPUTS = [   # (name, argv builder (tmp_path, checkpoint), text the one error line must contain)
    ("no checkpoint", lambda t, c: ["--out", t / "o"], "one of the arguments --ckpt --official-ckpt is required"),
    ("both checkpoints", lambda t, c: ["--ckpt", c, "--official-ckpt", c, "--out", t / "o"], "not allowed with"),
    ("missing --ckpt", lambda t, c: ["--ckpt", t / "absent.pt", "--out", t / "o"], "--ckpt"),
    ("empty --ckpt", lambda t, c: ["--ckpt", _file(t, "e.pt", b""), "--out", t / "o"], "is empty (0 bytes)"),
    ("truncated --ckpt", lambda t, c: ["--ckpt", _file(t, "t.pt", c.read_bytes()[:3000]), "--out", t / "o"],
     "truncated or corrupt"),
    ("garbage --ckpt", lambda t, c: ["--ckpt", _file(t, "g.pt", b"GIF89a" * 400), "--out", t / "o"], "not a torch file"),
    ("foreign --ckpt", lambda t, c: ["--ckpt", _official(t), "--out", t / "o"], "sample it with --official-ckpt"),
    ("planted pickle", lambda t, c: ["--ckpt", _planted(t), "--out", t / "o"], "refused: it holds Python objects"),
    ("NaN weights", lambda t, c: ["--ckpt", _nan_checkpoint(t), "--out", t / "o"], "EMA 2000 hold NaN or inf"),
    ("weights that explode", lambda t, c: ["--ckpt", _exploding_checkpoint(t), "--out", t / "o"],
     "the network returned NaN or inf"),
    ("absent EMA", lambda t, c: ["--ckpt", c, "--ema", "500", "--out", t / "o"], "it kept --ema 2000, or pass --ema raw"),
    ("--out under a file", lambda t, c: ["--ckpt", c, "--out", _file(t, "f", b"x") / "o"], "is a file, not a folder"),
    ("--out holds samples", lambda t, c: ["--ckpt", c, "--out", _earlier_samples(t)], "pass --overwrite"),
    ("--preset with --ckpt", lambda t, c: ["--ckpt", c, "--preset", PRESET, "--out", t / "o"],
     "--preset applies only to --official-ckpt"),
    ("--official-ckpt without --preset", lambda t, c: ["--official-ckpt", _official(t), "--out", t / "o"],
     "--official-ckpt needs --preset"),
    ("--ema with --official-ckpt", lambda t, c: ["--official-ckpt", _official(t), "--preset", "pMF-T/4", "--ema",
                                                 "2000", "--out", t / "o"], "--ema does not apply"),
    ("--official-ckpt of another preset", lambda t, c: ["--official-ckpt", _official(t), "--preset", "pMF-T/2",
                                                        "--out", t / "o"], "pass --preset pMF-T/4"),
    ("garbage --official-ckpt", lambda t, c: ["--official-ckpt", _file(t, "g.pt", b"\x00" * 999), "--preset",
                                              "pMF-T/4", "--out", t / "o"], "not a readable torch state dict"),
    ("our checkpoint as --official-ckpt", lambda t, c: ["--official-ckpt", c, "--preset", PRESET, "--out", t / "o"],
     "expected a state dict"),
]


@pytest.mark.parametrize("name, argv, message", BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_is_one_error_line_and_exit_2(name, argv, message, tmp_path, checkpoint, capsys):
    code, errors = run_cli([*argv(tmp_path, checkpoint), *COMMON], capsys)
    assert code == 2 and len(errors) == 1 and message in errors[0], (code, errors)
    assert not (tmp_path / "o" / "images").exists() or not os.listdir(tmp_path / "o" / "images")
    assert not (tmp_path / "payload-ran").exists()


def test_overwrite_deletes_the_earlier_samples_first(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(["--ckpt", checkpoint, "--out", out, *COMMON, "--num", "6", "--grid", "4"], capsys)[0] == 0
    assert run_cli(["--ckpt", checkpoint, "--out", out, *COMMON, "--num", "3"], capsys)[0] == 2     # refused
    assert len(os.listdir(out / "images")) == 6
    assert run_cli(["--ckpt", checkpoint, "--out", out, *COMMON, "--num", "3", "--overwrite"], capsys)[0] == 0
    assert sorted(os.listdir(out / "images")) == ["000000.png", "000001.png", "000002.png"]   # no stale 3..5
    assert not (out / "grid.png").exists()                                    # the old grid went too
    with np.load(out / "samples.npz") as data:
        assert data["arr_0"].shape[0] == 3


def test_foreign_images_are_refused_even_with_overwrite(checkpoint, tmp_path, capsys):
    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "images" / "holiday.jpg")
    code, errors = run_cli(["--ckpt", checkpoint, "--out", tmp_path, *COMMON, "--overwrite"], capsys)
    assert code == 2 and "holiday.jpg" in errors[0]
    assert os.listdir(tmp_path / "images") == ["holiday.jpg"]


def test_official_checkpoint_samples_equal_the_network_in_process(tmp_path, capsys):
    """Released layout -> load_official_checkpoint -> the CLI's images == the same network's one-step images."""
    model = _perturbed("pMF-T/4")
    torch.save(to_official_state_dict(model), tmp_path / "released.pt")
    out = tmp_path / "out"
    assert run_cli(["--official-ckpt", tmp_path / "released.pt", "--preset", "pMF-T/4", "--out", out, *COMMON,
                    "--format", "npz"], capsys)[0] == 0
    defaults = S.sampling_defaults("pMF-T/4")
    expected = torch.cat([images for _, _, images in S.iter_samples(
        model, torch.arange(4), omega=defaults["omega"], t_min=defaults["t_min"], t_max=defaults["t_max"], seed=0,
        batch_size=4, progress=False)])
    with np.load(out / "samples.npz") as data:
        np.testing.assert_array_equal(data["arr_0"], expected.permute(0, 2, 3, 1).numpy())
    assert expected.float().std() > 1                                          # not blank images
    info = json.loads((out / "sample_config.json").read_text())
    assert info["official_ckpt"] == str(tmp_path / "released.pt") and info["preset"] == "pMF-T/4"
    assert (info["omega"], info["t_min"], info["t_max"], info["ema"]) == (defaults["omega"], defaults["t_min"],
                                                                          defaults["t_max"], None)
    assert info["noise_scale"] == model.noise_scale


def _diverged_model():
    """The tiny model with its u-head output layer scaled by 1e6: finite outputs far outside [-1, 1]."""
    model = _tiny_model()
    with torch.no_grad():
        model.u_head.out.weight.mul_(1e6)
        model.u_head.out.bias.mul_(1e6)
    return model


def test_saturated_samples_are_refused_before_writing(tmp_path, capsys):
    """A diverged network's images are pure 0 / 255 pixels: full.sample stops with one line, no PNG written."""
    model = _diverged_model()
    images = _all_images(model, 4, 4)
    assert ((images == 0) | (images == 255)).double().mean() > S.SATURATED_FRACTION   # the premise
    state = {"model": model.state_dict(), "ema": {"2000": model.state_dict()},
             "config": {"model": {"preset": PRESET, "num_classes": NUM_CLASSES}}}
    save_checkpoint(tmp_path / "ckpt.pt", state)
    with pytest.raises(SystemExit) as exit_info:
        S.main(["--ckpt", str(tmp_path / "ckpt.pt"), "--num", "8", "--out", str(tmp_path / "out"), "--device", "cpu",
                "--no-progress"])
    error = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(error) == 1 and "are 0 or 255" in error[0], error
    assert not list((tmp_path / "out").glob("images/*.png"))
