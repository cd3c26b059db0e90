"""Tests for brainscan.preprocess.image2d: decoding by content, bad input, head crop, config."""

from __future__ import annotations

import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from brainscan.errors import (
    BadDimensionsError,
    CorruptFileError,
    EmptyInputError,
    InputTooLargeError,
    NonFiniteError,
    UnsupportedFormatError,
)
from brainscan.preprocess.image2d import (
    GREY_STRIP_PIXELS,
    HEAD_SEARCH_SIDE,
    ImagePreprocessConfig,
    crop_to_head,
    decode_image,
    preprocess_batch,
    preprocess_image,
    sniff_format,
    to_grey_uint8,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


def head_slice(height: int = 120, width: int = 160, seed: int = 0) -> np.ndarray:
    """A synthetic axial slice: textured bright ellipse (head) on a black background."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width), np.uint8)
    centre = (width // 2, height // 2)
    cv2.ellipse(image, centre, (width // 3, height // 3), 0, 0, 360, 180, -1)
    cv2.ellipse(image, (centre[0] - 8, centre[1]), (width // 10, height // 8), 0, 0, 360, 90, -1)
    texture = rng.integers(0, 40, image.shape).astype(np.int16)
    return np.clip(image + texture * (image > 0), 0, 255).astype(np.uint8)


def encode(image: np.ndarray, ext: str, params: tuple[int, ...] = ()) -> bytes:
    ok, buffer = cv2.imencode(ext, image, list(params))
    assert ok, ext
    return buffer.tobytes()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int, bit_depth: int = 8, colour_type: int = 0) -> bytes:
    """A small well-formed PNG whose header claims ``width`` x ``height``: a decompression bomb."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1000)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(
        b"IEND", b""
    )


def jpeg_claiming(width: int, height: int) -> bytes:
    """A real JPEG whose frame header was patched to claim another size."""
    raw = bytearray(encode(head_slice(), ".jpg"))
    sof = raw.find(b"\xff\xc0")
    raw[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(raw)


GREY = head_slice()
RGB = np.dstack([GREY, GREY // 2, 255 - GREY])  # numpy RGB order
BGR = RGB[:, :, ::-1].copy()
# Independent reference: ITU-R 601 luma of the RGB image.
RGB_AS_GREY = np.rint(0.299 * RGB[..., 0] + 0.587 * RGB[..., 1] + 0.114 * RGB[..., 2])
ALPHA = np.zeros(GREY.shape, np.uint8)
ALPHA[:, : GREY.shape[1] // 2] = 255
GREY16 = (1000 + GREY.astype(np.uint16) * 16).astype(np.uint16)
# 16-bit values are rescaled by their own range: the same as stretching GREY to 0..255.
GREY16_AS_GREY = np.rint((GREY - float(GREY.min())) * 255 / float(GREY.max() - GREY.min()))


@pytest.mark.parametrize(
    "raw, expected, max_error, mean_error",
    [
        (encode(GREY, ".png"), GREY, 0, 0),
        (encode(BGR, ".png"), RGB_AS_GREY, 1, 1),
        (encode(np.dstack([BGR, ALPHA]), ".png"), RGB_AS_GREY * (ALPHA > 0), 1, 1),
        (encode(GREY16, ".png"), GREY16_AS_GREY, 1, 1),
        (encode(GREY, ".bmp"), GREY, 0, 0),
        (encode(GREY, ".tiff"), GREY, 0, 0),
        (encode(GREY, ".webp", (cv2.IMWRITE_WEBP_QUALITY, 101)), GREY, 1, 1),  # 101 = lossless
        (encode(GREY, ".jpg", (cv2.IMWRITE_JPEG_QUALITY, 100)), GREY, 8, 1),  # lossy
        (encode(BGR, ".jpg", (cv2.IMWRITE_JPEG_QUALITY, 100)), RGB_AS_GREY, 8, 1),
    ],
    ids=["png-grey", "png-rgb", "png-rgba", "png-16bit", "bmp", "tiff", "webp", "jpeg", "jpeg-rgb"],
)
def test_decode_image_formats(
    raw: bytes, expected: np.ndarray, max_error: int, mean_error: float
) -> None:
    grey = decode_image(raw)
    assert grey.dtype == np.uint8 and grey.shape == GREY.shape
    error = np.abs(grey.astype(np.int32) - expected.astype(np.int32))
    assert error.max() <= max_error and error.mean() <= mean_error


@pytest.mark.parametrize(
    "file_name, ext",
    [("scan.jpg", ".png"), ("scan.png", ".jpg"), ("scan.txt", ".png"), ("scan", ".jpg")],
)
def test_decode_image_ignores_extension(tmp_path: Path, file_name: str, ext: str) -> None:
    path = tmp_path / file_name
    path.write_bytes(encode(GREY, ext))
    assert sniff_format(path.read_bytes()) == ("png" if ext == ".png" else "jpeg")
    assert decode_image(path.read_bytes(), name=file_name).shape == GREY.shape


JPEG = encode(GREY, ".jpg")
PNG = encode(GREY, ".png")
PNG_1200x900 = encode(np.zeros((1200, 900), np.uint8), ".png")


@pytest.mark.parametrize(
    "raw, kwargs, error",
    [
        (b"", {}, EmptyInputError),
        (b"patient,grade\n1,IV\n", {}, UnsupportedFormatError),
        (b"\x00" + np.random.default_rng(0).bytes(4000), {}, UnsupportedFormatError),
        (b"DICM" + bytes(200), {}, UnsupportedFormatError),
        (JPEG[: len(JPEG) * 2 // 3], {}, CorruptFileError),
        (JPEG[:-2], {}, CorruptFileError),  # only the end-of-image marker is missing
        (JPEG[:40], {}, CorruptFileError),  # cut inside the headers
        (PNG[: len(PNG) // 2], {}, CorruptFileError),
        (PNG[:-12], {}, CorruptFileError),  # no IEND chunk
        (b"\x89PNG\r\n\x1a\n" + bytes(40), {}, CorruptFileError),
        (png_claiming(30000, 30000), {}, InputTooLargeError),
        (jpeg_claiming(30000, 30000), {}, InputTooLargeError),
        (PNG_1200x900, {"max_pixels": 10**6}, InputTooLargeError),
        (PNG, {"max_bytes": len(PNG) - 1}, InputTooLargeError),
        (encode(np.zeros((10, 100), np.uint8), ".png"), {}, BadDimensionsError),
        (encode(np.zeros((20, 300), np.uint8), ".png"), {}, BadDimensionsError),
        (encode(np.zeros((500, 40), np.uint8), ".jpg"), {}, BadDimensionsError),
        (png_claiming(0, 64), {}, BadDimensionsError),
        # under the pixel cap, over the decoding budget: 4400 x 4400 x 8 bytes (16-bit RGBA)
        (png_claiming(4400, 4400, bit_depth=16, colour_type=6), {}, InputTooLargeError),
        (png_claiming(5000, 5000), {"max_decoded_bytes": 5000 * 5000 - 1}, InputTooLargeError),
    ],
    ids=[
        "empty", "text", "random-bytes", "dicom", "jpeg-truncated", "jpeg-no-eoi", "jpeg-headers",
        "png-truncated", "png-no-iend", "png-garbage", "png-bomb", "jpeg-bomb", "over-max-pixels",
        "over-max-bytes", "tiny-side", "aspect-15", "aspect-12.5", "zero-width", "png-16bit-rgba-budget",
        "over-max-decoded-bytes",
    ],
)
def test_decode_image_rejects(raw: bytes, kwargs: dict, error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        decode_image(raw, name="upload.jpg", **kwargs)
    assert info.type is error  # not merely a parent class
    assert "upload.jpg" in str(info.value) or error is EmptyInputError


@pytest.mark.parametrize(
    "raw, bytes_per_pixel",
    [
        (encode(GREY, ".png"), 1),
        (encode(BGR, ".png"), 3),
        (encode(np.dstack([BGR, ALPHA]), ".png"), 4),
        (encode(GREY16, ".png"), 2),
        (encode(np.dstack([GREY16] * 3 + [GREY16]), ".png"), 8),
        (encode(GREY, ".jpg"), 1),
        (encode(BGR, ".jpg"), 3),
        (encode(BGR, ".bmp"), 3),
        (encode(GREY16, ".tiff"), 2),
        (encode(BGR, ".tiff"), 3),
        (encode(GREY, ".webp", (cv2.IMWRITE_WEBP_QUALITY, 101)), 4),  # may hold alpha: counted as BGRA
    ],
    ids=["png-grey", "png-rgb", "png-rgba", "png-16bit", "png-16bit-rgba", "jpeg-grey", "jpeg-rgb", "bmp",
         "tiff-16bit", "tiff-rgb", "webp-lossless"],
)
def test_decoding_budget_counts_channels_and_depth(raw: bytes, bytes_per_pixel: int) -> None:
    budget = GREY.size * bytes_per_pixel
    assert decode_image(raw, max_decoded_bytes=budget).shape == GREY.shape  # exactly at the budget
    with pytest.raises(InputTooLargeError, match=f"with {bytes_per_pixel} bytes per pixel") as info:
        decode_image(raw, name="scan", max_decoded_bytes=budget - 1)
    assert "decoding limit" in str(info.value) and "8-bit greyscale or downscale" in str(info.value)


@pytest.mark.parametrize("alpha", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_colour_to_grey_in_strips_matches_the_reference(alpha: bool, dtype: type) -> None:
    repeats = 2 * GREY_STRIP_PIXELS // GREY.size + 2  # three strips, each cut mid-pattern
    scale = 257 if dtype == np.uint16 else 1
    colour = np.tile(RGB, (repeats, 1, 1)).astype(dtype) * scale
    luma = np.tile(0.299 * RGB[..., 0] + 0.587 * RGB[..., 1] + 0.114 * RGB[..., 2], (repeats, 1))
    if alpha:
        opacity = np.tile(ALPHA, (repeats, 1)).astype(dtype) * scale
        colour, luma = np.dstack([colour, opacity]), luma * (opacity > 0)
    if dtype == np.uint16:  # a 16-bit luma is stretched by its own range
        luma = (luma - luma.min()) * 255 / (luma.max() - luma.min())
    assert colour.shape[0] * colour.shape[1] > 2 * GREY_STRIP_PIXELS
    grey = to_grey_uint8(colour, bgr=False)
    error = np.abs(grey.astype(np.float64) - np.rint(luma))
    assert grey.shape == luma.shape and error.max() <= 1


@pytest.mark.parametrize(
    "height, width, centre, axes, letter",
    [
        (300, 500, (250, 150), (80, 60), True),  # wide black border left and right
        (400, 260, (130, 220), (70, 110), True),  # tall image, head off centre
        (256, 256, (128, 128), (126, 126), False),  # head fills the image
        (2400, 3300, (1500, 1100), (700, 900), True),  # searched on a shrunk copy
    ],
)
def test_crop_to_head_finds_ellipse(
    height: int, width: int, centre: tuple, axes: tuple, letter: bool
) -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 12, (height, width)).astype(np.uint8)  # dark noisy background
    cv2.ellipse(image, centre, axes, 0, 0, 360, 200, -1)
    if letter:  # a burnt-in orientation letter must not widen the crop
        cv2.putText(image, "R", (2, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, 255, 1)
    crop = crop_to_head(image)
    expected_side = 2 * max(axes) + 1
    assert crop.shape[0] == crop.shape[1] and crop.dtype == image.dtype
    assert expected_side <= crop.shape[0] <= expected_side * 1.12
    assert (crop == 200).sum() == (image == 200).sum()  # the whole head is kept
    assert not (crop == 255).any()


def test_crop_to_head_of_a_huge_image_takes_well_under_a_second() -> None:
    side = 7000  # searching the head at full resolution took 25-33 s here
    image = np.zeros((side, side), np.uint8)
    cv2.circle(image, (3000, 3600), 2500, 180, -1)
    assert side > 2 * HEAD_SEARCH_SIDE
    started = time.perf_counter()
    crop = crop_to_head(image)
    elapsed = time.perf_counter() - started
    assert 5001 <= crop.shape[0] == crop.shape[1] <= 5001 * 1.12
    assert (crop == 180).sum() == (image == 180).sum()
    assert elapsed < 5.0  # about 0.1 s measured; generous for a busy machine


@pytest.mark.parametrize("image", [np.zeros((64, 80), np.uint8), np.full((50, 50), 90, np.uint16)])
def test_crop_to_head_falls_back_to_full_image(image: np.ndarray) -> None:
    assert np.array_equal(crop_to_head(image), image)


@pytest.mark.parametrize("kwargs", [{"threshold": 0.0}, {"threshold": 1.5}, {"margin": -0.1}])
def test_crop_to_head_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=str(next(iter(kwargs.values())))):
        crop_to_head(GREY, **kwargs)


@pytest.mark.parametrize(
    "config",
    [
        ImagePreprocessConfig(),
        ImagePreprocessConfig(64, 1, False, normalization="zscore"),
    ],
)
def test_config_round_trip(config: ImagePreprocessConfig) -> None:
    assert ImagePreprocessConfig.from_dict(config.to_dict()) == config
    assert set(config.to_dict()) == {"input_size", "channels", "crop_to_head", "normalization"}


@pytest.mark.parametrize(
    "changes, bad",
    [
        ({"input_size": 8}, "8"),
        ({"input_size": 4096}, "4096"),
        ({"input_size": 224.5}, "224.5"),
        ({"input_size": "224"}, "'224'"),
        ({"input_size": True}, "True"),
        ({"channels": 2}, "2"),
        ({"normalization": "minmax"}, "minmax"),
        ({"crop_to_head": "yes"}, "yes"),
        ({"resize": "bicubic"}, "resize"),
    ],
)
def test_config_rejects_bad_values(changes: dict, bad: str) -> None:
    with pytest.raises(ValueError, match=bad):
        ImagePreprocessConfig.from_dict({**ImagePreprocessConfig().to_dict(), **changes})


@pytest.mark.parametrize("size", [32, 224])  # shrinking and enlarging a 120x160 slice
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("normalization", ["zero_one", "zscore"])
@pytest.mark.parametrize("crop", [True, False])
def test_preprocess_image_output(size: int, channels: int, normalization: str, crop: bool) -> None:
    config = ImagePreprocessConfig(size, channels, crop, normalization)
    out = preprocess_image(PNG, config)
    assert out.shape == (size, size, channels) and out.dtype == np.float32
    if normalization == "zero_one":
        assert 0.0 <= out.min() and out.max() <= 1.0 and out.max() > 0.5
    else:
        assert abs(float(out.mean())) < 1e-4 and abs(float(out.std()) - 1.0) < 1e-3
    assert np.array_equal(out[..., 0], out[..., -1])


@pytest.mark.parametrize(
    "as_array",
    [lambda: GREY, lambda: GREY[:, :, None], lambda: np.dstack([GREY] * 3),
     lambda: np.array(PNG, dtype=object), lambda: bytearray(PNG)],
    ids=["grey", "grey-hw1", "rgb", "0d-object", "bytearray"],
)
def test_preprocess_image_bytes_and_arrays_agree(as_array) -> None:
    config = ImagePreprocessConfig(input_size=64)
    expected = preprocess_image(PNG, config)
    np.testing.assert_allclose(preprocess_image(as_array(), config), expected, atol=1e-6)


def test_preprocess_image_flat_image_zscore_is_zero() -> None:
    config = ImagePreprocessConfig(32, normalization="zscore")
    out = preprocess_image(np.full((40, 40), 77, np.uint8), config)
    assert np.all(out == 0.0)


@pytest.mark.parametrize(
    "image, error",
    [
        (np.zeros((0, 10), np.uint8), EmptyInputError),
        (np.zeros((8, 64), np.uint8), BadDimensionsError),
        (np.zeros((32, 32, 2), np.uint8), BadDimensionsError),
        (np.full((32, 32), np.nan, np.float32), NonFiniteError),
        ("scan.jpg", UnsupportedFormatError),
        (np.zeros((32, 32), np.complex64), UnsupportedFormatError),
    ],
)
def test_preprocess_image_rejects_bad_arrays(image, error: type[Exception]) -> None:
    with pytest.raises(error):
        preprocess_image(image, ImagePreprocessConfig(32))


def test_preprocess_batch() -> None:
    config = ImagePreprocessConfig(input_size=48, channels=1)
    batch = preprocess_batch([PNG, JPEG, GREY], config)
    assert batch.shape == (3, 48, 48, 1) and batch.dtype == np.float32
    np.testing.assert_allclose(batch[0], preprocess_image(PNG, config))
    assert preprocess_batch([], config).shape == (0, 48, 48, 1)
    with pytest.raises(CorruptFileError, match="image 1"):
        preprocess_batch([PNG, JPEG[:-2]], config)


def test_module_does_not_import_tensorflow() -> None:
    code = "import sys, brainscan.preprocess.image2d; sys.exit('tensorflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT).returncode == 0
