"""Reader for the Kaggle "Brain Tumor MRI Dataset" layout, and a duplicate-aware validation split.

Layout, exactly as published::

    <root>/Training/<class>/*.jpg
    <root>/Testing/<class>/*.jpg        (the official test split; never tune on it)

with classes ``glioma``, ``meningioma``, ``notumor``, ``pituitary`` (:data:`KAGGLE_CLASSES`).
:func:`read_kaggle_folder` also accepts a split folder directly (one that holds the class
folders). Files are recognised as images by content (magic bytes), like uploads; anything else
(hidden files, notes, unknown class folders) is skipped and listed in ``KaggleDataset.problems``
so that a careless copy is noticed instead of silently training on less data.

Example:
    >>> dataset = read_kaggle_folder(Path("../shared/data/brain-tumor-mri"))
    >>> dataset.counts()["Training"]["glioma"]
    1321
    >>> train, val = split_train_validation(dataset.select("Training"), val_fraction=0.15)
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from brainscan.data.dedup import group_duplicates
from brainscan.errors import DatasetLayoutError
from brainscan.labels import KAGGLE_CLASSES
from brainscan.preprocess.image2d import sniff_format

#: Official split folder names of the Kaggle dataset.
SPLIT_NAMES: tuple[str, ...] = ("Training", "Testing")
_LAYOUT_HELP = (
    "expected layout: <root>/Training|Testing/<class>/*.jpg|png, or a split folder holding "
    "<class>/*.jpg|png directly, with class folders named {classes}"
)


@dataclass(frozen=True)
class ImageRecord:
    """One labelled image file.

    Attributes:
        path: the image file.
        label: class name, one of the dataset's ``classes``.
        label_index: position of ``label`` in ``classes`` (the model's output index).
        split: ``"Training"``/``"Testing"``, or the folder's name when a split folder was read.
    """

    path: Path
    label: str
    label_index: int
    split: str


@dataclass
class KaggleDataset:
    """The images found under a Kaggle-layout folder, plus what was skipped and why."""

    records: list[ImageRecord]
    classes: tuple[str, ...]
    problems: list[str] = field(default_factory=list)
    root: Path | None = None

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per split and class, ``{split: {class: n}}``; absent classes count 0."""
        counts: dict[str, dict[str, int]] = {}
        for record in self.records:
            per_class = counts.setdefault(record.split, dict.fromkeys(self.classes, 0))
            per_class[record.label] += 1
        return counts

    def select(self, split: str) -> list[ImageRecord]:
        """The records of one split (e.g. ``"Training"``)."""
        return [record for record in self.records if record.split == split]


def _check_classes(classes: Sequence[str]) -> tuple[str, ...]:
    classes = tuple(classes)
    if not classes or any(not isinstance(c, str) or not c for c in classes):
        raise ValueError(f"classes must be a non-empty sequence of names, got {classes!r}")
    if len({c.lower() for c in classes}) != len(classes):
        raise ValueError(f"classes must be unique (ignoring case), got {classes!r}")
    return classes


def _scan_class_folder(
    folder: Path, label: str, index: int, split: str, root: Path, problems: list[str]
) -> list[ImageRecord]:
    records = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        where = Path(entry.path).relative_to(root)
        if entry.name.startswith("."):
            problems.append(f"{where}: hidden file ignored")
        elif entry.is_dir():
            problems.append(f"{where}: nested folder ignored (images must sit in the class folder)")
        else:
            with open(entry.path, "rb") as handle:
                head = handle.read(16)
            if not head:
                problems.append(f"{where}: empty file ignored")
            elif sniff_format(head) is None:
                problems.append(f"{where}: not an image (judged by content), ignored")
            else:
                records.append(ImageRecord(Path(entry.path), label, index, split))
    return records


def _scan_split(
    folder: Path, split: str, classes: tuple[str, ...], root: Path, problems: list[str]
) -> list[ImageRecord]:
    by_name = {c.lower(): (i, c) for i, c in enumerate(classes)}
    records: list[ImageRecord] = []
    found: set[str] = set()
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        where = Path(entry.path).relative_to(root)
        if entry.name.startswith("."):
            problems.append(f"{where}: hidden entry ignored")
        elif not entry.is_dir():
            problems.append(f"{where}: file outside a class folder ignored")
        elif entry.name.lower() not in by_name:
            problems.append(f"{where}: unknown class folder ignored (classes are {list(classes)})")
        else:
            index, label = by_name[entry.name.lower()]
            found.add(label)
            records += _scan_class_folder(Path(entry.path), label, index, split, root, problems)
    for label in classes:
        if label not in found:
            problems.append(f"{split}: class folder {label!r} is missing")
    return records


def read_kaggle_folder(
    root: Path | str, *, classes: Sequence[str] = KAGGLE_CLASSES
) -> KaggleDataset:
    """Find the labelled images of a Kaggle-layout dataset.

    Args:
        root: the dataset root (holding ``Training/`` and/or ``Testing/``) or one split folder
            (holding the class folders). Folder names match ignoring case.
        classes: class names in model output order.

    Returns:
        a :class:`KaggleDataset`; records are sorted by split, class folder and file name.

    Raises:
        DatasetLayoutError: ``root`` is not a folder, holds neither split nor class folders, or
            no image was found.
        ValueError: ``classes`` is empty or has repeated names.
    """
    classes = _check_classes(classes)
    root = Path(root)
    help_text = _LAYOUT_HELP.format(classes=", ".join(classes))
    if not root.is_dir():
        raise DatasetLayoutError(f"{root} is not a folder; {help_text}")
    entries = sorted(os.scandir(root), key=lambda e: e.name)
    split_dirs = [e for e in entries if e.is_dir() and e.name.lower() in {"training", "testing"}]
    class_names = {c.lower() for c in classes}
    class_dirs = [e for e in entries if e.is_dir() and e.name.lower() in class_names]
    problems: list[str] = []
    records: list[ImageRecord] = []
    if split_dirs:
        for entry in entries:
            if entry not in split_dirs:
                problems.append(f"{entry.name}: ignored (not a Training or Testing folder)")
        for entry in split_dirs:
            records += _scan_split(Path(entry.path), entry.name, classes, root, problems)
    elif class_dirs:
        records = _scan_split(root, root.name, classes, root, problems)
    else:
        seen = [e.name for e in entries if not e.name.startswith(".")][:10]
        raise DatasetLayoutError(
            f"{root} holds no Training/Testing or class folders (found {seen or 'nothing'}); "
            f"{help_text}"
        )
    if not records:
        raise DatasetLayoutError(
            f"no images found under {root}; {help_text}. Problems: {problems[:5]}"
        )
    return KaggleDataset(records=records, classes=classes, problems=problems, root=root)


def training_records(
    dataset: KaggleDataset, *, max_per_class: int | None = None, seed: int = 0
) -> list[ImageRecord]:
    """The records a classifier may train and select on: every split but Testing.

    ``brainscan train classifier`` and ``brainscan evaluate --validation-split`` both call this, so
    that evaluation rebuilds exactly the images training saw.

    Args:
        dataset: from :func:`read_kaggle_folder`.
        max_per_class: keep a seeded random sample of at most this many images per class (smoke
            runs); ``None`` keeps all.
        seed: the sample's seed.

    Raises:
        DatasetLayoutError: no image outside a Testing split.
    """
    records = [r for r in dataset.records if r.split.lower() != "testing"]
    if not records:
        raise DatasetLayoutError(
            f"{dataset.root} holds no training images outside a Testing split; the Testing split is an "
            "independent test set and is never used for training or model selection"
        )
    if max_per_class:
        rng = np.random.default_rng(seed)
        kept: list[ImageRecord] = []
        for name in dataset.classes:
            of_class = [r for r in records if r.label == name]
            rng.shuffle(of_class)
            kept.extend(of_class[:max_per_class])
        records = sorted(kept, key=lambda r: str(r.path))
    return records


def split_train_validation(
    records: Sequence[ImageRecord],
    *,
    val_fraction: float = 0.15,
    seed: int = 0,
    groups: Sequence[int] | None = None,
    workers: int | None = None,
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Split training records into train and validation, stratified by class, duplicate-aware.

    Duplicates (byte-identical files or equal perceptual hash, see
    :func:`brainscan.data.dedup.group_duplicates`) always land on the same side, so validation
    accuracy is not inflated by images the model trained on. Each group counts toward the class of
    the majority of its members; per class, whole groups are drawn in a seeded random order until
    the validation share reaches ``round(n_class * val_fraction)`` images.

    Args:
        records: records of one training split (never the official Testing split).
        val_fraction: share of each class to put in validation, in (0, 1).
        seed: non-negative integer; the same seed and records give the same split.
        groups: duplicate group id per record, if already computed; otherwise the images are
            read and hashed (about a second for the 5,712-image Kaggle training split).
        workers: decoding threads when hashing (``None``: automatic).

    Returns:
        ``(train, validation)``, each in the input order.

    Raises:
        ValueError: empty records, a bad ``val_fraction`` or ``seed``, ``groups`` of the wrong
            length, or records from a split named Testing.
    """
    records = list(records)
    if not records:
        raise ValueError("records is empty: nothing to split")
    is_number = isinstance(val_fraction, (int, float)) and not isinstance(val_fraction, bool)
    if not is_number or not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    testing = sorted({r.split for r in records if r.split.lower() == "testing"})
    if testing:
        raise ValueError(
            f"records include the {testing[0]!r} split; validation must come from training data"
        )
    if groups is None:
        groups = group_duplicates([r.path for r in records], workers=workers)
    groups = list(groups)
    if len(groups) != len(records):
        raise ValueError(f"groups has {len(groups)} ids for {len(records)} records")

    members: dict[int, list[int]] = defaultdict(list)
    for index, group in enumerate(groups):
        members[group].append(index)
    by_class: dict[int, list[list[int]]] = defaultdict(list)
    # Sorting by path makes the split independent of the order the records came in.
    for indices in sorted(members.values(), key=lambda ix: min(str(records[i].path) for i in ix)):
        votes = Counter(records[i].label_index for i in indices)
        majority = min(votes, key=lambda label: (-votes[label], label))
        by_class[majority].append(indices)

    in_validation = np.zeros(len(records), dtype=bool)
    for label_index in sorted(by_class):
        class_groups = by_class[label_index]
        target = round(sum(len(g) for g in class_groups) * val_fraction)
        taken = 0
        order = np.random.default_rng([seed, label_index]).permutation(len(class_groups))
        for position in order:
            if taken >= target:
                break
            group = class_groups[position]
            if taken + len(group) <= target:
                in_validation[group] = True
                taken += len(group)
    train = [r for r, v in zip(records, in_validation) if not v]
    validation = [r for r, v in zip(records, in_validation) if v]
    return train, validation


def dataset_fingerprint(records: Sequence[ImageRecord]) -> str:
    """SHA-256 over the sorted ``split/class folder/file name`` and file sizes of the records.

    Written into model manifests so that a model says which data it was trained on; it does not
    depend on where the dataset is stored, and changes when a file is added, removed or replaced
    by one of a different size.
    """
    lines = sorted(
        f"{r.split}/{r.path.parent.name}/{r.path.name}\t{r.path.stat().st_size}\n" for r in records
    )
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line.encode("utf-8"))
    return digest.hexdigest()
