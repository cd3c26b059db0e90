"""What an image file's header says, read before any pixel is decoded: its format (by magic bytes,
never by extension), its size and the bytes a pixel takes once decoded. :func:`check_dimensions`
then refuses absurd sizes, so a decompression bomb is turned away without allocating its memory.
Pure Python (``struct``); :mod:`brainscan.preprocess.image2d` decodes what passes.
"""

from __future__ import annotations

import struct

from brainscan.errors import BadDimensionsError, CorruptFileError, InputTooLargeError

#: Smallest accepted image side and largest accepted aspect ratio (longer / shorter side).
MIN_SIDE = 16
MAX_ASPECT_RATIO = 10.0
#: Default pixel cap: 50 Mpx is far above any MRI slice yet refuses decompression bombs.
DEFAULT_MAX_PIXELS = 50_000_000
#: Default decoding budget: the bytes OpenCV allocates for the decoded pixels (width x height x
#: channels x bytes per sample, read from the header). Decoding time grows with these bytes, not
#: with the pixel count alone: inflating a 7000x7000 16-bit RGBA PNG (392 MB) takes 2.4 s on one
#: core, the same image in 8-bit grey (49 MB) 0.2 s. The budget is the pixel cap in 8-bit colour,
#: so every 8-bit image under the cap passes, while 16-bit and alpha images are held to the same
#: bytes (16-bit RGBA to 18.7 Mpx, about 4300x4300); each costs about a second or less.
DEFAULT_MAX_DECODED_BYTES = 3 * DEFAULT_MAX_PIXELS

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
# JPEG start-of-frame markers carry the image size; C4 (DHT), C8 (JPG) and CC (DAC) do not.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Channels OpenCV decodes a PNG colour type to (IMREAD_UNCHANGED); palette and grey+alpha images
# may come back as BGRA, so they count as 4.
_PNG_CHANNELS = {0: 1, 2: 3, 3: 4, 4: 4, 6: 4}


def _decoded_bytes_per_pixel(channels: int, bits_per_sample: int) -> int:
    """Bytes a pixel takes once OpenCV has decoded it: 1, 2, 4 or 8 bytes per sample."""
    return channels * max(1, -(-bits_per_sample // 8))


def sniff_format(raw: bytes) -> str | None:
    """Name the image format of ``raw`` from its magic bytes: ``"png"``, ``"jpeg"``, ``"bmp"``,
    ``"tiff"``, ``"webp"``, or ``None`` when it is none of them."""
    head = bytes(raw[:16])
    if head.startswith(_PNG_MAGIC):
        return "png"
    if head.startswith(_JPEG_MAGIC):
        return "jpeg"
    if head.startswith(b"BM") and len(head) >= 14:
        return "bmp"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


# Every header reader returns ``(width, height, bytes_per_pixel)``, the last as OpenCV decodes it.


def _png_size(raw: bytes, name: str) -> tuple[int, int, int]:
    if len(raw) < 26 or raw[12:16] != b"IHDR":
        raise CorruptFileError(f"{name}: PNG header is damaged (no IHDR chunk)")
    width, height = struct.unpack(">II", raw[16:24])
    bytes_per_pixel = _decoded_bytes_per_pixel(_PNG_CHANNELS.get(raw[25], 4), raw[24])
    # Walk the chunk headers (not their data) to make sure the file reaches its IEND chunk:
    # OpenCV would otherwise hand back a partly decoded, truncated upload.
    pos = 8
    while pos + 8 <= len(raw):
        length = struct.unpack(">I", raw[pos : pos + 4])[0]
        chunk = raw[pos + 4 : pos + 8]
        pos += 12 + length
        if chunk == b"IEND":
            return width, height, bytes_per_pixel
    raise CorruptFileError(f"{name}: PNG is truncated (no IEND chunk); upload the whole file")


def _jpeg_size(raw: bytes, name: str) -> tuple[int, int, int]:
    pos, n = 2, len(raw)
    while pos + 4 <= n:
        if raw[pos] != 0xFF:
            raise CorruptFileError(f"{name}: JPEG marker structure is damaged at byte {pos}")
        marker = raw[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length field
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            break
        if marker in _JPEG_SOF:
            if pos + 10 > n:
                break
            precision, height, width, components = struct.unpack(">BHHB", raw[pos + 4 : pos + 10])
            # Entropy-coded data escapes every 0xFF, so FFD9 after the frame header can only be
            # the end-of-image marker; without it the scan data was cut off.
            if raw.find(b"\xff\xd9", pos) < 0:
                raise CorruptFileError(
                    f"{name}: JPEG is truncated (no end-of-image marker); upload the whole file"
                )
            # colour JPEGs (YCbCr, CMYK) come back as BGR
            return width, height, _decoded_bytes_per_pixel(1 if components == 1 else 3, precision)
        pos += 2 + struct.unpack(">H", raw[pos + 2 : pos + 4])[0]
    raise CorruptFileError(f"{name}: JPEG is truncated or damaged (no frame header found)")


def _bmp_size(raw: bytes, name: str) -> tuple[int, int, int]:
    if len(raw) < 30:
        raise CorruptFileError(f"{name}: BMP header is truncated")
    declared_size = struct.unpack("<I", raw[2:6])[0]
    header_size = struct.unpack("<I", raw[14:18])[0]
    if declared_size > len(raw):
        raise CorruptFileError(f"{name}: BMP is truncated ({len(raw)} of {declared_size} bytes)")
    if header_size == 12:
        width, height, bits = struct.unpack("<HH2xH", raw[18:26])
    else:
        width, height, bits = struct.unpack("<ii2xH", raw[18:30])
    # palette and 24-bit BMPs come back as BGR, 32-bit ones as BGRA
    bytes_per_pixel = 4 if bits == 32 else 3
    return abs(width), abs(height), bytes_per_pixel  # negative height means rows stored top-down


def _tiff_size(raw: bytes, name: str) -> tuple[int, int, int]:
    order = "<" if raw[:2] == b"II" else ">"
    try:
        ifd = struct.unpack(order + "I", raw[4:8])[0]
        entries = struct.unpack(order + "H", raw[ifd : ifd + 2])[0]
        size: dict[int, int] = {}
        for i in range(entries):
            entry = raw[ifd + 2 + 12 * i : ifd + 14 + 12 * i]
            tag, kind, count = struct.unpack(order + "HHI", entry[:8])
            # ImageWidth, ImageLength, BitsPerSample, SamplesPerPixel: SHORT (3) or LONG (4)
            if tag in (256, 257, 258, 277):
                fmt = order + ("H" if kind == 3 else "I")
                value = entry[8:12]
                if count * struct.calcsize(fmt) > 4:  # per-sample values stored elsewhere: take the first
                    offset = struct.unpack(order + "I", value)[0]
                    value = raw[offset : offset + 4]
                size[tag] = struct.unpack(fmt, value[: struct.calcsize(fmt)])[0]
        samples = size.get(277, 1)
        channels = {1: 1, 3: 3}.get(samples, max(4, samples))  # grey+alpha comes back as BGRA
        return size[256], size[257], _decoded_bytes_per_pixel(channels, size.get(258, 1))
    except (struct.error, KeyError):
        raise CorruptFileError(f"{name}: TIFF header is truncated or lacks its size") from None


def _webp_size(raw: bytes, name: str) -> tuple[int, int, int]:
    if len(raw) < 30 or struct.unpack("<I", raw[4:8])[0] + 8 > len(raw):
        raise CorruptFileError(f"{name}: WebP is truncated; upload the whole file")
    chunk = raw[12:16]
    if chunk == b"VP8 ":
        width, height = struct.unpack("<HH", raw[26:30])
        return width & 0x3FFF, height & 0x3FFF, 3
    # lossless and extended WebPs may carry alpha: BGRA
    if chunk == b"VP8L":
        bits = struct.unpack("<I", raw[21:25])[0]
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, 4
    if chunk == b"VP8X":
        return int.from_bytes(raw[24:27], "little") + 1, int.from_bytes(raw[27:30], "little") + 1, 4
    raise CorruptFileError(f"{name}: WebP header is damaged (unknown chunk {chunk!r})")


_HEADER_READERS = {
    "png": _png_size,
    "jpeg": _jpeg_size,
    "bmp": _bmp_size,
    "tiff": _tiff_size,
    "webp": _webp_size,
}


def check_dimensions(
    height: int, width: int, *, name: str = "image", max_pixels: int | None = None
) -> None:
    """Refuse absurd image sizes before any pixel is decoded or resized.

    Raises:
        InputTooLargeError: more than ``max_pixels`` pixels.
        BadDimensionsError: a side below :data:`MIN_SIDE` or an aspect ratio above
            :data:`MAX_ASPECT_RATIO`.
    """
    if max_pixels is not None and height * width > max_pixels:
        raise InputTooLargeError(
            f"{name} is {width}x{height} = {width * height} pixels, more than the limit of "
            f"{max_pixels}; downscale it before uploading"
        )
    if min(height, width) < MIN_SIDE:
        raise BadDimensionsError(
            f"{name} is {width}x{height}; each side must be at least {MIN_SIDE} px"
        )
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise BadDimensionsError(
            f"{name} is {width}x{height}; an aspect ratio above {MAX_ASPECT_RATIO:g} is not a slice"
        )


def read_image_size(raw: bytes, kind: str, name: str) -> tuple[int, int, int]:
    """``(width, height, decoded bytes per pixel)`` from the header of a ``kind`` image
    (a :func:`sniff_format` result).

    Raises:
        CorruptFileError: the header is truncated or inconsistent.
    """
    return _HEADER_READERS[kind](raw, name)
