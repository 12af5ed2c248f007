"""The classes of an ImageFolder (``root/<class>/<image>``), without listing its images.

``full.data.ImageFolderDataset`` labels the sub-folders of ``root`` 0..K-1 in sorted name order
(torchvision's ImageFolder convention); :func:`folder_classes` applies the same rule to the folder
names alone, so ``full.train`` can default ``--num-classes`` to a folder's class count in
milliseconds, before reading a million images.

    folder_classes("/data/imagenet/train")[:2]   # ['n01440764', 'n01443537']
    count_classes("/data/imagenet/train")        # 1000
"""
from __future__ import annotations

import os
from pathlib import Path


def folder_classes(root: str | os.PathLike) -> list[str]:
    """The class names of an ImageFolder in label order: its sub-folders, sorted by name (hidden ones too,
    as ``ImageFolderDataset`` counts them).

    Raises:
        FileNotFoundError: ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {str(root)!r} does not exist (expected root/<class>/<image>)")
    return sorted(entry.name for entry in root.iterdir() if entry.is_dir())


def count_classes(root: str | os.PathLike) -> int:
    """K, the number of classes ``ImageFolderDataset(root, ...)`` labels (0..K-1); 0 for a folder without
    sub-folders."""
    return len(folder_classes(root))


__all__ = ["folder_classes", "count_classes"]
