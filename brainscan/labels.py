"""Class names, BraTS labels, tumour regions and modality order: defined once, used everywhere.

BraTS label convention (2017-2021): 0 background, 1 necrotic / non-enhancing tumour core (NCR),
2 peritumoral edema (ED), 4 GD-enhancing tumour (ET). Networks predict contiguous class indices
0..3; :func:`brats_to_index` and :func:`index_to_brats` convert between the two.
"""

from __future__ import annotations

import numpy as np

from brainscan.errors import InvalidLabelsError

#: Kaggle Brain Tumor MRI classes, in the order of the folders (alphabetical) and of model outputs.
KAGGLE_CLASSES: tuple[str, ...] = ("glioma", "meningioma", "notumor", "pituitary")

#: Channel order of every 4-modality array and of 4D NIfTI uploads.
MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")

#: BraTS label values, in the order of the network's output channels.
BRATS_LABELS: tuple[int, ...] = (0, 1, 2, 4)
BRATS_LABEL_NAMES: dict[int, str] = {0: "background", 1: "NCR", 2: "ED", 4: "ET"}
BRATS_LABEL_DESCRIPTIONS: dict[int, str] = {
    0: "background",
    1: "necrotic / non-enhancing tumour core",
    2: "peritumoral edema",
    4: "GD-enhancing tumour",
}

#: BraTS evaluation regions: whole tumour, tumour core, enhancing tumour.
REGIONS: dict[str, tuple[int, ...]] = {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}
REGION_NAMES: dict[str, str] = {"WT": "whole tumour", "TC": "tumour core", "ET": "enhancing tumour"}

_TO_INDEX = np.zeros(5, dtype=np.uint8)
for _index, _label in enumerate(BRATS_LABELS):
    _TO_INDEX[_label] = _index
_TO_LABEL = np.asarray(BRATS_LABELS, dtype=np.uint8)


def check_brats_labels(seg: np.ndarray) -> None:
    """Raise :class:`InvalidLabelsError` if ``seg`` holds values outside {0, 1, 2, 4}."""
    values = np.unique(seg)
    bad = [v for v in values.tolist() if v not in BRATS_LABELS]
    if bad:
        raise InvalidLabelsError(
            f"segmentation holds labels {bad[:10]} outside the BraTS set {list(BRATS_LABELS)}"
        )


def brats_to_index(seg: np.ndarray) -> np.ndarray:
    """Map BraTS labels {0,1,2,4} to class indices {0,1,2,3}.

    Args:
        seg: integer array of any shape.

    Returns:
        uint8 array of the same shape.

    Raises:
        InvalidLabelsError: if a value is not a BraTS label.
    """
    check_brats_labels(seg)
    return _TO_INDEX[np.asarray(seg, dtype=np.int64)]


def index_to_brats(index: np.ndarray) -> np.ndarray:
    """Map class indices {0,1,2,3} back to BraTS labels {0,1,2,4} (uint8, same shape)."""
    index = np.asarray(index)
    if index.size and (index.min() < 0 or index.max() >= len(BRATS_LABELS)):
        raise InvalidLabelsError(f"class indices must be in 0..{len(BRATS_LABELS) - 1}")
    return _TO_LABEL[index.astype(np.int64)]


def region_mask(seg: np.ndarray, region: str) -> np.ndarray:
    """Boolean mask of a BraTS region (``"WT"``, ``"TC"``, ``"ET"``) in a BraTS-labelled array."""
    if region not in REGIONS:
        raise ValueError(f"region must be one of {list(REGIONS)}, got {region!r}")
    return np.isin(seg, REGIONS[region])
