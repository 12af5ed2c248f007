"""``python -m full.digits`` under bad input: one error line, exit 2, before any training or classifier
work; a damaged cache is rebuilt rather than crashing the sweep."""
from __future__ import annotations

import pytest

from full.digits import main
from full.digits_data import TRAIN_SIZE, load_digits_split

BAD_INPUTS = [   # (name, argv builder (tmp), text of the one error line)
    ("batch larger than the data", lambda t: ["sampler", "--batch-size", "2000", "--out", t], "exceeds the 1297 training"),
    ("zero steps", lambda t: ["sampler", "--steps", "0", "--out", t], "--steps must be >= 1"),
    ("negative lr", lambda t: ["sampler", "--lr", "-1", "--out", t], "--lr must be > 0"),
    ("one sample per class", lambda t: ["guidance", "--per-class", "1", "--out", t], "--per-class must be >= 2"),
    ("unknown experiment", lambda t: ["nope", "--out", t], "invalid choice"),
    ("--out under a file", lambda t: ["sampler", "--out", _file(t) / "runs"], "is a file, not a folder"),
]


def _file(tmp_path):
    (tmp_path / "a_file").write_text("x")
    return tmp_path / "a_file"


@pytest.mark.parametrize("name, argv, message", BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_is_one_error_line_and_exit_2(name, argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main([str(arg) for arg in argv(tmp_path)])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert stop.value.code == 2 and len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "runs").exists() and not (tmp_path / "digits_classifier.pt").exists()


def test_train_size_is_the_training_split():
    assert TRAIN_SIZE == len(load_digits_split().y_train) == 1297


def test_damaged_classifier_cache_is_rebuilt(tmp_path, monkeypatch, capsys):
    from full import digits_classifier as D

    (tmp_path / D.CACHE_NAME).write_bytes(b"half a file")
    trained = []
    monkeypatch.setattr(D, "train_classifier", lambda x, y: trained.append(1) or D.DigitsClassifier().eval())
    D.load_or_train_classifier(tmp_path)
    assert trained == [1] and "rebuilding the digits classifier cache" in capsys.readouterr().out
    D.load_or_train_classifier(tmp_path)                  # the rebuilt cache is read back, not retrained
    assert trained == [1]
