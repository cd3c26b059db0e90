"""Tests for brainscan.data.kaggle: folder layout, problems, duplicate-aware split, fingerprint."""

from __future__ import annotations

import shutil
import time
from collections import Counter, defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest

from brainscan.data.dedup import group_duplicates
from brainscan.data.kaggle import (
    ImageRecord,
    dataset_fingerprint,
    read_kaggle_folder,
    split_train_validation,
)
from brainscan.errors import DatasetLayoutError
from brainscan.labels import KAGGLE_CLASSES
from tests.data.test_dedup import phantom
from tests.paths import KAGGLE_TRAINING, needs_kaggle

LAYOUT_HINT = "Training|Testing/<class>"


def noise_png(seed: int, size: int = 32) -> bytes:
    """A distinct small image per seed (random noise never collides in pHash)."""
    image = np.random.default_rng(seed).integers(0, 256, (size, size)).astype(np.uint8)
    return cv2.imencode(".png", image)[1].tobytes()


def make_tree(root: Path, files: dict[str, bytes | int]) -> Path:
    """Write ``{relative path: bytes, or an int seed for a distinct PNG}`` under ``root``."""
    for relative, content in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(noise_png(content) if isinstance(content, int) else content)
    return root


def standard_tree(root: Path, per_class: dict[str, int], split: str = "Training") -> Path:
    files: dict[str, bytes | int] = {}
    seed = 0
    for label, count in per_class.items():
        for i in range(count):
            seed += 1
            files[f"{split}/{label}/Tr-{label[:2]}_{i:04d}.jpg"] = seed
    return make_tree(root, files)


def test_read_root_with_both_splits(tmp_path: Path) -> None:
    standard_tree(tmp_path, {"glioma": 3, "meningioma": 2, "notumor": 1, "pituitary": 4})
    standard_tree(tmp_path, {"glioma": 1, "pituitary": 2}, split="Testing")
    dataset = read_kaggle_folder(tmp_path)
    assert dataset.classes == KAGGLE_CLASSES
    assert dataset.counts() == {
        "Testing": {"glioma": 1, "meningioma": 0, "notumor": 0, "pituitary": 2},
        "Training": {"glioma": 3, "meningioma": 2, "notumor": 1, "pituitary": 4},
    }
    for record in dataset.records:
        assert record.path.parent.name == record.label == KAGGLE_CLASSES[record.label_index]
        assert record.path.parent.parent.name == record.split
    assert len(dataset.select("Testing")) == 3
    assert any("meningioma" in p and "missing" in p for p in dataset.problems)


@pytest.mark.parametrize("folder_name", ["Training", "my_copy"])
def test_read_split_folder_directly(tmp_path: Path, folder_name: str) -> None:
    standard_tree(tmp_path, {c: 2 for c in KAGGLE_CLASSES}, split=folder_name)
    dataset = read_kaggle_folder(tmp_path / folder_name)
    assert dataset.counts() == {folder_name: {c: 2 for c in KAGGLE_CLASSES}}
    assert dataset.problems == []


@pytest.mark.parametrize(
    "relative, content, included, problem",
    [
        ("Training/glioma/.DS_Store", b"\x00\x01", False, "hidden"),
        ("Training/glioma/._Tr-gl_0001.jpg", 7, False, "hidden"),
        ("Training/glioma/notes.txt", b"scanned on unit 3\n", False, "not an image"),
        ("Training/glioma/fake.jpg", b"<html>not found</html>", False, "not an image"),
        ("Training/glioma/empty.jpg", b"", False, "empty"),
        ("Training/glioma/extra/Tr-gl_9.jpg", 7, False, "nested"),
        ("Training/gliomas/Tr-gl_9.jpg", 7, False, "unknown class"),
        ("Training/README.md", b"# readme\n", False, "outside a class folder"),
        ("extras/x.jpg", 7, False, "not a Training or Testing"),
        ("Training/glioma/png_named.txt", 7, True, None),  # an image by content is kept
        ("Training/Glioma2/x.jpg", 7, False, "unknown class"),
    ],
)
def test_read_reports_problems(
    tmp_path: Path, relative: str, content: bytes | int, included: bool, problem: str | None
) -> None:
    standard_tree(tmp_path, {c: 1 for c in KAGGLE_CLASSES})
    make_tree(tmp_path, {relative: content})
    dataset = read_kaggle_folder(tmp_path)
    paths = {r.path.relative_to(tmp_path).as_posix() for r in dataset.records}
    assert (relative in paths) is included
    assert len(paths) == len(KAGGLE_CLASSES) + included
    if problem is None:
        assert dataset.problems == []
    else:
        assert len(dataset.problems) == 1 and problem in dataset.problems[0]


def test_read_class_folders_ignore_case(tmp_path: Path) -> None:
    standard_tree(tmp_path, {"Glioma": 2, "NOTUMOR": 1})
    counts = read_kaggle_folder(tmp_path).counts()["Training"]
    assert counts == {"glioma": 2, "meningioma": 0, "notumor": 1, "pituitary": 0}


@pytest.mark.parametrize(
    "files, target",
    [
        ({}, "missing_folder"),
        ({"scan.jpg": 1}, "scan.jpg"),  # a file, not a folder
        ({"empty/.keep": b""}, "empty"),  # an empty dataset folder (.keep removed below)
        ({"images/a.jpg": 1, "labels.csv": b"a,glioma\n"}, "."),  # no split or class folders
        ({"Training/glioma/.keep": b"", "Training/notumor/x.txt": b"hi"}, "."),  # no images
        ({"Training/tumour_a/x.jpg": 1}, "."),  # only unknown classes
    ],
)
def test_read_layout_errors(tmp_path: Path, files: dict, target: str) -> None:
    make_tree(tmp_path, files)
    root = tmp_path / target
    if target == "empty":
        (root / ".keep").unlink()
    with pytest.raises(DatasetLayoutError, match=r"Training\|Testing/<class>"):
        read_kaggle_folder(root)


@pytest.mark.parametrize("classes", [(), ("glioma", "Glioma"), ("glioma", "")])
def test_read_rejects_bad_classes(tmp_path: Path, classes: tuple) -> None:
    standard_tree(tmp_path, {"glioma": 1})
    with pytest.raises(ValueError, match="classes"):
        read_kaggle_folder(tmp_path, classes=classes)


def fake_records(per_class: dict[str, int], split: str = "Training") -> list[ImageRecord]:
    """Records that point nowhere: split_train_validation needs no files when groups are given."""
    return [
        ImageRecord(Path(f"/d/{split}/{label}/{i}.jpg"), label, KAGGLE_CLASSES.index(label), split)
        for label, count in per_class.items()
        for i in range(count)
    ]


PER_CLASS = {"glioma": 100, "meningioma": 200, "notumor": 300, "pituitary": 140}


@pytest.mark.parametrize("val_fraction", [0.1, 0.15, 0.3])
@pytest.mark.parametrize("max_group", [1, 4])
def test_split_is_stratified(val_fraction: float, max_group: int) -> None:
    records = fake_records(PER_CLASS)
    rng = np.random.default_rng(5)
    sizes = rng.integers(1, max_group + 1, len(records))
    groups = np.repeat(np.arange(len(records)), sizes)[: len(records)].tolist()  # same-class runs
    train, val = split_train_validation(records, val_fraction=val_fraction, seed=1, groups=groups)
    assert sorted(map(str, (r.path for r in train + val))) == sorted(str(r.path) for r in records)
    val_counts = Counter(r.label for r in val)
    for label, count in PER_CLASS.items():
        assert abs(val_counts[label] - count * val_fraction) <= max_group


def test_split_is_deterministic_and_seeded() -> None:
    records = fake_records(PER_CLASS)
    groups = list(range(len(records)))
    paths = lambda rs: [str(r.path) for r in rs]  # noqa: E731
    _, val_a = split_train_validation(records, seed=3, groups=groups)
    _, val_b = split_train_validation(records, seed=3, groups=groups)
    _, val_c = split_train_validation(records, seed=4, groups=groups)
    order = np.random.default_rng(0).permutation(len(records))
    _, val_d = split_train_validation([records[i] for i in order], seed=3, groups=groups)
    assert paths(val_a) == paths(val_b)
    assert paths(val_a) != paths(val_c)
    assert sorted(paths(val_a)) == sorted(paths(val_d))  # input order does not matter


@pytest.mark.parametrize("seed", range(4))
def test_split_keeps_planted_duplicates_together(tmp_path: Path, seed: int) -> None:
    files: dict[str, bytes | int] = {}
    for label_index, label in enumerate(KAGGLE_CLASSES):
        for i in range(10):
            files[f"Training/{label}/{i:02d}.png"] = 100 * label_index + i
            if i < 4:  # pairs: a byte-identical copy (i < 2) or a JPEG re-encoding (i >= 2)
                slice_ = phantom(100 * label_index + i, size=128)
                original = cv2.imencode(".png", slice_)[1].tobytes()
                reencoded = cv2.imencode(".jpg", slice_)[1].tobytes()  # OpenCV default quality 95
                files[f"Training/{label}/{i:02d}.png"] = original
                files[f"Training/{label}/{i:02d}_copy.jpg"] = original if i < 2 else reencoded
    dataset = read_kaggle_folder(make_tree(tmp_path, files))
    train, val = split_train_validation(dataset.records, val_fraction=0.3, seed=seed)
    val_names = {r.path.relative_to(tmp_path).as_posix() for r in val}
    pairs = [
        (f"Training/{c}/{i:02d}.png", f"Training/{c}/{i:02d}_copy.jpg")
        for c in KAGGLE_CLASSES
        for i in range(4)
    ]
    assert all((a in val_names) == (b in val_names) for a, b in pairs)
    assert len(val) + len(train) == 56


@pytest.mark.parametrize("val_fraction", [0, 1, 1.5, -0.1, float("nan"), "0.2", True])
def test_split_rejects_bad_val_fraction(val_fraction) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_validation(
            fake_records({"glioma": 4}), val_fraction=val_fraction, groups=[0, 1, 2, 3]
        )


@pytest.mark.parametrize(
    "kwargs, records, message",
    [
        ({"seed": -1}, fake_records({"glioma": 4}), "seed"),
        ({"seed": 1.5}, fake_records({"glioma": 4}), "seed"),
        ({}, [], "empty"),
        ({"groups": [0, 1]}, fake_records({"glioma": 4}), "groups"),
        ({}, fake_records({"glioma": 4}, split="Testing"), "Testing"),
    ],
)
def test_split_rejects_bad_arguments(kwargs: dict, records: list, message: str) -> None:
    kwargs.setdefault("groups", list(range(len(records))))
    with pytest.raises(ValueError, match=message):
        split_train_validation(records, **kwargs)


def test_dataset_fingerprint(tmp_path: Path) -> None:
    standard_tree(tmp_path / "a", {c: 2 for c in KAGGLE_CLASSES})
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    records_a = read_kaggle_folder(tmp_path / "a").records
    records_b = read_kaggle_folder(tmp_path / "b").records
    fingerprint = dataset_fingerprint(records_a)
    assert len(fingerprint) == 64 and int(fingerprint, 16) >= 0
    assert dataset_fingerprint(records_b) == fingerprint  # location does not matter
    assert dataset_fingerprint(records_a[::-1]) == fingerprint  # order does not matter
    assert dataset_fingerprint(records_a[1:]) != fingerprint
    records_b[0].path.write_bytes(records_b[0].path.read_bytes() + b"\x00")
    assert dataset_fingerprint(records_b) != fingerprint


@needs_kaggle
@pytest.mark.parametrize("root", [KAGGLE_TRAINING.parent, KAGGLE_TRAINING], ids=["root", "split"])
def test_read_real_kaggle_training(root: Path) -> None:
    dataset = read_kaggle_folder(root)
    expected = {"glioma": 1321, "meningioma": 1339, "notumor": 1595, "pituitary": 1457}
    assert dataset.counts() == {"Training": expected}
    assert len(dataset.records) == 5712 and dataset.problems == []


@needs_kaggle
def test_split_real_kaggle_training_keeps_duplicates_together() -> None:
    records = read_kaggle_folder(KAGGLE_TRAINING).records
    start = time.perf_counter()
    groups = group_duplicates([r.path for r in records])
    train, val = split_train_validation(records, val_fraction=0.15, seed=0, groups=groups)
    assert time.perf_counter() - start < 60
    side = {str(r.path): "val" for r in val} | {str(r.path): "train" for r in train}
    sides_of_group: dict[int, set[str]] = defaultdict(set)
    for record, group in zip(records, groups):
        sides_of_group[group].add(side[str(record.path)])
    assert all(len(sides) == 1 for sides in sides_of_group.values())
    assert len(sides_of_group) < len(records)  # duplicates exist, so the check means something
    val_counts, all_counts = Counter(r.label for r in val), Counter(r.label for r in records)
    for label, count in all_counts.items():
        assert abs(val_counts[label] / count - 0.15) < 0.01
