"""Duplicate detection for 2D image datasets: byte identity and a 64-bit DCT perceptual hash.

The Kaggle brain MRI set holds several hundred byte-identical and near-identical images (the same
slice re-encoded or resized by the sources it was merged from). A train/validation split that puts
one copy on each side measures memory, not generalisation, so :func:`group_duplicates` gives every
image a group id and the split keeps each group on one side.

The perceptual hash is the classic DCT pHash: greyscale, area-resize to 32x32, 2D DCT, keep the
8x8 lowest frequencies, and set each bit where a coefficient exceeds the median of the 63 AC
coefficients (the DC term only measures overall brightness, so it does not set the threshold).
Re-encoding and resizing leave it unchanged in practice; different slices differ in many bits.

Each content is decoded and hashed once: hashes are cached by the sha256 of the file bytes, in the
process and, where ``BRAINSCAN_PHASH_CACHE`` names a folder, on disk for other processes too.

Example:
    >>> groups = group_duplicates(sorted(Path("Training").glob("*/*.jpg")))
    >>> len(groups) == len(set(groups))   # False when duplicates exist
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from brainscan.errors import BadDimensionsError, BrainscanError, EmptyInputError
from brainscan.preprocess.image2d import decode_image, to_grey_uint8

_HASH_SIDE = 32
_LOW_FREQUENCIES = 8
_BIT_WEIGHTS = 1 << np.arange(63, -1, -1, dtype=np.uint64)

ImageItem = Path | str | bytes | np.ndarray

#: A folder where pHashes persist across processes, keyed by the sha256 of the file bytes (so a
#: changed file is hashed again). Unset: the cache lives in this process only.
PHASH_CACHE_ENV = "BRAINSCAN_PHASH_CACHE"
#: Bumped whenever :func:`perceptual_hash` changes, so that an old on-disk cache is not read.
_PHASH_VERSION = 1
_cache: dict[str, int | None] = {}
_cache_lock = threading.Lock()
_loaded_from: str | None = None


def _cache_file() -> Path | None:
    folder = os.environ.get(PHASH_CACHE_ENV)
    return Path(folder) / f"phash-v{_PHASH_VERSION}.json" if folder else None


def _load_disk_cache() -> None:
    """Merge the on-disk cache (if any) into the in-process one, once per cache folder."""
    global _loaded_from
    path = _cache_file()
    if path is None or _loaded_from == str(path):
        return
    _loaded_from = str(path)
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # absent or half-written by a crashed writer: hash afresh
    if isinstance(stored, dict):
        _cache.update({k: v for k, v in stored.items() if v is None or isinstance(v, int)})


def _save_disk_cache() -> None:
    """Write the in-process cache to the folder atomically, merged with what others wrote since."""
    path = _cache_file()
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            stored = json.loads(path.read_text())
        except (OSError, ValueError):
            stored = {}
        merged = {**(stored if isinstance(stored, dict) else {}), **_cache}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".phash-", suffix=".json")
        with os.fdopen(fd, "w") as out:
            json.dump(merged, out)
        os.replace(tmp, path)
    except OSError:
        pass  # a cache that cannot be written only costs time


def perceptual_hash(grey: np.ndarray) -> int:
    """64-bit DCT perceptual hash of an image.

    Args:
        grey: ``(H, W)`` greyscale (any real dtype), or ``(H, W, 3|4)`` RGB(A) which is converted
            to grey first.

    Returns:
        the hash as a Python int in ``[0, 2**64)``; bit 63 is the top-left (DC) coefficient,
        bits follow the 8x8 block in row-major order.

    Raises:
        EmptyInputError: an array without pixels.
        BadDimensionsError: not 2D (or 3D with 1, 3 or 4 channels).
    """
    grey = np.asarray(grey)
    if grey.size == 0:
        raise EmptyInputError(f"cannot hash an empty image (shape {grey.shape})")
    if grey.ndim not in (2, 3):
        raise BadDimensionsError(f"expected an (H, W) image, got shape {grey.shape}")
    if grey.ndim == 3 or grey.dtype != np.uint8:
        grey = to_grey_uint8(grey, bgr=False)
    small = cv2.resize(
        grey.astype(np.float32), (_HASH_SIDE, _HASH_SIDE), interpolation=cv2.INTER_AREA
    )
    low = cv2.dct(small)[:_LOW_FREQUENCIES, :_LOW_FREQUENCIES].ravel()
    bits = low > np.median(low[1:])
    return int(np.sum(_BIT_WEIGHTS[bits], dtype=np.uint64))


def hamming_distance(a: int, b: int) -> int:
    """Number of differing bits between two hashes (0 for equal hashes)."""
    return (a ^ b).bit_count()


def _fingerprint(item: ImageItem) -> tuple[str | None, int | None]:
    """(sha256 of the file bytes or None for arrays, pHash or None when undecodable)."""
    if isinstance(item, np.ndarray):
        return None, perceptual_hash(item)
    raw = Path(item).read_bytes() if isinstance(item, (str, Path)) else bytes(item)
    digest = hashlib.sha256(raw).hexdigest()
    if digest in _cache:  # the same bytes hash the same: decode each content once
        return digest, _cache[digest]
    try:
        grey = decode_image(raw, name=str(item) if isinstance(item, (str, Path)) else "image")
    except BrainscanError:
        phash = None
    else:
        phash = perceptual_hash(grey)
    with _cache_lock:
        _cache[digest] = phash
    return digest, phash


def _fingerprints(
    items: Sequence[ImageItem], workers: int | None
) -> list[tuple[str | None, int | None]]:
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    if workers < 1:
        raise ValueError(f"workers must be >= 1 or None, got {workers}")
    with _cache_lock:
        _load_disk_cache()
        known = len(_cache)
    if workers == 1 or len(items) < 64:
        prints = [_fingerprint(item) for item in items]
    else:
        # File reads and OpenCV decoding release the GIL, so threads give real parallelism here.
        with ThreadPoolExecutor(max_workers=workers) as pool:
            prints = list(pool.map(_fingerprint, items, chunksize=32))
    if len(_cache) > known:
        with _cache_lock:
            _save_disk_cache()
    return prints


def perceptual_hashes(
    items: Sequence[ImageItem], *, workers: int | None = None
) -> list[int | None]:
    """pHash of each image (file path, file bytes or decoded array); ``None`` if undecodable.

    Args:
        items: paths, encoded bytes, or arrays as accepted by :func:`perceptual_hash`.
        workers: decoding threads (``None``: up to 4, bounded by the CPU count).
    """
    return [phash for _, phash in _fingerprints(items, workers)]


def group_duplicates(items: Sequence[ImageItem], *, workers: int | None = None) -> list[int]:
    """Group images that are byte-identical or have equal perceptual hashes.

    Groups are the connected components of "same bytes or same pHash" (union-find), so a chain
    A~B, B~C puts A, B and C together. Files that cannot be decoded are grouped by bytes only.

    Args:
        items: image file paths, encoded bytes, or decoded arrays (may be mixed).
        workers: decoding threads (``None``: up to 4, bounded by the CPU count).

    Returns:
        one group id per item, numbered 0, 1, 2, ... in order of first appearance.

    Raises:
        FileNotFoundError: a path does not exist.
    """
    prints = _fingerprints(list(items), workers)
    parent = list(range(len(prints)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_seen: dict[tuple[str, object], int] = {}
    for index, (digest, phash) in enumerate(prints):
        for key in (("sha256", digest), ("phash", phash)):
            if key[1] is None:
                continue
            other = first_seen.setdefault(key, index)
            root_a, root_b = find(index), find(other)
            if root_a != root_b:
                parent[max(root_a, root_b)] = min(root_a, root_b)

    numbering: dict[int, int] = {}
    return [numbering.setdefault(find(i), len(numbering)) for i in range(len(prints))]
