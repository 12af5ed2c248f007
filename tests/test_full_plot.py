"""Training curves (full/plot.py): the panels, their data, resume duplicates, cut lines, CLI errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from full import plot as PL
from full.data import SyntheticDataset
from full.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")

BATCH = 8


def _records(steps: range) -> list[dict]:
    return [{"step": step, "images_seen": BATCH * step, "loss": 1.0, "raw_u": 100.0 / step, "raw_v": 50.0 / step,
             "grad_norm": 2.0 + step % 3, "images_per_s": 10.0} for step in steps]


def _write(path, records) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def test_running_geometric_mean_closed_forms():
    values = np.array([1.0, 4.0, 16.0, 64.0])
    assert np.allclose(PL.running_geometric_mean(values, 1), values)
    assert np.allclose(PL.running_geometric_mean(values, 2), [1.0, 2.0, 8.0, 32.0])
    assert np.allclose(PL.running_geometric_mean(values, 10), [1.0, 2.0, 4.0, 8.0])   # all points so far
    assert np.allclose(PL.running_geometric_mean(np.full(7, 3.0), 3), 3.0)


def test_later_record_of_a_step_wins_after_resume(tmp_path):
    first, resumed = _records(range(1, 7)), _records(range(4, 9))
    for record in resumed:
        record["raw_u"] = -1.0 if record["step"] == 5 else 7.0     # -1: not drawable on a log axis
    _write(tmp_path / PL.LOG_FILE, first + resumed)
    logs = PL.read_run(tmp_path)
    assert [record["step"] for record in logs.records] == list(range(1, 9))
    assert [record["raw_u"] for record in logs.records[3:]] == [7.0, -1.0, 7.0, 7.0, 7.0]
    x, y = PL._series(logs.records, "raw_u")
    assert len(x) == 7 and BATCH * 5 not in x                     # the non-positive value is left out


def test_cut_lines_are_skipped_and_counted(tmp_path):
    lines = [json.dumps(record) for record in _records(range(1, 4))]
    lines[1] = lines[1][:20] + lines[2]        # a write cut by a crash, then the resumed run's line...
    lines.append('{"step": 9, "raw')          # ... and a last line cut for good
    (tmp_path / PL.LOG_FILE).write_text("\n".join(lines))
    logs = PL.read_run(tmp_path)
    # Step 2's cut line is lost, step 3 is kept; the file's unfinished last line is skipped too.
    assert [record["step"] for record in logs.records] == [1, 3] and logs.skipped == 2


def test_figure_has_the_three_panels_with_the_logged_data(tmp_path):
    records = _records(range(1, 41))
    fid = [{"step": step, "images_seen": BATCH * step, "ema": ema, "fid": value, "is_mean": 1.0}
           for step, ema, value in ((20, "500", 80.0), (20, "raw", 90.0), (40, "500", 60.0), (40, "raw", 70.0))]
    _write(tmp_path / PL.LOG_FILE, records)
    _write(tmp_path / PL.FID_FILE, fid)
    figure = PL.make_figure(PL.read_run(tmp_path))
    loss_axis, grad_axis, fid_axis = figure.axes
    assert tuple(axis.get_title() for axis in figure.axes) == PL.PANEL_TITLES
    assert loss_axis.get_yscale() == grad_axis.get_yscale() == "log" and fid_axis.get_yscale() == "linear"
    images_seen = [record["images_seen"] for record in records]
    raw_u_lines = [line for line in loss_axis.get_lines() if np.allclose(line.get_ydata(), [r["raw_u"] for r in records])]
    assert raw_u_lines and np.array_equal(raw_u_lines[0].get_xdata(), images_seen)
    assert [text.get_text() for text in loss_axis.get_legend().get_texts()] == list(PL.LOSS_TERMS)
    fid_lines = {line.get_label(): line for line in fid_axis.get_lines()}
    assert set(fid_lines) == {"EMA 500", "raw"}
    assert np.array_equal(fid_lines["EMA 500"].get_xdata(), [BATCH * 20, BATCH * 40])
    assert np.array_equal(fid_lines["EMA 500"].get_ydata(), [80.0, 60.0])
    assert fid_axis.get_xlabel() == "images seen"


def test_plot_of_a_real_run_writes_one_png(tmp_path):
    cfg = TrainConfig(preset="pMF-T/2", num_classes=10, batch_size=BATCH, steps=3, perceptual="none",
                      out=str(tmp_path / "run"), ckpt_every=1000, log_every=1, ema_half_lives_kimg=(1.0,),
                      device="cpu", num_workers=0)
    train(cfg, SyntheticDataset(16, 16, num_classes=10, seed=1), progress=False)
    out = PL.plot_run(tmp_path / "run")
    assert out == tmp_path / "run" / PL.DEFAULT_OUT
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == (round(PL.FIGURE_SIZE[0] * PL.DPI), round(PL.FIGURE_SIZE[1] * PL.DPI))
        assert np.asarray(image.convert("L")).std() > 0
    # Without fid.jsonl the FID panel says how to get one.
    texts = [text.get_text() for text in PL.make_figure(PL.read_run(tmp_path / "run")).axes[2].texts]
    assert any("--fid-every" in text for text in texts)


@pytest.mark.parametrize("setup, argv_tail, message", [
    ("none", [], "is not a folder"),
    ("empty_dir", [], "log.jsonl"),
    ("empty_log", [], "no training record"),
    ("log", ["--out", "a_file"], "--out"),
])
def test_cli_bad_input_one_line_error(setup, argv_tail, message, tmp_path, capsys):
    run_dir = tmp_path / "run"
    if setup != "none":
        run_dir.mkdir()
    if setup == "empty_log":
        (run_dir / PL.LOG_FILE).write_text("")
    if setup == "log":
        _write(run_dir / PL.LOG_FILE, _records(range(1, 3)))
        (tmp_path / "a_file").write_text("not a folder")
        argv_tail = [str(tmp_path / "a_file") if arg == "a_file" else arg for arg in argv_tail]
    with pytest.raises(SystemExit) as exit_info:
        PL.main([str(run_dir), *argv_tail])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in error and "Traceback" not in error


def test_cli_writes_the_png(tmp_path, capsys):
    _write(tmp_path / PL.LOG_FILE, _records(range(1, 5)))
    PL.main([str(tmp_path), "--out", str(tmp_path / "figures")])
    assert (tmp_path / "figures" / PL.DEFAULT_OUT).is_file() and PL.DEFAULT_OUT in capsys.readouterr().out


def test_foreign_lines_are_skipped_and_string_numbers_left_out(tmp_path):
    records = _records(range(1, 5))
    records[1] = {key: value for key, value in records[1].items() if key != "images_seen"}   # no x value
    records[2] = {**records[2], "step": "3", "images_seen": "24"}                              # strings
    records[3] = {**records[3], "raw_u": "0.5", "grad_norm": True}                             # drawn values
    lines = [json.dumps(record).encode() for record in records] + [b'{"step": 5, "note": "\xff\xfe"}']
    (tmp_path / PL.LOG_FILE).write_bytes(b"\n".join(lines) + b"\n")
    logs = PL.read_run(tmp_path)
    assert [record["step"] for record in logs.records] == [1, 4] and logs.skipped == 3
    assert len(PL._series(logs.records, "raw_u")[0]) == 1 and len(PL._series(logs.records, "grad_norm")[0]) == 1


def _log_without_images_seen(run_dir):
    _write(run_dir / PL.LOG_FILE, [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}])


def _log_not_utf8(run_dir):
    (run_dir / PL.LOG_FILE).write_bytes(b'{"step": 1, "images_seen": 8, "loss": "\xe9t\xe9"}\n')


def _log_of_strings(run_dir):
    _write(run_dir / PL.LOG_FILE, [{"step": "1", "images_seen": "8", "raw_u": "0.5"}])


def _log_is_a_folder(run_dir):
    (run_dir / PL.LOG_FILE).mkdir()


@pytest.mark.parametrize("make_log", [_log_without_images_seen, _log_not_utf8, _log_of_strings, _log_is_a_folder])
def test_cli_unusable_log_is_one_line_exit_2(make_log, tmp_path, capsys):
    make_log(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        PL.main([str(tmp_path)])
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1 and "RUN_DIR" in error and PL.LOG_FILE in error, error
    assert not (tmp_path / PL.DEFAULT_OUT).exists()


def test_cli_full_disk_is_one_line_and_keeps_the_earlier_png(tmp_path, capsys, monkeypatch):
    import errno

    from full import io

    _write(tmp_path / PL.LOG_FILE, _records(range(1, 5)))
    (tmp_path / PL.DEFAULT_OUT).write_bytes(b"an earlier figure")

    def full_disk(figure, file, **kwargs):
        file.write(b"half a png")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PL, "save_figure", lambda figure, path, **kwargs: io.atomic_write(
        path, lambda file: full_disk(figure, file, **kwargs)))
    with pytest.raises(SystemExit) as exit_info:
        PL.main([str(tmp_path)])
    error = capsys.readouterr().err
    assert exit_info.value.code != 0 and error.count("\n") == 1 and "No space left on device" in error, error
    assert (tmp_path / PL.DEFAULT_OUT).read_bytes() == b"an earlier figure"
    assert sorted(path.name for path in tmp_path.iterdir()) == [PL.DEFAULT_OUT, PL.LOG_FILE]
