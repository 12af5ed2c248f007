"""FID / IS of a sample set and reference statistics (full/evaluate.py), run with a randomly initialised
Inception (``tests/random_inception.py``) that never touches the network: FID = 0 between an
image set and the reference statistics of the same images, one error line (exit 2) for every malformed
sample set, statistics file or weights file, degenerate sample sets refused rather than scored; a planted
pickle is shown to run under ``weights_only=False`` before it is shown refused.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from full import evaluate as E
from full import fid as F
from full.data import center_crop_arr


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- Fréchet distance


# ---------------------------------------------------------------------------- Inception Score


# ---------------------------------------------------------------------------- Inception weights


def test_evaluate_cli_missing_weights_names_file_and_folder(no_network, tmp_path, capsys):
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    F.save_statistics(tmp_path / "ref.npz", np.zeros(2048), np.eye(2048))
    with pytest.raises(SystemExit) as exit_info:
        E.main(["--samples", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"), "--is-splits", "2"])
    assert F.INCEPTION_WEIGHTS_FILENAME in str(exit_info.value) and str(no_network) in str(exit_info.value)


@pytest.mark.parametrize("flags, message", [
    (["--samples", "{tmp}/missing.npz"], "--samples"),
    (["--is-splits", "5"], "--is-splits must lie in [1, number of samples = 4]"),
    (["--batch-size", "0"], "--batch-size must be"),
    (["--ref", "{tmp}/missing.npz"], "ref-stats"),
])
def test_evaluate_cli_rejects_bad_arguments(tmp_path, capsys, flags, message, random_weights):
    np.savez(tmp_path / "samples.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    F.save_statistics(tmp_path / "ref.npz", np.zeros(2048), np.eye(2048))
    argv = ["--samples", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"), "--is-splits", "2",
            "--inception-weights", str(random_weights)]
    with pytest.raises(SystemExit):
        E.main(argv + [flag.format(tmp=tmp_path) for flag in flags])   # argparse keeps the last value
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------- plumbing with a random Inception


def _crops(root, resolution):
    files = sorted(path for folder in sorted(root.iterdir()) for path in folder.iterdir())
    return np.stack([np.asarray(center_crop_arr(Image.open(path).convert("RGB"), resolution)) for path in files])


def test_ref_stats_then_evaluate_gives_zero_fid_on_the_same_images(image_folder, random_weights, tmp_path, capsys):
    common = ["--inception-weights", str(random_weights), "--batch-size", "4", "--device", "cpu", "--no-progress"]
    E.main(["ref-stats", "--data", str(image_folder), "--resolution", "16", "--out", str(tmp_path),
            "--num-workers", "0", *common])
    (tmp_path / E.REF_STATS_NAME).rename(tmp_path / "ref.npz")
    crops = _crops(image_folder, 16)                      # the trainer's center crop, folder order
    np.savez(tmp_path / "samples.npz", arr_0=crops)
    (tmp_path / "pngs").mkdir()
    for i, crop in enumerate(crops):
        Image.fromarray(crop).save(tmp_path / "pngs" / f"{i:06d}.png")
    np.savez(tmp_path / "other.npz", arr_0=np.ascontiguousarray(crops[:, ::-1]))   # flipped images
    results = {}
    for name in ("samples.npz", "pngs", "other.npz"):
        E.main(["--samples", str(tmp_path / name), "--ref", str(tmp_path / "ref.npz"), "--is-splits", "2",
                "--out", str(tmp_path / f"{name}.out"), *common])
        results[name] = json.loads((tmp_path / f"{name}.out" / E.METRICS_NAME).read_text())
    assert "FID" in capsys.readouterr().out
    E.main(["--samples", str(tmp_path / "pngs"), "--ref", str(tmp_path / "ref.npz"), "--is-splits", "2", "--json",
            *common])
    assert json.loads(capsys.readouterr().out)["fid"] == results["pngs"]["fid"]   # --json: stdout is the record
    with np.load(tmp_path / "ref.npz") as ref:
        scale = float(np.trace(ref["sigma"]))
        assert int(ref["num"]) == 6 and ref["mu"].shape == (2048,)
    assert abs(results["samples.npz"]["fid"]) < 1e-7 * scale
    assert results["pngs"]["fid"] == pytest.approx(results["samples.npz"]["fid"], abs=1e-9 * scale)
    assert results["pngs"]["is_mean"] == pytest.approx(results["samples.npz"]["is_mean"], rel=1e-9)
    assert results["other.npz"]["fid"] > 1e-3 * scale      # a different image set is far from zero (~1e-2)
    assert results["samples.npz"]["num"] == 6


@pytest.fixture(scope="module")
def weights(random_weights):
    return random_weights


@pytest.fixture
def files(tmp_path):
    """A valid samples.npz and ref.npz; each case below breaks one thing."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "samples.npz", arr_0=rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))
    F.save_statistics(tmp_path / "ref.npz", np.zeros(2048), np.eye(2048))
    return tmp_path


def run_cli(argv, capsys) -> tuple[int, list[str]]:
    try:
        E.main([str(arg) for arg in argv])
        code = 0
    except SystemExit as stop:
        code = stop.code
    return code, [line for line in capsys.readouterr().err.splitlines() if "error:" in line]


def _write(path, content: bytes):
    path.write_bytes(content)
    return path


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def _folder(path, images: dict):
    path.mkdir()
    for name, content in images.items():
        if isinstance(content, bytes):
            (path / name).write_bytes(content)
        else:
            Image.fromarray(content).save(path / name)
    return path


def _planted(tmp_path):
    from test_full_checkpoint import plant_pickle   # the payload's helper lives with the checkpoint tests
    plant_pickle(tmp_path / "pickle.pth", tmp_path / "payload-ran")
    return tmp_path / "pickle.pth"


RANDOM = np.random.default_rng(1).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
SAME = np.repeat(RANDOM[:1], 4, axis=0)

BAD_SAMPLES = [   # (name, samples builder (tmp), text of the one error line)
    ("npz without arr_0", lambda t: _npz(t / "s.npz", images=RANDOM), "has no 'arr_0'"),
    ("garbage npz", lambda t: _write(t / "s.npz", b"PK\x03\x04 not really a zip" * 20), "not a readable .npz"),
    ("truncated npz", lambda t: _write(t / "s.npz", (t / "samples.npz").read_bytes()[:300]), "not a readable .npz"),
    ("float images", lambda t: _npz(t / "s.npz", arr_0=RANDOM.astype(np.float32)), "arr_0 must be uint8"),
    ("pickled object array", lambda t: _npz(t / "s.npz", arr_0=np.array([{"a": 1}] * 3, dtype=object)),
     "arr_0 is unreadable"),
    ("constant npz", lambda t: _npz(t / "s.npz", arr_0=SAME), "every image is identical"),
    ("all-black npz", lambda t: _npz(t / "s.npz", arr_0=np.zeros((5, 8, 8, 3), np.uint8)), "every image is identical"),
    ("one image", lambda t: _npz(t / "s.npz", arr_0=RANDOM[:1]), "FID needs at least 2"),
    ("corrupt image in folder", lambda t: _folder(t / "imgs", {"0.png": RANDOM[0], "1.png": b"\x89PNG broken",
                                                              "2.png": RANDOM[2]}), "cannot read image"),
    ("mixed sizes in folder", lambda t: _folder(t / "imgs", {"0.png": RANDOM[0], "1.png": np.zeros((9, 8, 3), np.uint8),
                                                            "2.png": RANDOM[2]}), "a sample set has one size"),
    ("constant folder", lambda t: _folder(t / "imgs", {f"{i}.png": RANDOM[0] for i in range(3)}),
     "every image is identical"),
    ("folder without images", lambda t: _folder(t / "imgs", {"notes.txt": b"hello"}), "holds no image files"),
]


@pytest.mark.parametrize("name, samples, message", BAD_SAMPLES, ids=[row[0] for row in BAD_SAMPLES])
def test_bad_sample_set_is_one_error_line_and_exit_2(name, samples, message, files, weights, capsys):
    argv = ["--samples", samples(files), "--ref", files / "ref.npz", "--is-splits", "1", "--inception-weights",
            weights, "--device", "cpu", "--no-progress"]
    code, errors = run_cli(argv, capsys)
    assert code == 2 and len(errors) == 1 and message in errors[0], (code, errors)


def _ref(tmp, **arrays):
    return _npz(tmp / "r.npz", **arrays)


BAD_OTHER = [   # (name, extra flags builder (tmp, weights), text of the one error line)
    ("garbage --ref", lambda t, w: ["--ref", _write(t / "r.npz", b"garbage" * 50)], "not a readable .npz"),
    ("--ref without sigma", lambda t, w: ["--ref", _ref(t, mu=np.zeros(2048))], "lacks ['sigma']"),
    ("--ref with NaN", lambda t, w: ["--ref", _ref(t, mu=np.full(4, np.nan), sigma=np.eye(4))], "NaN or inf"),
    ("--ref of wrong shape", lambda t, w: ["--ref", _ref(t, mu=np.zeros(4), sigma=np.eye(3))], "expected mu (D,)"),
    ("empty --inception-weights", lambda t, w: ["--inception-weights", _write(t / "w.pth", b"")], "is empty"),
    ("garbage --inception-weights", lambda t, w: ["--inception-weights", _write(t / "w.pth", b"\x80\x02}q" * 99)],
     "--inception-weights"),
    ("foreign --inception-weights", lambda t, w: ["--inception-weights", _torch_file(t / "w.pth", {"a": torch.ones(2)})],
     "does not fit torch-fidelity's Inception-v3"),
    ("pickle in --inception-weights", lambda t, w: ["--inception-weights", _planted(t)], "refused: it holds Python"),
    ("--out under a file", lambda t, w: ["--out", _write(t / "f", b"x") / "metrics"], "is a file, not a folder"),
    ("--out is a file", lambda t, w: ["--out", _write(t / "f2", b"x")], "is a file, not a folder"),
    ("--device of another kind", lambda t, w: ["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
]


def _torch_file(path, obj):
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("name, flags, message", BAD_OTHER, ids=[row[0] for row in BAD_OTHER])
def test_bad_reference_weights_or_output_is_one_error_line_and_exit_2(name, flags, message, files, weights, capsys):
    argv = ["--samples", files / "samples.npz", "--ref", files / "ref.npz", "--is-splits", "1",
            "--inception-weights", weights, "--device", "cpu", "--no-progress", *flags(files, weights)]
    code, errors = run_cli(argv, capsys)
    assert code == 2 and len(errors) == 1 and message in errors[0], (code, errors)
    assert not (files / "payload-ran").exists()


def test_ref_stats_checks_its_output_before_reading_images(files, weights, capsys):
    _folder(files / "data", {})
    (files / "data" / "c").mkdir()
    Image.fromarray(RANDOM[0]).save(files / "data" / "c" / "0.png")
    (files / "f").write_text("x")
    code, errors = run_cli(["ref-stats", "--data", files / "data", "--resolution", "8", "--out", files / "f" / "ref",
                            "--inception-weights", weights, "--no-progress"], capsys)
    assert code == 2 and len(errors) == 1 and "is a file, not a folder" in errors[0]


def test_ref_stats_skips_an_unreadable_image_with_a_warning(files, weights, capsys):
    _folder(files / "data", {})
    (files / "data" / "c").mkdir()
    for i in range(3):
        Image.fromarray(RANDOM[i]).save(files / "data" / "c" / f"{i}.png")
    (files / "data" / "c" / "3.png").write_bytes(b"broken")
    with pytest.warns(UserWarning, match="3.png"):
        E.main(["ref-stats", "--data", str(files / "data"), "--resolution", "8", "--out", str(files / "ref8"),
                "--inception-weights", str(weights), "--num-workers", "0", "--no-progress", "--device", "cpu"])
    with np.load(files / "ref8" / E.REF_STATS_NAME) as ref:
        assert int(ref["num"]) == 4 and np.all(np.isfinite(ref["sigma"]))   # 4 items: 3.png's slot reads 0.png


# ---------------------------------------------------------------------------- issue 24/25: evaluation habits

def _common(weights):
    return ["--inception-weights", str(weights), "--device", "cpu", "--no-progress", "--batch-size", "8"]


def test_one_sample_says_fid_needs_two_whatever_is_splits(files, weights, capsys):
    _npz(files / "one.npz", arr_0=RANDOM[:1])
    code, errors = run_cli(["--samples", files / "one.npz", "--ref", files / "ref.npz", *_common(weights)], capsys)
    assert code == 2 and len(errors) == 1 and "FID needs at least 2 samples" in errors[0], errors


def test_reference_of_another_dimension_is_refused_before_the_inception(files, capsys):
    np.savez(files / "r64.npz", mu=np.zeros(64), sigma=np.eye(64))
    garbage = _write(files / "garbage.pth", b"not read: the reference is refused first")
    code, errors = run_cli(["--samples", files / "samples.npz", "--ref", files / "r64.npz", "--inception-weights",
                            garbage, "--device", "cpu"], capsys)
    assert code == 2 and len(errors) == 1 and "--ref" in errors[0] and "64-d features" in errors[0], errors


@pytest.mark.parametrize("ref", ["ours", "adm"])
def test_samples_of_another_resolution_are_refused(files, weights, capsys, ref):
    """8 px samples against 16 px reference statistics: ours record ``resolution``, ADM batches have ``arr_0``."""
    extra = ({"resolution": np.array(16)} if ref == "ours" else
             {"arr_0": np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)})
    np.savez(files / "r16.npz", mu=np.zeros(2048), sigma=np.eye(2048), **extra)
    code, errors = run_cli(["--samples", files / "samples.npz", "--ref", files / "r16.npz", *_common(weights)], capsys)
    assert code == 2 and len(errors) == 1 and "8x8 px" in errors[0] and "16x16 px" in errors[0], errors


def test_saturated_sample_set_is_refused(files, weights, capsys):
    """Pure 0 / 255 pixels (a diverged network's clipped outputs), every image different: refused, not scored."""
    pixels = np.random.default_rng(0).integers(0, 2, (6, 8, 8, 3), dtype=np.uint8) * 255
    _npz(files / "saturated.npz", arr_0=pixels)
    code, errors = run_cli(["--samples", files / "saturated.npz", "--ref", files / "ref.npz", "--is-splits", "1",
                            *_common(weights)], capsys)
    assert code == 2 and len(errors) == 1 and "saturated" in errors[0] and "100.0%" in errors[0], errors


def test_saturated_fraction_of_real_looking_images_is_far_below_the_limit():
    """Digits-like images (black background, bright strokes, bilinear edges) stay below the limit."""
    from full.digits.data import DigitsDataset

    images = torch.stack([DigitsDataset(32)[i][0] for i in range(50)])               # [-1, 1], 1 channel
    uint8 = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    assert E.saturated_fraction(uint8) < E.SATURATED_FRACTION - 0.05


def test_metrics_json_has_pr_kid_and_names_the_reference(image_folder, weights, tmp_path, capsys):
    """ref-stats keeps features: precision = recall = 1 for the reference images themselves; an ADM-style
    batch (arr_0) gives the same; JiT's layout (mu, sigma only) gives nulls and a note; the authors' JAX
    layout (ref_mu, ref_sigma) gives the same FID as ours."""
    E.main(["ref-stats", "--data", str(image_folder), "--resolution", "16", "--out", str(tmp_path),
            "--num-workers", "0", *_common(weights)])
    crops = _crops(image_folder, 16)
    np.savez(tmp_path / "samples.npz", arr_0=crops)
    with np.load(tmp_path / E.REF_STATS_NAME) as ours:
        mu, sigma = ours["mu"], ours["sigma"]
        assert ours["features"].shape == (6, 2048) and ours["features"].dtype == np.float32
    np.savez(tmp_path / "adm.npz", mu=mu, sigma=sigma, arr_0=crops)
    np.savez(tmp_path / "jit.npz", mu=mu, sigma=sigma)
    np.savez(tmp_path / "jax.npz", ref_mu=mu, ref_sigma=sigma)
    records = {}
    for name in (E.REF_STATS_NAME, "adm.npz", "jit.npz", "jax.npz"):
        out = tmp_path / f"out-{name}"
        E.main(["--samples", str(tmp_path / "samples.npz"), "--ref", str(tmp_path / name), "--is-splits", "2",
                "--out", str(out), *_common(weights)])
        records[name] = json.loads((out / E.METRICS_NAME).read_text())
        records[name]["stderr"] = capsys.readouterr().err
    for name in (E.REF_STATS_NAME, "adm.npz"):
        assert records[name]["precision"] == records[name]["recall"] == 1.0
        assert records[name]["kid_mean"] is not None and abs(records[name]["kid_mean"]) < 1e-2
    assert records[E.REF_STATS_NAME]["reference"] == {"path": str(tmp_path / E.REF_STATS_NAME), "keys": ["mu", "sigma"],
                                                      "resolution": 16, "num": 6, "pr_kid_from": "features"}
    assert records["adm.npz"]["reference"]["pr_kid_from"] == "arr_0 images"
    assert records["jit.npz"]["precision"] is None and records["jit.npz"]["kid_mean"] is None
    assert "mu and sigma only" in records["jit.npz"]["stderr"]
    assert records["jax.npz"]["reference"]["keys"] == ["ref_mu", "ref_sigma"]
    assert records["jax.npz"]["fid"] == records["jit.npz"]["fid"] == pytest.approx(records["adm.npz"]["fid"])
    assert "biased upwards below 10,000 samples" in records["jit.npz"]["stderr"]


def test_ref_stats_refuses_to_replace_its_output_without_overwrite(files, weights, capsys):
    _folder(files / "data", {})
    (files / "data" / "c").mkdir()
    for i in range(3):
        Image.fromarray(RANDOM[i]).save(files / "data" / "c" / f"{i}.png")
    (files / "refs").mkdir()
    (files / "refs" / E.REF_STATS_NAME).write_bytes(b"an earlier result")
    argv = ["ref-stats", "--data", files / "data", "--resolution", "8", "--out", files / "refs", "--num-workers", "0",
            *_common(weights)]
    code, errors = run_cli(argv, capsys)
    assert code == 2 and len(errors) == 1 and "--overwrite" in errors[0], errors
    assert (files / "refs" / E.REF_STATS_NAME).read_bytes() == b"an earlier result"
    assert run_cli([*argv, "--overwrite"], capsys)[0] == 0
    with np.load(files / "refs" / E.REF_STATS_NAME) as ref:
        assert int(ref["num"]) == 3
