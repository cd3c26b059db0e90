"""Tests for brainscan.data.dedup: the DCT perceptual hash and duplicate grouping."""

from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy.fft import dctn

from brainscan.data.dedup import (
    group_duplicates,
    hamming_distance,
    perceptual_hash,
    perceptual_hashes,
)
from brainscan.errors import BadDimensionsError, EmptyInputError
from tests.paths import KAGGLE_TRAINING, needs_kaggle


def phantom(seed: int, size: int = 192) -> np.ndarray:
    """A synthetic slice: a head ellipse holding six random blurred blobs."""
    rng = np.random.default_rng(seed)
    image = np.zeros((size, size), np.uint8)
    centre = size // 2
    cv2.ellipse(image, (centre, centre), (int(size * 0.4), int(size * 0.45)), 0, 0, 360, 120, -1)
    for _ in range(6):
        cx, cy = (int(v) for v in rng.integers(size // 4, 3 * size // 4, 2))
        ax, ay = (int(v) for v in rng.integers(size // 20, size // 6, 2))
        angle, value = float(rng.uniform(0, 180)), int(rng.integers(30, 250))
        cv2.ellipse(image, (cx, cy), (ax, ay), angle, 0, 360, value, -1)
    return cv2.GaussianBlur(image, (0, 0), 1.5)


def jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    return cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


def reference_phash(image: np.ndarray) -> int:
    """Textbook pHash, written independently: a 64x64 image area-averages to 32x32 by 2x2 means."""
    small = image.astype(np.float64).reshape(32, 2, 32, 2).mean(axis=(1, 3))
    low = dctn(small, type=2, norm="ortho")[:8, :8].ravel()
    bits = low > np.median(low[1:])
    return int("".join("1" if b else "0" for b in bits), 2)


@pytest.mark.parametrize("seed", range(4))
def test_perceptual_hash_matches_reference(seed: int) -> None:
    image = cv2.resize(phantom(seed), (64, 64), interpolation=cv2.INTER_AREA)
    value = perceptual_hash(image)
    assert 0 <= value < 2**64
    assert value == reference_phash(image)


COPIES = {
    "jpeg-q90": lambda im: cv2.imdecode(np.frombuffer(jpeg(im), np.uint8), cv2.IMREAD_GRAYSCALE),
    "half-size": lambda im: cv2.resize(im, (96, 96), interpolation=cv2.INTER_AREA),
    "upscaled": lambda im: cv2.resize(im, (256, 256), interpolation=cv2.INTER_LINEAR),
    "16-bit": lambda im: im.astype(np.uint16) * 257,
    "rgb": lambda im: np.dstack([im] * 3),
}


@pytest.mark.parametrize("copy", COPIES.values(), ids=COPIES.keys())
@pytest.mark.parametrize("seed", range(4))
def test_perceptual_hash_survives_reencoding_and_resizing(seed: int, copy) -> None:
    image = phantom(seed)
    assert perceptual_hash(copy(image)) == perceptual_hash(image)


def test_perceptual_hash_differs_between_images() -> None:
    hashes = [perceptual_hash(phantom(seed)) for seed in range(20)]
    distances = [hamming_distance(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1 :]]
    assert min(distances) >= 4  # far more than re-encoding changes (0 bits above)


@pytest.mark.parametrize(
    "image, error",
    [(np.zeros((0, 5), np.uint8), EmptyInputError), (np.zeros((4, 4, 4, 4)), BadDimensionsError)],
)
def test_perceptual_hash_rejects(image: np.ndarray, error: type[Exception]) -> None:
    with pytest.raises(error):
        perceptual_hash(image)


@pytest.mark.parametrize(
    "names, expected",
    [
        # a, b: different slices; a_q70, a_small: a re-encoded and resized; b_copy: b's exact bytes
        (["a", "b", "a_q70", "c", "a_small", "b_copy"], [0, 1, 0, 2, 0, 1]),
        # files that cannot be decoded group only with their byte-identical copies
        (["notes", "c", "notes_copy", "other_notes", "c"], [0, 1, 0, 2, 1]),
        (["a", "b", "c"], [0, 1, 2]),
    ],
)
def test_group_duplicates_files(tmp_path: Path, names: list[str], expected: list[int]) -> None:
    contents = {
        "a": jpeg(phantom(0)),
        "b": jpeg(phantom(1)),
        "c": cv2.imencode(".png", phantom(2))[1].tobytes(),
        "a_q70": jpeg(phantom(0), quality=70),
        "a_small": jpeg(cv2.resize(phantom(0), (128, 128), interpolation=cv2.INTER_AREA)),
        "notes": b"scanner export log\n",
        "other_notes": b"something else\n",
    }
    contents["b_copy"], contents["notes_copy"] = contents["b"], contents["notes"]
    paths = []
    for index, name in enumerate(names):
        paths.append(tmp_path / f"{index}_{name}.jpg")
        paths[-1].write_bytes(contents[name])
    assert group_duplicates(paths, workers=1) == expected


def test_group_duplicates_mixes_arrays_bytes_and_paths(tmp_path: Path) -> None:
    path = tmp_path / "slice.png"
    path.write_bytes(cv2.imencode(".png", phantom(3))[1].tobytes())
    items = [phantom(3), path, jpeg(phantom(4)), str(path), phantom(4), phantom(5)]
    assert group_duplicates(items) == [0, 0, 1, 0, 1, 2]


def test_group_duplicates_threads_agree() -> None:
    items = [jpeg(phantom(seed % 50, size=64)) for seed in range(100)]
    groups = group_duplicates(items, workers=3)
    assert groups == group_duplicates(items, workers=1)
    assert groups[:50] == groups[50:]


@pytest.fixture
def fresh_cache(monkeypatch):
    """The pHash cache emptied, and a counter of the images actually decoded."""
    import brainscan.data.dedup as dedup

    monkeypatch.setattr(dedup, "_cache", {})
    monkeypatch.setattr(dedup, "_loaded_from", None)
    decoded: list[str] = []
    real_decode = dedup.decode_image

    def counting_decode(raw, name="image"):
        decoded.append(name)
        return real_decode(raw, name=name)

    monkeypatch.setattr(dedup, "decode_image", counting_decode)
    return dedup, decoded


def test_each_content_is_decoded_once_per_process(tmp_path: Path, fresh_cache, monkeypatch) -> None:
    dedup, decoded = fresh_cache
    monkeypatch.delenv(dedup.PHASH_CACHE_ENV, raising=False)
    paths = [tmp_path / f"{i}.jpg" for i in range(3)]
    for path, seed in zip(paths, (0, 1, 0)):  # the third holds the first's bytes
        path.write_bytes(jpeg(phantom(seed)))
    first = group_duplicates(paths, workers=1)
    assert first == [0, 1, 0] and len(decoded) == 2
    assert group_duplicates(paths, workers=1) == first and len(decoded) == 2
    paths[1].write_bytes(jpeg(phantom(7)))  # changed bytes: hashed again
    assert group_duplicates(paths, workers=1) == [0, 1, 0] and len(decoded) == 3
    assert not list(tmp_path.glob("phash-*.json"))  # no folder named: nothing on disk


def test_the_disk_cache_serves_another_process_and_survives_a_broken_file(tmp_path: Path, fresh_cache,
                                                                         monkeypatch) -> None:
    dedup, decoded = fresh_cache
    folder = tmp_path / "cache"
    monkeypatch.setenv(dedup.PHASH_CACHE_ENV, str(folder))
    items = [jpeg(phantom(seed, size=64)) for seed in range(4)] + [b"not an image"]
    expected = perceptual_hashes(items, workers=1)
    assert len(decoded) == 5 and (folder / "phash-v1.json").is_file()
    # Another process: an empty in-process cache that reads the folder.
    monkeypatch.setattr(dedup, "_cache", {})
    monkeypatch.setattr(dedup, "_loaded_from", None)
    assert perceptual_hashes(items, workers=1) == expected and expected[-1] is None
    assert len(decoded) == 5
    # A half-written file (a crashed writer) is ignored: everything is hashed afresh, and rewritten.
    (folder / "phash-v1.json").write_text('{"abc": 12')
    monkeypatch.setattr(dedup, "_cache", {})
    monkeypatch.setattr(dedup, "_loaded_from", None)
    assert perceptual_hashes(items, workers=1) == expected and len(decoded) == 10
    assert len(json.loads((folder / "phash-v1.json").read_text())) == 5


def test_group_duplicates_bad_workers() -> None:
    with pytest.raises(ValueError, match="0"):
        group_duplicates([phantom(0)], workers=0)


@needs_kaggle
def test_group_duplicates_real_kaggle_training() -> None:
    paths = sorted(KAGGLE_TRAINING.glob("*/*.jpg"))
    start = time.perf_counter()
    groups = group_duplicates(paths)
    elapsed = time.perf_counter() - start
    assert elapsed < 60, f"hashing {len(paths)} images took {elapsed:.1f} s"
    assert None not in perceptual_hashes(paths[:200])  # every real image decodes
    by_bytes: dict[str, set[int]] = defaultdict(set)
    for path, group in zip(paths, groups):
        by_bytes[hashlib.sha256(path.read_bytes()).hexdigest()].add(group)
    assert all(len(ids) == 1 for ids in by_bytes.values())
    sizes = np.bincount(groups)
    # The dataset README reports several hundred duplicate and near-duplicate images.
    assert int(sizes[sizes > 1].sum()) >= 200
