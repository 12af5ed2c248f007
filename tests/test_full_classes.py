"""full.classes: a folder's class count without listing its images, equal to what ImageFolderDataset labels."""
from __future__ import annotations

import pytest

from full.classes import count_classes, folder_classes
from full.data import ImageFolderDataset


def test_folder_classes_match_the_dataset_labels(image_folder):
    dataset = ImageFolderDataset(image_folder, 8)
    assert folder_classes(image_folder) == dataset.classes == ["cat", "dog"]
    assert count_classes(image_folder) == dataset.num_classes == 2


def test_count_classes_counts_folders_not_files(tmp_path):
    for name in ("b", "a", "c"):
        (tmp_path / name).mkdir()
    (tmp_path / "notes.txt").write_text("not a class")
    assert folder_classes(tmp_path) == ["a", "b", "c"] and count_classes(tmp_path) == 3
    assert count_classes(tmp_path / "a") == 0


def test_missing_folder_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent"):
        count_classes(tmp_path / "absent")
