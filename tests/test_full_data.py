"""ImageNet-style data: ADM center crop, [-1, 1] scaling, image modes, class folders, global-batch sharding.

Oracles for the image modes: the same grey / colour values written as 8-bit RGB, and hand-computed
alpha composites over white.
"""
from __future__ import annotations

import io
import struct
import threading
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from full.data import (GlobalBatchSampler, ImageFolderDataset, SyntheticDataset, UnreadableImageError, center_crop_arr,
                       infinite_batches, open_rgb, pil_to_tensor, to_rgb)


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


# ----------------------------------------------------------------------------- image modes

GREY = np.array([[0, 51, 128], [200, 254, 255]], dtype=np.uint8)          # 8-bit grey levels, (2, 3)
COLOURS = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]], [[10, 20, 30], [255, 255, 255], [0, 0, 0]]],
                   dtype=np.uint8)                                         # (2, 3, 3)


def _reopened(image: Image.Image, format: str = "PNG", **options) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    buffer.seek(0)
    return Image.open(buffer)


def _png_rgb16(array16: np.ndarray) -> Image.Image:
    """A 16-bit RGB PNG written by hand (PIL cannot write one), reopened with PIL."""
    height, width, _ = array16.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    rows = b"".join(b"\x00" + array16[row].astype(">u2").tobytes() for row in range(height))
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return Image.open(io.BytesIO(data))


def _rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[:, :, None], 3, axis=2)


@pytest.mark.parametrize("mode", ["L", "1", "I;16 png", "I;16 tiff", "I", "F"])
def test_grey_images_of_every_bit_depth_read_on_one_scale(mode):
    grey = (GREY >= 128).astype(np.uint8) * 255 if mode == "1" else GREY
    image = {
        "L": lambda: _reopened(Image.fromarray(GREY)),
        "1": lambda: _reopened(Image.fromarray(GREY).convert("1", dither=Image.Dither.NONE)),
        "I;16 png": lambda: _reopened(Image.fromarray(GREY.astype(np.uint16) * 257)),   # 0..255 -> 0..65535
        "I;16 tiff": lambda: _reopened(Image.fromarray(GREY.astype(np.uint16) * 257), "TIFF"),
        "I": lambda: Image.fromarray(GREY.astype(np.int32) * 257),
        "F": lambda: Image.fromarray(GREY.astype(np.float32) / 255),
    }[mode]()
    assert image.mode == mode.split()[0]
    np.testing.assert_array_equal(np.asarray(to_rgb(image)), _rgb(grey))
    expected = torch.from_numpy(_rgb(grey).astype(np.float32) / 127.5 - 1).permute(2, 0, 1)
    torch.testing.assert_close(pil_to_tensor(image), expected)
    torch.testing.assert_close(pil_to_tensor(image, channels=1), expected[:1])


def test_sixteen_bit_png_is_not_read_as_white():
    """The bug this guards: ``convert("RGB")`` clips 16-bit values to 255 (a mid-grey 16-bit PNG became white)."""
    image = _reopened(Image.fromarray(np.full((4, 4), 32768, np.uint16)))
    assert np.asarray(image.convert("RGB")).min() == 255                  # PIL alone: white
    assert np.asarray(to_rgb(image)).max() == 128                         # 32768 / 257 = 127.5 -> 128


def test_sixteen_bit_rgb_png_keeps_its_colours():
    image = _png_rgb16(COLOURS.astype(np.uint16) * 257)
    np.testing.assert_array_equal(np.asarray(to_rgb(image)), COLOURS)


@pytest.mark.parametrize("transparent", [False, True])
def test_palette_images_read_through_their_palette(transparent):
    palette_image = Image.fromarray(COLOURS).quantize(colors=6, method=Image.Quantize.MEDIANCUT)
    options = {"transparency": int(np.asarray(palette_image)[0, 0])} if transparent else {}
    image = _reopened(palette_image, **options)
    assert image.mode == "P"
    expected = COLOURS.copy()
    if transparent:
        expected[np.asarray(image) == options["transparency"]] = 255       # transparent pixels show white
    np.testing.assert_array_equal(np.asarray(to_rgb(image)), expected)


def test_alpha_is_composited_over_white():
    alpha = np.array([[255, 0, 128], [255, 255, 0]], dtype=np.uint8)
    rgba = _reopened(Image.fromarray(np.concatenate([COLOURS, alpha[:, :, None]], axis=2)))
    a = alpha[:, :, None].astype(np.float64) / 255
    expected = COLOURS * a + 255 * (1 - a)
    assert np.abs(np.asarray(to_rgb(rgba)).astype(np.float64) - expected).max() <= 1      # 8-bit rounding
    grey_alpha = _reopened(Image.fromarray(np.stack([GREY, alpha], axis=2), mode="LA"))
    expected = _rgb(GREY) * a + 255 * (1 - a)
    assert np.abs(np.asarray(to_rgb(grey_alpha)).astype(np.float64) - expected).max() <= 1


def test_cmyk_and_rgb_convert_like_pil():
    rgb = Image.fromarray(COLOURS)
    np.testing.assert_array_equal(np.asarray(to_rgb(rgb)), COLOURS)
    cmyk = _reopened(rgb.convert("CMYK"), "JPEG", quality=100)
    assert cmyk.mode == "CMYK"
    np.testing.assert_array_equal(np.asarray(to_rgb(cmyk)), np.asarray(cmyk.convert("RGB")))


# ----------------------------------------------------------------------------- unreadable files, tiny data

def _folder_with_broken_files(root):
    (root / "a").mkdir()
    (root / "b").mkdir()
    Image.fromarray(np.full((12, 12, 3), 0, np.uint8)).save(root / "a" / "0.png")
    (root / "a" / "1.png").write_bytes(b"not an image at all")
    good = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(good, format="JPEG")
    (root / "a" / "2.jpg").write_bytes(good.getvalue()[:200])              # truncated mid-scan
    Image.fromarray(np.full((12, 12, 3), 255, np.uint8)).save(root / "b" / "0.png")


def test_unreadable_image_is_skipped_with_a_warning_naming_it(tmp_path):
    _folder_with_broken_files(tmp_path)
    dataset = ImageFolderDataset(tmp_path, resolution=8)
    assert len(dataset) == 4
    with pytest.warns(UserWarning) as warned:
        x, y = dataset[1]                                                  # 1.png, then 2.jpg, are unreadable
    assert y == 1 and torch.all(x == 1.0)                                  # the next readable image: b/0.png
    messages = [str(warning.message) for warning in warned]
    assert any("1.png" in message for message in messages) and any("2.jpg" in message for message in messages)
    with pytest.raises(UnreadableImageError, match="1.png"):
        open_rgb(tmp_path / "a" / "1.png")


def test_infinite_batches_refuses_data_smaller_than_a_batch_instead_of_hanging():
    result = []
    worker = threading.Thread(target=lambda: result.append(_first_batch_or_error()), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "infinite_batches spun without yielding"
    assert isinstance(result[0], ValueError) and "fewer than one global batch (8)" in str(result[0])


def _first_batch_or_error():
    try:
        return next(infinite_batches(SyntheticDataset(5, 8), 8, rank=0, world_size=1, seed=0, epoch=0, start_batch=0))
    except ValueError as error:
        return error
