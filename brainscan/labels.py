"""Class names, BraTS labels, tumour regions and modality order: defined once, used everywhere.

BraTS label convention (2017-2021): 0 background, 1 necrotic / non-enhancing tumour core (NCR),
2 peritumoral edema (ED), 4 GD-enhancing tumour (ET). Networks predict contiguous class indices
0..3; :func:`brats_to_index` and :func:`index_to_brats` convert between the two.

BraTS 2023-2024 files number enhancing tumour 3 (labels {0, 1, 2, 3}) and name the modalities t1n,
t1c, t2w, t2f. brainscan keeps the 2017-2021 convention inside and converts at the edges:
:func:`from_convention` when a segmentation is read, :func:`to_convention` when a mask is written.
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
#: Output channels of a region-based network (nnU-Net's BraTS setup): nested WT ⊇ TC ⊇ ET sigmoids.
REGION_ORDER: tuple[str, ...] = ("WT", "TC", "ET")

#: Label conventions of BraTS segmentation files. Everything inside brainscan uses BRATS2021
#: (:data:`BRATS_LABELS`); files of the 2023-2024 challenges number enhancing tumour 3 instead of 4.
BRATS2021 = "brats2021"
BRATS2023 = "brats2023"
LABEL_CONVENTIONS: dict[str, tuple[int, ...]] = {BRATS2021: (0, 1, 2, 4), BRATS2023: (0, 1, 2, 3)}
#: How a convention is named in messages, and the file naming that goes with it.
CONVENTION_NAMES: dict[str, str] = {BRATS2021: "BraTS 2018-2021", BRATS2023: "BraTS 2023-2024"}
CONVENTION_FILE_NAMES: dict[str, str] = {
    BRATS2021: "<case>_{t1,t1ce,t2,flair,seg}.nii[.gz]",
    BRATS2023: "<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz",
}
#: BraTS 2023-2024 modality names (file suffixes) -> the names of :data:`MODALITIES`.
BRATS2023_MODALITIES: dict[str, str] = {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair"}

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


def brats_to_regions(seg: np.ndarray) -> np.ndarray:
    """BraTS labels ``(X, Y, Z)`` -> uint8 region masks ``(X, Y, Z, 3)`` in :data:`REGION_ORDER`.

    Raises:
        InvalidLabelsError: a value is not a BraTS label.
    """
    check_brats_labels(seg)
    return np.stack([np.isin(seg, REGIONS[r]) for r in REGION_ORDER], axis=-1).astype(np.uint8)


def regions_to_brats(probabilities: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Region probabilities ``(X, Y, Z, 3)`` (WT, TC, ET) -> BraTS labels ``(X, Y, Z)`` uint8.

    The regions are nested, so they are decoded from the outside in: a whole-tumour voxel is edema
    (2) unless it is also tumour core, which is necrosis (1) unless it is also enhancing (4). A core
    or enhancing call outside the whole tumour is dropped, as nnU-Net does.

    Raises:
        ValueError: not 3 channels, or a threshold outside (0, 1).
    """
    probabilities = np.asarray(probabilities)
    if probabilities.ndim < 1 or probabilities.shape[-1] != len(REGION_ORDER):
        raise ValueError(f"region probabilities need {len(REGION_ORDER)} channels {REGION_ORDER}, got {probabilities.shape}")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    whole = probabilities[..., 0] > threshold
    core = whole & (probabilities[..., 1] > threshold)
    enhancing = core & (probabilities[..., 2] > threshold)
    labels = np.zeros(probabilities.shape[:-1], dtype=np.uint8)
    labels[whole] = 2
    labels[core] = 1
    labels[enhancing] = 4
    return labels


def check_convention(convention: str) -> str:
    """Return ``convention`` if it is a key of :data:`LABEL_CONVENTIONS`, else raise ``ValueError``."""
    if convention not in LABEL_CONVENTIONS:
        raise ValueError(f"label convention must be one of {list(LABEL_CONVENTIONS)}, got {convention!r}")
    return convention


def convention_label_names(convention: str) -> dict[int, str]:
    """Label value -> short name (``"NCR"``, ``"ED"``, ``"ET"``) in ``convention``'s numbering."""
    check_convention(convention)
    return {file_label: BRATS_LABEL_NAMES[label]
            for file_label, label in zip(LABEL_CONVENTIONS[convention], BRATS_LABELS)}


def _check_convention_labels(values: np.ndarray, convention: str) -> None:
    allowed = LABEL_CONVENTIONS[convention]
    # labels stored as floats are named as the integers they are ("[4]", not "[4.0]")
    bad = [int(v) if float(v).is_integer() else v for v in np.unique(values).tolist() if v not in allowed]
    if not bad:
        return
    other = BRATS2023 if convention == BRATS2021 else BRATS2021
    hint = ""
    if set(bad) <= set(LABEL_CONVENTIONS[other]):
        theirs, ours = LABEL_CONVENTIONS[other][-1], allowed[-1]
        hint = (f"; {theirs} is enhancing tumour in {CONVENTION_NAMES[other]} files: if the labels follow that "
                f"convention, name the files {CONVENTION_FILE_NAMES[other]}, or map {theirs} -> {ours}")
    if convention == BRATS2023 and 4 in bad:
        hint += " (BraTS 2024 post-treatment glioma data marks the resection cavity 4, which brainscan does not model)"
    raise InvalidLabelsError(
        f"segmentation holds labels {bad[:10]} outside the {CONVENTION_NAMES[convention]} label set "
        f"{list(allowed)} of files named {CONVENTION_FILE_NAMES[convention]}{hint}"
    )


def from_convention(seg: np.ndarray, convention: str) -> np.ndarray:
    """Labels of a segmentation file in ``convention`` -> brainscan's labels {0, 1, 2, 4} (uint8).

    Args:
        seg: integer array of any shape, as read from a file of that convention.
        convention: :data:`BRATS2021` (returned as is) or :data:`BRATS2023` (3 becomes 4).

    Returns:
        uint8 array of the same shape.

    Raises:
        InvalidLabelsError: a value outside the convention's label set (e.g. a 4 in a 2023 file),
            with a message naming the convention.
        ValueError: an unknown convention.

    Example:
        >>> from_convention(np.array([0, 1, 2, 3]), BRATS2023).tolist()
        [0, 1, 2, 4]
    """
    check_convention(convention)
    seg = np.asarray(seg)
    _check_convention_labels(seg, convention)
    labels = seg.astype(np.uint8)
    if convention == BRATS2023:
        labels[labels == 3] = 4
    return labels


def to_convention(mask: np.ndarray, convention: str) -> np.ndarray:
    """brainscan's labels {0, 1, 2, 4} -> the labels of ``convention``, for writing a mask (uint8).

    Args:
        mask: integer array of any shape with BraTS 2018-2021 labels.
        convention: :data:`BRATS2021` (returned as is) or :data:`BRATS2023` (4 becomes 3).

    Returns:
        uint8 array of the same shape.

    Raises:
        InvalidLabelsError: ``mask`` holds a value outside {0, 1, 2, 4}.
        ValueError: an unknown convention.

    Example:
        >>> to_convention(np.array([0, 1, 2, 4]), BRATS2023).tolist()
        [0, 1, 2, 3]
    """
    check_convention(convention)
    mask = np.asarray(mask)
    check_brats_labels(mask)
    labels = mask.astype(np.uint8)
    if convention == BRATS2023:
        labels[labels == 4] = 3
    return labels


def region_mask(seg: np.ndarray, region: str) -> np.ndarray:
    """Boolean mask of a BraTS region (``"WT"``, ``"TC"``, ``"ET"``) in a BraTS-labelled array."""
    if region not in REGIONS:
        raise ValueError(f"region must be one of {list(REGIONS)}, got {region!r}")
    return np.isin(seg, REGIONS[region])
