"""ImageNet-style data: ADM center crop, [-1, 1] scaling, class folders, global-batch sharding."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from full.data import GlobalBatchSampler, ImageFolderDataset, center_crop_arr, pil_to_tensor


def _random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def test_center_crop_arr_without_resize_is_the_central_slice():
    image = _random_image(40, 64)                              # short side already the target
    cropped = np.asarray(center_crop_arr(image, 40))
    np.testing.assert_array_equal(cropped, np.asarray(image)[:, 12:52])


def test_center_crop_arr_halving_is_block_mean():
    """256x512 -> 64: two box halvings (4x4 block means, each halving rounded), no bicubic change."""
    image = _random_image(256, 512, seed=1)
    cropped = np.asarray(center_crop_arr(image, 64)).astype(np.float64)
    blocks = np.asarray(image).astype(np.float64).reshape(64, 4, 128, 4, 3).mean(axis=(1, 3))
    # PIL box-reduces in 8-bit fixed point and rounds after each halving: at most 2 levels off.
    np.testing.assert_allclose(cropped, blocks[:, 32:96], atol=2.0)
    assert abs((cropped - blocks[:, 32:96]).mean()) < 1.5


@given(height=st.integers(8, 200), width=st.integers(8, 200), size=st.integers(4, 64))
def test_center_crop_arr_output_size(height, width, size):
    assert center_crop_arr(_random_image(height, width), size).size == (size, size)


def test_pixel_scaling_maps_0_255_to_minus1_1():
    image = Image.fromarray(np.array([[[0, 255, 51]]], dtype=np.uint8))
    x = pil_to_tensor(image)
    torch.testing.assert_close(x.flatten(), torch.tensor([-1.0, 1.0, 51 / 127.5 - 1]))


def test_image_folder_labels_sorted_and_range(tmp_path):
    for name, value in (("b_cat", 255), ("a_dog", 0)):
        (tmp_path / name).mkdir()
        for index in range(2):
            Image.fromarray(np.full((20, 30, 3), value, np.uint8)).save(tmp_path / name / f"{index}.png")
    (tmp_path / "a_dog" / "notes.txt").write_text("not an image")
    dataset = ImageFolderDataset(tmp_path, resolution=8)
    assert dataset.classes == ["a_dog", "b_cat"] and len(dataset) == 4
    x, y = dataset[0]
    assert x.shape == (3, 8, 8) and y == 0 and torch.all(x == -1.0)
    x, y = dataset[3]
    assert y == 1 and torch.all(x == 1.0)


def test_image_folder_missing_or_empty_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(tmp_path / "absent", resolution=8)
    (tmp_path / "class_a").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no images"):
        ImageFolderDataset(tmp_path, resolution=8)


@given(world_size=st.sampled_from([1, 2, 4]), batches=st.integers(1, 4), extra=st.integers(0, 7),
       seed=st.integers(0, 100), epoch=st.integers(0, 3))
def test_global_batch_sampler_ranks_partition_the_single_process_batch(world_size, batches, extra, seed, epoch):
    global_batch = 4 * world_size
    size = batches * global_batch + extra % global_batch      # an incomplete last batch
    single = list(GlobalBatchSampler(size, global_batch, seed=seed, epoch=epoch))
    shards = [list(GlobalBatchSampler(size, global_batch, rank=rank, world_size=world_size, seed=seed, epoch=epoch))
              for rank in range(world_size)]
    local = global_batch // world_size
    for batch in range(batches):
        joined = sum((shard[batch * local:(batch + 1) * local] for shard in shards), [])
        assert joined == single[batch * global_batch:(batch + 1) * global_batch]
    assert len(set(single)) == len(single) == batches * global_batch          # no repeats, last batch dropped
    resumed = list(GlobalBatchSampler(size, global_batch, seed=seed, epoch=epoch, start_batch=batches - 1))
    assert resumed == single[(batches - 1) * global_batch:]


def test_global_batch_sampler_rejects_bad_sizes():
    with pytest.raises(ValueError, match="divisible"):
        GlobalBatchSampler(100, 10, world_size=3)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        GlobalBatchSampler(5, 8)
