"""Segmentation metrics for BraTS label maps (0 background, 1 NCR, 2 ED, 4 ET).

Scores follow the BraTS challenge: overlap (Dice, IoU, sensitivity, specificity) and the 95th
percentile Hausdorff distance in millimetres, for the evaluation regions WT/TC/ET
(:data:`brainscan.labels.REGIONS`) and for the individual labels. Volumes in millilitres come from
:func:`volumes_ml`, which the segmenter service also reports, so the numbers a user sees and the
numbers an evaluation reports are computed by the same code.

Conventions for empty masks (``P`` prediction, ``T`` truth):

- Dice and IoU: both empty -> 1.0 (nothing to find and nothing found), exactly one empty -> 0.0.
- Sensitivity ``TP / |T|`` is undefined (NaN, ``null`` in JSON) when ``T`` is empty; specificity
  ``TN / |not T|`` is undefined when ``T`` fills the whole volume.
- HD95: both empty -> 0.0; exactly one empty -> NaN (``null`` in JSON) unless ``hd95_empty_value``
  is given. The BraTS challenge scores that case as 373.13 mm (the image diagonal).

JSON layout of :func:`segmentation_metrics` (every float is finite or ``null``)::

    {
      "WT": {"dice", "iou", "sensitivity", "specificity", "hd95", "volume_ml", "volume_ml_truth"},
      "TC": {...}, "ET": {...},                  # regions, keys exactly as labels.REGIONS
      "labels": {"NCR": {...}, "ED": {...}, "ET": {...}},   # single labels, same metric keys
      "mean_iou": float,
      "spacing": [sx, sy, sz]
    }

Per-label entries are named by :data:`brainscan.labels.BRATS_LABEL_NAMES` and nested under
``"labels"``, so ``report["ET"]`` (region) and ``report["labels"]["ET"]`` (label 4) never collide;
the two hold the same numbers because the ET region is label 4 alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from brainscan.errors import EmptyInputError, VolumeMismatchError
from brainscan.labels import BRATS_LABEL_NAMES, BRATS_LABELS, REGIONS, check_brats_labels

#: HD95 the BraTS challenge assigns when exactly one of prediction and truth is empty (mm).
BRATS_HD95_EMPTY_VALUE = 373.13

_METRIC_KEYS = ("dice", "iou", "sensitivity", "specificity", "hd95", "volume_ml", "volume_ml_truth")
_LABEL_NAMES = {label: BRATS_LABEL_NAMES[label] for label in BRATS_LABELS if label != 0}


def _check_spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    values = tuple(float(s) for s in spacing)
    if len(values) != ndim:
        raise ValueError(f"spacing must have {ndim} values (one per axis), got {tuple(spacing)}")
    if not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(f"spacing must be finite and positive (mm), got {tuple(spacing)}")
    return values


def _check_masks(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape:
        raise VolumeMismatchError(
            f"prediction shape {pred.shape} differs from ground truth shape {truth.shape}"
        )
    if pred.ndim == 0 or pred.size == 0:
        raise EmptyInputError(f"masks must be non-empty arrays, got shape {pred.shape}")
    return pred, truth


def _safe_ratio(numerator: int, denominator: int) -> float:
    return numerator / denominator if denominator else math.nan


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient ``2|P∩T| / (|P| + |T|)`` of two binary masks; both empty -> 1.0.

    Raises:
        VolumeMismatchError: if the shapes differ.
    """
    pred, truth = _check_masks(pred, truth)
    pred, truth = pred.astype(bool), truth.astype(bool)
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(truth))
    return 2.0 * int(np.count_nonzero(pred & truth)) / total if total else 1.0


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union (Jaccard) of two binary masks; both empty -> 1.0.

    Raises:
        VolumeMismatchError: if the shapes differ.
    """
    pred, truth = _check_masks(pred, truth)
    pred, truth = pred.astype(bool), truth.astype(bool)
    union = int(np.count_nonzero(pred | truth))
    return int(np.count_nonzero(pred & truth)) / union if union else 1.0


def _surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it (voxels on the array border count)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def hd95(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float] | None = None,
    *,
    empty_value: float = math.nan,
) -> float:
    """95th percentile symmetric surface distance (HD95) between two binary masks, in mm.

    Surface voxels are a mask minus its erosion (face connectivity). The distances from every
    prediction surface voxel to the nearest truth surface voxel and from every truth surface voxel
    to the nearest prediction surface voxel are pooled, and their 95th percentile (linear
    interpolation, as MedPy's ``hd95``) is returned. Distances come from
    ``scipy.ndimage.distance_transform_edt(sampling=spacing)`` on the complement of each surface,
    computed only inside the bounding box of both masks: every surface voxel lies in that box, so
    the result is exact and a 240x240x155 volume costs a tumour-sized transform.

    Args:
        pred: binary mask, any number of dimensions.
        truth: binary mask of the same shape.
        spacing: voxel size in mm per axis (default 1 mm isotropic).
        empty_value: returned when exactly one mask is empty (default NaN; BraTS uses
            :data:`BRATS_HD95_EMPTY_VALUE`). Both empty -> 0.0.

    Returns:
        HD95 in mm.

    Raises:
        VolumeMismatchError: if the shapes differ.
        ValueError: if ``spacing`` does not have one positive value per axis.
    """
    pred, truth = _check_masks(pred, truth)
    sampling = _check_spacing(spacing, pred.ndim)
    pred, truth = pred.astype(bool), truth.astype(bool)
    pred_any, truth_any = bool(pred.any()), bool(truth.any())
    if not pred_any and not truth_any:
        return 0.0
    if not pred_any or not truth_any:
        return float(empty_value)

    # Cropping to the bounding box of both masks changes no surface voxel: a mask voxel on the
    # box's edge has its outward neighbour outside both masks, so it is surface either way.
    box = ndimage.find_objects((pred | truth).astype(np.uint8))[0]
    pred_surface, truth_surface = _surface(pred[box]), _surface(truth[box])
    to_truth = ndimage.distance_transform_edt(~truth_surface, sampling=sampling)[pred_surface]
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=sampling)[truth_surface]
    return float(np.percentile(np.concatenate([to_truth, to_pred]), 95))


def volumes_ml(mask: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """Volumes of the BraTS regions and labels of a label map, in millilitres.

    Args:
        mask: BraTS label map (values in {0, 1, 2, 4}), e.g. shape (240, 240, 155).
        spacing: voxel size in mm per axis.

    Returns:
        ``{"WT", "TC", "ET", "NCR", "ED"}`` -> mL (voxel count x voxel volume in mm^3 / 1000).

    Raises:
        InvalidLabelsError: if ``mask`` holds a value outside {0, 1, 2, 4}.
        ValueError: if ``spacing`` does not have one positive value per axis.
    """
    mask = np.asarray(mask)
    check_brats_labels(mask)
    return _volumes_from_counts({label: int(np.count_nonzero(mask == label)) for label in BRATS_LABELS},
                                _check_spacing(spacing, mask.ndim))


def _volumes_from_counts(counts: dict[int, int], sampling: Sequence[float]) -> dict[str, float]:
    """:func:`volumes_ml` from the voxel count of each BraTS label."""
    voxel_ml = float(np.prod(sampling)) / 1000.0
    result = {
        region: sum(counts[label] for label in labels) * voxel_ml
        for region, labels in REGIONS.items()
    }
    # Label 4 is the ET region itself, so only NCR and ED add new keys.
    for label, name in _LABEL_NAMES.items():
        result.setdefault(name, counts[label] * voxel_ml)
    return result


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _overlap_metrics(confusion: np.ndarray, pred_labels: tuple[int, ...],
                     truth_labels: tuple[int, ...]) -> dict[str, float]:
    """Dice/IoU/sensitivity/specificity from the 4x4 label confusion (rows pred, cols truth)."""
    pred_in = np.isin(BRATS_LABELS, pred_labels)
    truth_in = np.isin(BRATS_LABELS, truth_labels)
    tp = int(confusion[np.ix_(pred_in, truth_in)].sum())
    fp = int(confusion[np.ix_(pred_in, ~truth_in)].sum())
    fn = int(confusion[np.ix_(~pred_in, truth_in)].sum())
    tn = int(confusion.sum()) - tp - fp - fn
    return {
        "dice": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0,
        "iou": tp / (tp + fp + fn) if tp + fp + fn else 1.0,
        "sensitivity": _safe_ratio(tp, tp + fn),
        "specificity": _safe_ratio(tn, tn + fp),
    }


def mean_iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean IoU over the 4 classes background, NCR, ED, ET of two BraTS label maps.

    A class absent from both maps is left out of the mean (its IoU would be 0/0), as
    ``keras.metrics.MeanIoU`` does, so the value matches the training-time metric.

    Raises:
        VolumeMismatchError: if the shapes differ.
        InvalidLabelsError: if a map holds a value outside {0, 1, 2, 4}.
    """
    pred, truth = _check_masks(pred, truth)
    check_brats_labels(pred)
    check_brats_labels(truth)
    return _mean_iou(_label_confusion(pred, truth))


def _label_confusion(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """4x4 voxel counts, rows = predicted class index, cols = true class index (one pass)."""
    lookup = np.zeros(max(BRATS_LABELS) + 1, dtype=np.uint8)
    lookup[list(BRATS_LABELS)] = np.arange(len(BRATS_LABELS), dtype=np.uint8)
    n = len(BRATS_LABELS)
    # Integer maps index the lookup directly; float maps (holding 0.0/1.0/...) are cast first.
    pred_index = lookup[pred if pred.dtype.kind in "iu" else pred.astype(np.intp)]
    truth_index = lookup[truth if truth.dtype.kind in "iu" else truth.astype(np.intp)]
    pair = pred_index * np.uint8(n) + truth_index
    return np.bincount(pair.ravel(), minlength=n * n).reshape(n, n)


def _mean_iou(confusion: np.ndarray) -> float:
    intersection = np.diag(confusion).astype(np.float64)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - intersection
    present = union > 0
    return float(np.mean(intersection[present] / union[present]))


def segmentation_metrics(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    *,
    hd95_empty_value: float | None = None,
) -> dict[str, Any]:
    """All BraTS metrics of one predicted label map against its ground truth.

    Args:
        pred: predicted BraTS label map, shape (X, Y, Z), values in {0, 1, 2, 4}.
        truth: ground-truth label map of the same shape.
        spacing: voxel size in mm per axis (e.g. ``Volume.spacing``).
        hd95_empty_value: HD95 reported when exactly one of prediction and truth is empty;
            ``None`` (default) reports ``null``, :data:`BRATS_HD95_EMPTY_VALUE` scores as BraTS.

    Returns:
        JSON-serialisable dict (layout in the module docstring); undefined values are ``None``.

    Raises:
        VolumeMismatchError: if the shapes differ.
        EmptyInputError: if the arrays are empty.
        InvalidLabelsError: if a map holds a value outside {0, 1, 2, 4}.
        ValueError: if ``spacing`` does not have one positive value per axis.
    """
    pred, truth = _check_masks(pred, truth)
    pred_size = pred.size
    check_brats_labels(pred)
    check_brats_labels(truth)
    sampling = _check_spacing(spacing, pred.ndim)
    empty_value = math.nan if hd95_empty_value is None else float(hd95_empty_value)
    # Outside the bounding box of every labelled voxel of both maps, both are background: those voxels
    # only add true negatives, and cropping changes no surface voxel of any region (see hd95). A
    # 240x240x155 case then costs a tumour-sized pass instead of a dozen whole-volume ones.
    box = ndimage.find_objects(((pred != 0) | (truth != 0)).astype(np.uint8))
    if box:
        pred, truth = pred[box[0]], truth[box[0]]
    else:
        corner = tuple(slice(0, 1) for _ in range(pred.ndim))  # both all background: one voxel stands for all
        pred, truth = pred[corner], truth[corner]
    confusion = _label_confusion(pred, truth)
    confusion[0, 0] += pred_size - pred.size
    pred_volumes = _volumes_from_counts(dict(zip(BRATS_LABELS, confusion.sum(axis=1).tolist())), sampling)
    truth_volumes = _volumes_from_counts(dict(zip(BRATS_LABELS, confusion.sum(axis=0).tolist())), sampling)

    def entry(name: str, labels: tuple[int, ...]) -> dict[str, float | None]:
        metrics: dict[str, float] = _overlap_metrics(confusion, labels, labels)
        metrics["hd95"] = hd95(
            np.isin(pred, labels), np.isin(truth, labels), sampling, empty_value=empty_value
        )
        metrics["volume_ml"] = pred_volumes[name]
        metrics["volume_ml_truth"] = truth_volumes[name]
        return {key: _json_float(metrics[key]) for key in _METRIC_KEYS}

    report: dict[str, Any] = {region: entry(region, labels) for region, labels in REGIONS.items()}
    report["labels"] = {}
    for label, name in _LABEL_NAMES.items():
        # The ET region is label 4 alone: reuse it instead of a second distance transform.
        same_region = next((r for r, ls in REGIONS.items() if ls == (label,)), None)
        report["labels"][name] = (
            dict(report[same_region]) if same_region else entry(name, (label,))
        )
    report["mean_iou"] = _mean_iou(confusion)
    report["spacing"] = list(sampling)
    return report


def _defined(values: list[Any]) -> list[float]:
    """The values that are numbers, without ``None`` and NaN."""
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def _summary(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"mean": None, "median": None, "std": None, "n": 0}
    array = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(array.mean()),
        "median": float(np.median(array)),
        "std": float(array.std()),
        "n": len(values),
    }


def aggregate_cases(cases: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean, median and standard deviation of per-case :func:`segmentation_metrics` dicts.

    Missing values (``None`` / NaN, e.g. HD95 where one mask is empty) are left out of each
    statistic, and ``n`` says how many cases it used; ``std`` is the population standard deviation
    (``ddof=0``).

    Args:
        cases: dicts returned by :func:`segmentation_metrics` (or read back from JSON).

    Returns:
        ``{"n_cases": N, "WT": {metric: {"mean", "median", "std", "n"}}, "TC": ..., "ET": ...,
        "labels": {"NCR": {...}, "ED": {...}, "ET": {...}}, "mean_iou": {"mean", ...}}``.

    Raises:
        EmptyInputError: if ``cases`` is empty.
        ValueError: if a case lacks a region or label entry.
    """
    if len(cases) == 0:
        raise EmptyInputError("aggregate_cases needs at least one case")

    def entry(index: int, path: tuple[str, ...]) -> dict[str, Any]:
        node: Any = cases[index]
        for key in path:
            if not isinstance(node, dict) or key not in node:
                raise ValueError(
                    f"case {index} lacks {'/'.join(path)}; expected segmentation_metrics dicts"
                )
            node = node[key]
        return node

    def summarise(path: tuple[str, ...]) -> dict[str, dict[str, float | int | None]]:
        entries = [entry(i, path) for i in range(len(cases))]
        return {
            metric: _summary(_defined([e.get(metric) for e in entries]))
            for metric in _METRIC_KEYS
        }

    result: dict[str, Any] = {"n_cases": len(cases)}
    for region in REGIONS:
        result[region] = summarise((region,))
    result["labels"] = {name: summarise(("labels", name)) for name in _LABEL_NAMES.values()}
    result["mean_iou"] = _summary(_defined([case.get("mean_iou") for case in cases]))
    return result
