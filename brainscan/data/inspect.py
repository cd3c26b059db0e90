"""Recognise what a folder holds (Kaggle layout, one BraTS case, a BraTS dataset) and describe it.

Used by ``brainscan data inspect`` and by the training and evaluation commands, which accept any
of the three and need to know which one they were given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from brainscan.errors import DatasetLayoutError

KAGGLE = "kaggle"
BRATS_CASE = "brats_case"
BRATS_DATASET = "brats_dataset"

_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def _is_nifti(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(_NIFTI_SUFFIXES) and not path.name.startswith(".")


def _has_images(folder: Path) -> bool:
    return any(p.suffix.lower() in _IMAGE_SUFFIXES for p in folder.iterdir() if p.is_file())


def detect_layout(path: str | Path) -> str:
    """Say which dataset layout ``path`` follows.

    Returns:
        ``"kaggle"`` (``Training|Testing/<class>/*.jpg`` or a split folder of class folders),
        ``"brats_case"`` (a folder of ``<case>_{t1,t1ce,t2,flair}.nii[.gz]``, or of BraTS 2023-2024
        ``<case>-{t1n,t1c,t2w,t2f}.nii.gz``) or ``"brats_dataset"`` (a folder of such case folders).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        DatasetLayoutError: if it is none of these.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if not path.is_dir():
        raise DatasetLayoutError(f"{path} is a file; give a dataset folder or a BraTS case folder")
    children = [p for p in path.iterdir() if not p.name.startswith(".")]
    if any(_is_nifti(p) for p in children):
        return BRATS_CASE
    subdirs = [p for p in children if p.is_dir()]
    if any(p.name in ("Training", "Testing") for p in subdirs):
        return KAGGLE
    if any(any(_is_nifti(f) for f in d.iterdir()) for d in subdirs):
        return BRATS_DATASET
    if subdirs and any(_has_images(d) for d in subdirs):
        return KAGGLE
    raise DatasetLayoutError(
        f"{path} is neither a Kaggle Brain Tumor MRI folder (Training|Testing/<class>/*.jpg), "
        "a BraTS case folder (<case>_t1.nii.gz, _t1ce, _t2, _flair[, _seg], or BraTS 2023-2024 "
        "<case>-t1n.nii.gz, -t1c, -t2w, -t2f[, -seg]) nor a folder of BraTS case folders"
    )


def inspect_path(path: str | Path, *, read_data: bool = True) -> dict[str, Any]:
    """Describe a dataset folder: ``{"layout": ..., "path": ..., **details, "problems": [...]}``.

    Kaggle: counts per split and class. BraTS case: label convention (2018-2021 or 2023-2024 naming),
    modalities, shape, spacing, labels (as stored in the files) and their voxel counts. BraTS dataset:
    the same per case. Problems are collected, not raised, so that one broken
    case does not hide the others. ``read_data=False`` reads NIfTI headers only (fast on a whole
    dataset, but no label counts and no check of the voxel values).
    """
    path = Path(path)
    layout = detect_layout(path)
    if layout == KAGGLE:
        from brainscan.data.kaggle import read_kaggle_folder

        dataset = read_kaggle_folder(path)
        counts = dataset.counts()
        return {
            "layout": layout,
            "path": str(path),
            "classes": list(dataset.classes),
            "counts": counts,
            "total": sum(sum(per_class.values()) for per_class in counts.values()),
            "problems": list(dataset.problems),
        }
    from brainscan.data import brats_inspect as brats

    if layout == BRATS_CASE:
        return {"layout": layout, "path": str(path), **brats.inspect_case(path, read_data=read_data)}
    return {"layout": layout, "path": str(path), **brats.inspect_dataset(path, read_data=read_data)}
