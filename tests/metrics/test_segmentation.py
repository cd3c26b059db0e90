"""Tests of brainscan.metrics.segmentation: hand-computed overlaps, conventions, HD95."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from scipy import ndimage

from brainscan.errors import EmptyInputError, InvalidLabelsError, VolumeMismatchError
from brainscan.labels import REGIONS
from brainscan.metrics.segmentation import (
    BRATS_HD95_EMPTY_VALUE,
    aggregate_cases,
    dice,
    hd95,
    iou,
    mean_iou,
    segmentation_metrics,
    volumes_ml,
)

METRIC_KEYS = {"dice", "iou", "sensitivity", "specificity", "hd95", "volume_ml", "volume_ml_truth"}


def _ball(shape: tuple[int, ...], centre: tuple[float, ...], radius: float) -> np.ndarray:
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


def _brute_force_hd95(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...]) -> float:
    """HD95 from all pairwise distances between surface voxels (no erosion, no distance map)."""

    def surface_points(mask: np.ndarray) -> np.ndarray:
        padded = np.pad(mask, 1, constant_values=False)
        points = []
        for index in zip(*np.nonzero(mask)):
            for axis in range(mask.ndim):
                for step in (-1, 1):
                    neighbour = list(np.add(index, 1))
                    neighbour[axis] += step
                    if not padded[tuple(neighbour)]:
                        points.append(index)
                        break
                else:
                    continue
                break
        return np.asarray(points, dtype=np.float64) * np.asarray(spacing)

    a, b = surface_points(pred), surface_points(truth)
    pairwise = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(axis=-1))
    return float(np.percentile(np.concatenate([pairwise.min(axis=1), pairwise.min(axis=0)]), 95))


# --- dice / iou / sensitivity / specificity -------------------------------------------------

@pytest.mark.parametrize(
    "pred, truth, expected_dice, expected_iou",
    [
        ([1, 1, 0, 0], [1, 1, 0, 0], 1.0, 1.0),
        ([1, 1, 0, 0], [0, 1, 1, 0], 2 * 1 / 4, 1 / 3),
        ([1, 1, 1, 0], [1, 0, 0, 0], 2 * 1 / 4, 1 / 3),
        ([1, 0, 0, 0], [0, 0, 0, 1], 0.0, 0.0),
        ([0, 0, 0, 0], [0, 0, 0, 0], 1.0, 1.0),  # both empty: BraTS scores a perfect match
        ([0, 0, 0, 0], [0, 1, 0, 0], 0.0, 0.0),  # one empty
        ([0, 1, 0, 0], [0, 0, 0, 0], 0.0, 0.0),
        ([[1, 1], [1, 0]], [[1, 1], [0, 1]], 2 * 2 / 6, 2 / 4),
    ],
)
def test_dice_and_iou_hand_computed(pred, truth, expected_dice, expected_iou) -> None:
    assert dice(np.array(pred), np.array(truth)) == pytest.approx(expected_dice)
    assert iou(np.array(pred), np.array(truth)) == pytest.approx(expected_iou)


def test_region_overlaps_hand_computed() -> None:
    # 1 x 10 map. truth: NCR at 0-1, ED at 2-4, ET at 5; pred: NCR at 1, ED at 2-3, ET at 5-6.
    truth = np.array([[1, 1, 2, 2, 2, 4, 0, 0, 0, 0]])
    pred = np.array([[0, 1, 2, 2, 0, 4, 4, 0, 0, 0]])
    report = segmentation_metrics(pred, truth, spacing=(1.0, 1.0))
    # WT: truth 0-5, pred 1-3 and 5-6; TP 4 (1, 2, 3, 5), FP 1 (6), FN 2 (0, 4), TN 3.
    assert report["WT"]["dice"] == pytest.approx(8 / 11)
    assert report["WT"]["iou"] == pytest.approx(4 / 7)
    assert report["WT"]["sensitivity"] == pytest.approx(4 / 6)
    assert report["WT"]["specificity"] == pytest.approx(3 / 4)
    # TC = {1, 4}: truth 0, 1, 5; pred 1, 5, 6 -> TP 2, FP 1, FN 1, TN 6.
    assert report["TC"]["dice"] == pytest.approx(4 / 6)
    assert report["TC"]["specificity"] == pytest.approx(6 / 7)
    # ET: truth 5; pred 5, 6 -> TP 1, FP 1.
    assert report["ET"]["dice"] == pytest.approx(2 / 3)
    assert report["labels"]["ET"] == report["ET"]
    # NCR: truth 0, 1; pred 1. ED: truth 2-4; pred 2-3.
    assert report["labels"]["NCR"]["dice"] == pytest.approx(2 / 3)
    assert report["labels"]["ED"]["iou"] == pytest.approx(2 / 3)
    # Class IoUs: background {7, 8, 9} / {0, 4, 6, 7, 8, 9}, NCR 1/2, ED 2/3, ET 1/2.
    expected_mean = np.mean([3 / 6, 1 / 2, 2 / 3, 1 / 2])
    assert report["mean_iou"] == pytest.approx(expected_mean)
    assert mean_iou(pred, truth) == pytest.approx(expected_mean)


def test_mean_iou_leaves_out_classes_absent_from_both() -> None:
    truth = np.array([0, 0, 2, 2])
    pred = np.array([0, 2, 2, 2])
    # Only background (1/2) and ED (2/3) occur; NCR and ET are absent from both maps.
    assert mean_iou(pred, truth) == pytest.approx((1 / 2 + 2 / 3) / 2)


# --- empty-mask conventions -----------------------------------------------------------------

@pytest.mark.parametrize(
    "pred_has_et, truth_has_et, empty_value, dice_expected, hd95_expected, sensitivity_expected",
    [
        (False, False, None, 1.0, 0.0, None),
        (True, False, None, 0.0, None, None),
        (False, True, None, 0.0, None, 0.0),
        (True, False, BRATS_HD95_EMPTY_VALUE, 0.0, 373.13, None),
        (False, False, BRATS_HD95_EMPTY_VALUE, 1.0, 0.0, None),
    ],
)
def test_empty_region_conventions(
    pred_has_et, truth_has_et, empty_value, dice_expected, hd95_expected, sensitivity_expected
) -> None:
    truth = np.zeros((6, 6, 6), dtype=np.uint8)
    pred = np.zeros_like(truth)
    truth[1:4, 1:4, 1:4] = 2
    pred[1:4, 1:4, 1:4] = 2
    if truth_has_et:
        truth[2, 2, 2] = 4
    if pred_has_et:
        pred[2, 2, 2] = 4
    report = segmentation_metrics(pred, truth, hd95_empty_value=empty_value)
    assert report["ET"]["dice"] == dice_expected
    assert report["ET"]["hd95"] == hd95_expected
    assert report["ET"]["sensitivity"] == sensitivity_expected
    json.dumps(report, allow_nan=False)


@pytest.mark.parametrize(
    "pred_any, truth_any, empty_value, expected",
    [
        (False, False, math.nan, 0.0),
        (True, False, math.nan, math.nan),
        (False, True, math.nan, math.nan),
        (False, True, BRATS_HD95_EMPTY_VALUE, BRATS_HD95_EMPTY_VALUE),
    ],
)
def test_raw_hd95_empty_conventions(pred_any, truth_any, empty_value, expected) -> None:
    pred = np.zeros((5, 5), dtype=bool)
    truth = np.zeros((5, 5), dtype=bool)
    pred[2, 2] = pred_any
    truth[1, 3] = truth_any
    result = hd95(pred, truth, (1.0, 1.0), empty_value=empty_value)
    assert (math.isnan(result) and math.isnan(expected)) or result == expected


# --- HD95 against brute force ---------------------------------------------------------------

@pytest.mark.parametrize(
    "seed, shape, spacing",
    [
        (0, (9, 10, 8), (1.0, 1.5, 2.0)),
        (1, (12, 8, 7), (1.0, 1.5, 2.0)),
        (2, (7, 7, 7), (0.5, 1.0, 3.0)),
        (3, (16, 16), (1.0, 1.5)),
        (4, (10, 11, 6), (1.0, 1.0, 1.0)),
    ],
)
def test_hd95_matches_brute_force(seed, shape, spacing) -> None:
    rng = np.random.default_rng(seed)
    # Smoothed noise gives blobs with interiors (so the surface definition matters) that also
    # touch the array border, where surfaces are easy to get wrong; plus scattered single voxels.
    pred = ndimage.gaussian_filter(rng.random(shape), 1.0) > 0.52
    truth = (ndimage.gaussian_filter(rng.random(shape), 1.0) > 0.53) | (rng.random(shape) > 0.98)
    pred[(slice(0, 4),) * len(shape)] = True
    assert pred.sum() > 10 and truth.sum() > 10
    assert hd95(pred, truth, spacing) == pytest.approx(_brute_force_hd95(pred, truth, spacing))


def test_hd95_of_shifted_ball_is_shift_length() -> None:
    shape = (30, 30, 30)
    truth = _ball(shape, (15, 15, 15), 6)
    pred = np.roll(truth, 3, axis=2)
    # Every surface point moves by 3 voxels along z = 6 mm; few surface points sit closer.
    result = hd95(pred, truth, (1.0, 1.0, 2.0))
    assert 0.0 < result <= 6.0
    assert result == pytest.approx(_brute_force_hd95(pred, truth, (1.0, 1.0, 2.0)))


def test_hd95_identical_masks_is_zero() -> None:
    mask = _ball((20, 20, 20), (10, 10, 10), 5)
    assert hd95(mask, mask, (1.0, 2.0, 3.0)) == 0.0


# --- volumes ----------------------------------------------------------------------------------

@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.5, 1.5, 2.0), (2.0, 2.0, 2.0)])
def test_volumes_ml_with_spacing(spacing) -> None:
    seg = np.zeros((20, 20, 20), dtype=np.uint8)
    seg[0:10, 0:10, 0:10] = 2  # 1000 voxels, of which NCR and ET take some below
    seg[0:2, 0:10, 0:10] = 1  # 200 NCR
    seg[2:3, 0:10, 0:5] = 4  # 50 ET
    voxel_ml = np.prod(spacing) / 1000.0
    counts = {"WT": 1000, "TC": 250, "ET": 50, "NCR": 200, "ED": 750}
    volumes = volumes_ml(seg, spacing)
    assert set(volumes) == set(counts)
    for key, count in counts.items():
        assert volumes[key] == pytest.approx(count * voxel_ml)
    report = segmentation_metrics(seg, np.zeros_like(seg), spacing)
    assert report["WT"]["volume_ml"] == pytest.approx(1000 * voxel_ml)
    assert report["WT"]["volume_ml_truth"] == 0.0
    assert report["labels"]["ED"]["volume_ml"] == pytest.approx(750 * voxel_ml)


# --- validation -----------------------------------------------------------------------------

@pytest.mark.parametrize(
    "pred, truth, spacing, error, message",
    [
        (np.full((4, 4, 4), 3), np.zeros((4, 4, 4)), (1, 1, 1), InvalidLabelsError, "[3]"),
        (np.zeros((4, 4, 4)), np.full((4, 4, 4), 5), (1, 1, 1), InvalidLabelsError, "[5]"),
        (np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), (1, 1, 1), VolumeMismatchError, "(4, 4, 5)"),
        (np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), (1, 1), ValueError, "3 values"),
        (np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), (1, 0, 1), ValueError, "positive"),
        (np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), (1, np.nan, 1), ValueError, "finite"),
        (np.zeros((0, 4, 4)), np.zeros((0, 4, 4)), (1, 1, 1), EmptyInputError, "non-empty"),
    ],
)
def test_segmentation_metrics_validation(pred, truth, spacing, error, message) -> None:
    with pytest.raises(error) as caught:
        segmentation_metrics(pred, truth, spacing)
    assert message in str(caught.value)


def test_volumes_ml_rejects_bad_labels() -> None:
    with pytest.raises(InvalidLabelsError):
        volumes_ml(np.array([[0, 3]]), (1.0, 1.0))


# --- report shape, aggregation, full size ---------------------------------------------------

def test_report_schema_and_json() -> None:
    shape = (24, 24, 24)
    truth = np.zeros(shape, dtype=np.uint8)
    truth[_ball(shape, (12, 12, 12), 8)] = 2
    truth[_ball(shape, (12, 12, 12), 4)] = 1
    truth[_ball(shape, (13, 12, 12), 2)] = 4
    pred = np.roll(truth, 1, axis=0)
    report = segmentation_metrics(pred, truth, (1.0, 1.0, 1.5))
    assert {"WT", "TC", "ET", "labels", "mean_iou", "spacing"} == set(report)
    assert set(report["labels"]) == {"NCR", "ED", "ET"}
    for entry in [report[r] for r in ("WT", "TC", "ET")] + list(report["labels"].values()):
        assert set(entry) == METRIC_KEYS
    assert report["WT"]["dice"] == pytest.approx(dice(pred > 0, truth > 0))
    assert report["TC"]["hd95"] == pytest.approx(
        hd95(np.isin(pred, (1, 4)), np.isin(truth, (1, 4)), (1.0, 1.0, 1.5))
    )
    json.dumps(report, allow_nan=False)


def test_aggregate_cases_ignores_nulls() -> None:
    cases = []
    for dice_value, hd in [(0.8, 2.0), (0.6, None), (0.9, 5.0), (0.7, 4.0)]:
        entry = dict.fromkeys(METRIC_KEYS, 0.5) | {"dice": dice_value, "hd95": hd}
        cases.append(
            {"WT": entry, "TC": entry, "ET": entry, "mean_iou": dice_value,
             "labels": {"NCR": entry, "ED": entry, "ET": entry}}
        )
    summary = aggregate_cases(cases)
    dices, hds = np.array([0.8, 0.6, 0.9, 0.7]), np.array([2.0, 5.0, 4.0])
    assert summary["n_cases"] == 4
    assert summary["WT"]["dice"] == pytest.approx(
        {"mean": dices.mean(), "median": np.median(dices), "std": dices.std(), "n": 4}
    )
    assert summary["ET"]["hd95"] == pytest.approx(
        {"mean": hds.mean(), "median": 4.0, "std": hds.std(), "n": 3}
    )
    assert summary["labels"]["NCR"]["hd95"]["n"] == 3
    assert summary["mean_iou"]["mean"] == pytest.approx(dices.mean())
    json.dumps(summary, allow_nan=False)


def test_aggregate_all_null_metric_and_bad_input() -> None:
    entry = dict.fromkeys(METRIC_KEYS, 1.0) | {"hd95": None}
    case = {"WT": entry, "TC": entry, "ET": entry, "mean_iou": 1.0,
            "labels": {"NCR": entry, "ED": entry, "ET": entry}}
    assert aggregate_cases([case])["WT"]["hd95"] == {
        "mean": None, "median": None, "std": None, "n": 0
    }
    with pytest.raises(EmptyInputError):
        aggregate_cases([])
    with pytest.raises(ValueError, match="lacks TC"):
        aggregate_cases([{"WT": entry}])


def test_full_brats_size_pair_runs() -> None:
    shape = (240, 240, 155)
    truth = np.zeros(shape, dtype=np.uint8)
    truth[_ball(shape, (120, 110, 77), 30)] = 2
    truth[_ball(shape, (120, 110, 77), 15)] = 1
    truth[_ball(shape, (124, 110, 77), 8)] = 4
    pred = np.zeros_like(truth)
    pred[_ball(shape, (122, 112, 78), 28)] = 2
    pred[_ball(shape, (121, 111, 77), 12)] = 4
    report = segmentation_metrics(pred, truth, (1.0, 1.0, 1.0))
    assert 0.0 < report["WT"]["dice"] < 1.0
    assert report["labels"]["NCR"]["hd95"] is None  # NCR missing from the prediction
    json.dumps(report, allow_nan=False)


def test_labels_all_combinations_are_scored() -> None:
    # Every (pred label, truth label) pair once: each region's counts follow from REGIONS.
    pairs = list(itertools.product((0, 1, 2, 4), repeat=2))
    pred = np.array([p for p, _ in pairs])
    truth = np.array([t for _, t in pairs])
    report = segmentation_metrics(pred, truth, spacing=(1.0,))
    # WT: pred in {1,2,4} and truth in {1,2,4}: 9 TP, 3 FP, 3 FN, 1 TN.
    assert report["WT"]["dice"] == pytest.approx(18 / 24)
    assert report["WT"]["specificity"] == pytest.approx(1 / 4)
    # TC: 4 TP, 4 FP, 4 FN, 4 TN.
    assert report["TC"]["iou"] == pytest.approx(4 / 12)
    # ET: 1 TP, 3 FP, 3 FN, 9 TN.
    assert report["ET"]["sensitivity"] == pytest.approx(1 / 4)
    assert report["ET"]["specificity"] == pytest.approx(9 / 12)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.2, 0.8, 2.0)])
def test_segmentation_metrics_of_a_tumour_anywhere_in_the_volume(spacing) -> None:
    """The metrics crop to the labelled voxels of both maps: a tumour touching the array's border, or
    the same tumour inside a larger, empty volume, gets the same figures (more true negatives only
    raise specificity), checked against each region computed on its own."""
    rng = np.random.default_rng(5)
    truth = np.zeros((12, 14, 10), np.uint8)
    truth[0:8, 3:14, 2:9] = 2  # touches three faces of the array
    truth[2:6, 5:11, 3:7] = 1
    truth[3:5, 6:9, 4:6] = 4
    noise = rng.choice([0, 1, 2, 4], size=truth.shape)
    pred = np.where(rng.random(truth.shape) < 0.15, noise, truth).astype(np.uint8)
    tight = segmentation_metrics(pred, truth, spacing)
    padded = [np.pad(a, ((7, 3), (0, 9), (4, 4))) for a in (pred, truth)]
    loose = segmentation_metrics(*padded, spacing)
    for region, labels in REGIONS.items():
        p, t = np.isin(pred, labels), np.isin(truth, labels)
        assert tight[region]["dice"] == pytest.approx(dice(p, t))
        assert tight[region]["hd95"] == pytest.approx(hd95(p, t, spacing))
        padded_p, padded_t = np.isin(padded[0], labels), np.isin(padded[1], labels)
        assert loose[region]["hd95"] == pytest.approx(hd95(padded_p, padded_t, spacing))
        for key in ("dice", "iou", "sensitivity", "hd95", "volume_ml", "volume_ml_truth"):
            assert loose[region][key] == pytest.approx(tight[region][key]), (region, key)
        negatives = int(np.count_nonzero(~padded_p & ~padded_t))
        false_positives = int(np.count_nonzero(padded_p & ~padded_t))
        assert loose[region]["specificity"] == pytest.approx(negatives / (negatives + false_positives))
    empty = np.zeros((9, 9, 9), np.uint8)
    assert segmentation_metrics(empty, empty, spacing)["WT"] == {
        "dice": 1.0, "iou": 1.0, "sensitivity": None, "specificity": 1.0, "hd95": 0.0, "volume_ml": 0.0,
        "volume_ml_truth": 0.0}
