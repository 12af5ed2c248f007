"""``python -m full.evaluate`` (and ``ref-stats``) under bad input: every malformed sample set, statistics
file or weights file is one error line naming it, exit 2; degenerate sample sets are refused, not scored.

Run with a randomly initialised Inception (``full.fid.save_random_inception_weights``) that never touches
the network; the planted pickle is shown to run under ``weights_only=False`` first.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from full import evaluate as E
from full import fid as F

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return F.save_random_inception_weights(tmp_path_factory.mktemp("inception") / "random.pth", seed=0)


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
