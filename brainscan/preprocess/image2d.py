"""2D MRI slice decoding and preprocessing, shared by training and serving.

One function, :func:`preprocess_image`, turns an upload (bytes) or a decoded array into the
network input; the model bundle stores its :class:`ImagePreprocessConfig` so that serving rebuilds
exactly what training used. The module is pure numpy/OpenCV (no TensorFlow): the gateway imports
it, and training calls it through ``tf.numpy_function``.

Decoding is decided by content (magic bytes), never by file extension. Image dimensions are read
from the file header *before* the pixels are decoded, so a decompression bomb (a tiny PNG that
claims 30000x30000 pixels) is refused without allocating its memory. The header also gives the
decoded size (channels and bit depth), which is held to a budget (:data:`DEFAULT_MAX_DECODED_BYTES`)
because decoding time grows with it. Every step after decoding costs a fraction of a second even
at the pixel cap: the head is searched on a shrunk copy, colour is converted in strips.

Example:
    >>> config = ImagePreprocessConfig(input_size=224, channels=3)
    >>> x = preprocess_image(Path("Tr-gl_0010.jpg").read_bytes(), config)
    >>> x.shape, x.dtype
    ((224, 224, 3), dtype('float32'))
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import cv2
import numpy as np

from brainscan.errors import (
    BadDimensionsError,
    BrainscanError,
    CorruptFileError,
    EmptyInputError,
    InputTooLargeError,
    NonFiniteError,
    UnsupportedFormatError,
)
from brainscan.preprocess.image_header import (  # noqa: F401  (re-exported: part of this module's API)
    DEFAULT_MAX_DECODED_BYTES,
    DEFAULT_MAX_PIXELS,
    check_dimensions,
    read_image_size,
    sniff_format,
)

NORMALIZATIONS: tuple[str, ...] = ("zero_one", "zscore")
#: Largest shorter side on which :func:`crop_to_head` looks for the head at full resolution.
HEAD_SEARCH_SIDE = 1024

#: Rows of a colour image converted to grey at a time hold about this many pixels, so that the
#: conversion never holds a float copy of a whole large image (12 bytes a pixel).
GREY_STRIP_PIXELS = 1 << 20


def to_grey_uint8(pixels: np.ndarray, *, name: str = "image", bgr: bool = True) -> np.ndarray:
    """Convert a decoded image of any depth and channel count to uint8 greyscale ``(H, W)``.

    Colour is converted with the ITU-R 601 weights; an alpha channel is composited on black;
    anything that is not uint8 (16-bit PNG/TIFF, float arrays) is rescaled by its own min/max
    range, because MRI exports rarely use the full 16-bit range.

    Args:
        pixels: ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)``.
        name: used in error messages.
        bgr: channel order of colour input; OpenCV decodes to BGR, numpy/PIL arrays are RGB.

    Raises:
        UnsupportedFormatError, EmptyInputError, BadDimensionsError, NonFiniteError.
    """
    if pixels.dtype.kind not in "biuf":
        raise UnsupportedFormatError(f"{name} must hold real numbers, got dtype {pixels.dtype}")
    if pixels.size == 0:
        raise EmptyInputError(f"{name} has no pixels (shape {pixels.shape})")
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    values = None  # float32 pixels this function owns, so it may change them in place
    if pixels.ndim == 3 and pixels.shape[2] in (3, 4):
        grey = _colour_to_grey(pixels, bgr=bgr)
        if grey.dtype == np.uint8:
            return grey
        values = grey
    elif pixels.ndim != 2:
        raise BadDimensionsError(
            f"{name} must be (H, W) or (H, W, 1|3|4), got shape {pixels.shape}"
        )
    elif pixels.dtype == np.uint8:
        return pixels
    elif pixels.dtype == np.bool_:
        return pixels.astype(np.uint8) * 255
    else:
        values = pixels.astype(np.float32)
    if not np.isfinite(values).all():
        raise NonFiniteError(f"{name} holds NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    # in place: a 50 Mpx 16-bit image would otherwise hold three float copies at once
    values -= low
    values *= 255.0 / (high - low)
    return np.rint(values, out=values).astype(np.uint8)


def _colour_to_grey(pixels: np.ndarray, *, bgr: bool) -> np.ndarray:
    """ITU-R 601 luma of ``(H, W, 3|4)`` colour, an alpha channel composited on black.

    Converted in strips of rows (:data:`GREY_STRIP_PIXELS`), so that no float copy of a whole
    large image is held. Returns uint8 ``(H, W)`` (rounded) for uint8 input, else float32.
    """
    is_integer = np.issubdtype(pixels.dtype, np.integer)
    depth_max = float(np.iinfo(pixels.dtype).max) if is_integer else 1.0
    code = cv2.COLOR_BGR2GRAY if bgr else cv2.COLOR_RGB2GRAY
    height, width = pixels.shape[:2]
    grey = np.empty((height, width), np.uint8 if pixels.dtype == np.uint8 else np.float32)
    rows = max(1, GREY_STRIP_PIXELS // width)
    for top in range(0, height, rows):
        strip = pixels[top : top + rows]
        colour = strip[:, :, :3].astype(np.float32)
        if strip.shape[2] == 4:
            colour *= strip[:, :, 3:4].astype(np.float32) / depth_max
        luma = cv2.cvtColor(colour, code)
        grey[top : top + rows] = np.clip(np.rint(luma), 0, 255) if grey.dtype == np.uint8 else luma
    return grey


def decode_image(
    raw: bytes,
    *,
    name: str = "image",
    max_bytes: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    max_decoded_bytes: int | None = DEFAULT_MAX_DECODED_BYTES,
) -> np.ndarray:
    """Decode a PNG, JPEG, BMP, TIFF or WebP file, recognised by content, to uint8 greyscale.

    Args:
        raw: the file's bytes.
        name: used in error messages (e.g. the upload's file name).
        max_bytes: refuse larger inputs before looking at them (``None``: no limit).
        max_pixels: refuse images whose header claims more pixels (``None``: no limit).
        max_decoded_bytes: refuse images whose decoded pixels, by their header (size, channels,
            bit depth), would take more bytes (``None``: no limit); see
            :data:`DEFAULT_MAX_DECODED_BYTES`.

    Returns:
        uint8 array ``(H, W)``.

    Raises:
        EmptyInputError: zero bytes.
        InputTooLargeError: more than ``max_bytes`` bytes, ``max_pixels`` pixels or
            ``max_decoded_bytes`` decoded bytes.
        UnsupportedFormatError: not one of the formats above (text, random bytes, DICOM, ...).
        CorruptFileError: a known format that is truncated or damaged.
        BadDimensionsError: a side below 16 px or an aspect ratio above 10.
    """
    raw = bytes(raw)
    if not raw:
        raise EmptyInputError(f"{name} is empty (0 bytes)")
    if max_bytes is not None and len(raw) > max_bytes:
        raise InputTooLargeError(f"{name} is {len(raw)} bytes, more than the limit of {max_bytes}")
    kind = sniff_format(raw)
    if kind is None:
        raise UnsupportedFormatError(
            f"{name} is not a PNG, JPEG, BMP, TIFF or WebP image (judged by content, not by name)"
        )
    width, height, bytes_per_pixel = read_image_size(raw, kind, name)
    check_dimensions(height, width, name=name, max_pixels=max_pixels)
    decoded_bytes = width * height * bytes_per_pixel
    if max_decoded_bytes is not None and decoded_bytes > max_decoded_bytes:
        raise InputTooLargeError(
            f"{name} is a {width}x{height} {kind.upper()} with {bytes_per_pixel} bytes per pixel: "
            f"{decoded_bytes / 1e6:.3g} MB once decoded, more than the decoding limit of "
            f"{max_decoded_bytes / 1e6:.3g} MB; save it as 8-bit greyscale or downscale it before uploading"
        )
    # UNCHANGED keeps 16-bit depth and alpha (converted above); it also ignores EXIF rotation,
    # which scanner exports do not use.
    pixels = cv2.imdecode(np.frombuffer(raw, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise CorruptFileError(f"{name}: the {kind.upper()} data cannot be decoded (damaged file)")
    if pixels.shape[:2] != (height, width):
        raise CorruptFileError(f"{name}: decoded size {pixels.shape[:2]} disagrees with its header")
    return to_grey_uint8(pixels, name=name, bgr=True)


def _head_box(grey: np.ndarray, threshold: float) -> tuple[int, int, int, int, float] | None:
    """``(x0, y0, x1, y1, background)`` of the head in ``grey`` (no margin), None when none is found.

    The box holds the largest bright component of the smoothed image and every component at least
    a tenth of its area; ``background`` is the median of the pixels outside the bright mask.
    """
    height, width = grey.shape
    values = grey.astype(np.float32)
    sigma = max(1.0, min(height, width) / 100.0)
    smooth = cv2.GaussianBlur(values, (0, 0), sigma)
    low, high = float(np.percentile(smooth, 0.5)), float(np.percentile(smooth, 99.5))
    if high <= low:
        return None
    mask = (smooth > low + threshold * (high - low)).astype(np.uint8)
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if count <= 1:
        return None
    areas = stats[1:, cv2.CC_STAT_AREA]
    keep = stats[1:][areas >= 0.1 * areas.max()]
    x0, y0 = int(keep[:, cv2.CC_STAT_LEFT].min()), int(keep[:, cv2.CC_STAT_TOP].min())
    x1 = int((keep[:, cv2.CC_STAT_LEFT] + keep[:, cv2.CC_STAT_WIDTH]).max())
    y1 = int((keep[:, cv2.CC_STAT_TOP] + keep[:, cv2.CC_STAT_HEIGHT]).max())
    outside = grey[mask == 0]
    background = float(np.median(outside)) if outside.size else 0.0
    return x0, y0, x1, y1, background


def crop_to_head(grey: np.ndarray, *, threshold: float = 0.1, margin: float = 0.02) -> np.ndarray:
    """Crop a slice to the head, dropping the variable dark border, and pad it to a square.

    The image is smoothed, thresholded at ``threshold`` times its 99.5th percentile, and the
    bounding box of the largest bright component (plus any component at least a tenth of its
    area, e.g. a detached skull rim) is taken, so that small burnt-in letters are ignored.

    The smoothing scale is a fixed fraction of the image (1 %), so the search gives the same box
    on an area-averaged copy: an image whose shorter side exceeds :data:`HEAD_SEARCH_SIDE` is
    searched on a copy shrunk by a whole factor below that side, and only the crop itself touches
    the full-resolution pixels. This keeps a 7000x7000 image at a fraction of a second (a full
    resolution blur of it took 25 s); every training slice is below the side, so its crop is
    unchanged.

    Args:
        grey: 2D array ``(H, W)`` (any real dtype; values are not changed).
        threshold: fraction of the robust maximum that counts as head, in (0, 1).
        margin: border kept around the head, as a fraction of the longer box side, in [0, 0.5].

    Returns:
        ``(S, S)`` array of ``grey``'s dtype; the full image, unchanged, if no head is found.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    if not 0.0 <= margin <= 0.5:
        raise ValueError(f"margin must be in [0, 0.5], got {margin}")
    if grey.ndim != 2 or grey.size == 0:
        raise BadDimensionsError(
            f"crop_to_head expects a non-empty (H, W) array, got shape {grey.shape}"
        )
    height, width = grey.shape
    factor = -(-min(height, width) // HEAD_SEARCH_SIDE)
    search = grey
    if factor > 1:
        # cv2.resize takes uint8 and float32 (decoded uploads are uint8); other dtypes are cast
        source = grey if grey.dtype in (np.uint8, np.float32) else grey.astype(np.float32)
        search = cv2.resize(source, (-(-width // factor), -(-height // factor)), interpolation=cv2.INTER_AREA)
    box = _head_box(search, threshold)
    if box is None:
        return grey
    x0, y0, x1, y1, background = box
    if factor > 1:  # back to full-resolution pixels, rounding outwards
        scale_x, scale_y = width / search.shape[1], height / search.shape[0]
        x0, y0 = int(x0 * scale_x), int(y0 * scale_y)
        x1, y1 = min(width, int(np.ceil(x1 * scale_x))), min(height, int(np.ceil(y1 * scale_y)))
    pad = int(round(margin * max(x1 - x0, y1 - y0)))
    x0, y0, x1, y1 = max(0, x0 - pad), max(0, y0 - pad), min(width, x1 + pad), min(height, y1 + pad)
    crop = grey[y0:y1, x0:x1]
    # Pad with the background (median of what lies outside the head) so the crop is square
    # without stretching the anatomy.
    side = max(crop.shape)
    top, left = (side - crop.shape[0]) // 2, (side - crop.shape[1]) // 2
    square = np.full((side, side), background, dtype=grey.dtype)
    square[top : top + crop.shape[0], left : left + crop.shape[1]] = crop
    return square


@dataclass
class ImagePreprocessConfig:
    """How a 2D slice becomes network input; stored in every classification model bundle.

    Attributes:
        input_size: output side ``S`` in pixels (16..2048).
        channels: 1 (grey) or 3 (grey repeated, for backbones that expect RGB).
        crop_to_head: crop the dark border away before resizing (see :func:`crop_to_head`).
        normalization: ``"zero_one"`` (pixel / 255) or ``"zscore"`` (per image mean 0, std 1).
    """

    input_size: int = 224
    channels: int = 3
    crop_to_head: bool = True
    normalization: str = "zero_one"

    def __post_init__(self) -> None:
        size = self.input_size
        is_int = isinstance(size, (int, np.integer)) and not isinstance(size, bool)
        if not is_int or not 16 <= size <= 2048:
            raise ValueError(f"input_size must be an integer in [16, 2048], got {size!r}")
        if isinstance(self.channels, bool) or self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels!r}")
        if not isinstance(self.crop_to_head, (bool, np.bool_)):
            raise ValueError(f"crop_to_head must be true or false, got {self.crop_to_head!r}")
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(
                f"normalization must be one of {list(NORMALIZATIONS)}, got {self.normalization!r}"
            )
        self.input_size, self.crop_to_head = int(self.input_size), bool(self.crop_to_head)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, as written to a bundle's ``manifest.json``."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImagePreprocessConfig:
        """Rebuild from :meth:`to_dict` output; missing keys take defaults, unknown keys fail."""
        if not isinstance(d, dict):
            raise ValueError(f"preprocessing config must be a dict, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown image preprocessing keys {unknown}")
        return cls(**d)


def _as_grey(image: bytes | np.ndarray, name: str) -> np.ndarray:
    if isinstance(image, np.ndarray) and image.dtype.kind in "SO" and image.ndim == 0:
        image = image.item()  # a scalar string tensor arriving through tf.numpy_function
    if isinstance(image, (bytes, bytearray, memoryview)):
        return decode_image(bytes(image), name=name)
    if not isinstance(image, np.ndarray):
        raise UnsupportedFormatError(
            f"{name} must be bytes or a numpy array, got {type(image).__name__}"
        )
    grey = to_grey_uint8(image, name=name, bgr=False)
    check_dimensions(*grey.shape, name=name)
    return grey


def preprocess_image(image: bytes | np.ndarray, config: ImagePreprocessConfig) -> np.ndarray:
    """Turn an encoded file or a decoded array into network input.

    Args:
        image: file bytes (any format :func:`decode_image` reads), or an array ``(H, W)``,
            ``(H, W, 1)``, ``(H, W, 3)`` RGB or ``(H, W, 4)`` RGBA; non-uint8 arrays are rescaled
            by their min/max range.
        config: the preprocessing the model was trained with.

    Returns:
        float32 array ``(S, S, C)`` with ``S = config.input_size``, ``C = config.channels``;
        values in [0, 1] for ``"zero_one"``; mean 0 and std 1 (all 0 for a flat image) for
        ``"zscore"``.

    Raises:
        The errors of :func:`decode_image` for bad bytes; EmptyInputError, BadDimensionsError,
        NonFiniteError for bad arrays.
    """
    grey = _as_grey(image, "image")
    if config.crop_to_head:
        grey = crop_to_head(grey)
    size = config.input_size
    # INTER_AREA averages when shrinking (no aliasing); it degenerates to nearest when enlarging.
    interpolation = cv2.INTER_AREA if max(grey.shape) > size else cv2.INTER_LINEAR
    resized = cv2.resize(grey, (size, size), interpolation=interpolation).astype(np.float32)
    if config.normalization == "zero_one":
        resized /= 255.0
    else:
        std = float(resized.std())
        mean = float(resized.mean())
        resized = (resized - mean) / std if std > 1e-6 else np.zeros_like(resized)
    return np.repeat(resized[:, :, None], config.channels, axis=2)


def preprocess_batch(images: list[bytes | np.ndarray], config: ImagePreprocessConfig) -> np.ndarray:
    """:func:`preprocess_image` over a list; returns float32 ``(N, S, S, C)`` (N may be 0).

    Raises:
        The error of the first bad image, its message prefixed with the image's index.
    """
    size, channels = config.input_size, config.channels
    batch = np.empty((len(images), size, size, channels), dtype=np.float32)
    for index, image in enumerate(images):
        try:
            batch[index] = preprocess_image(image, config)
        except BrainscanError as error:
            raise type(error)(f"image {index}: {error.message}") from error
    return batch
