"""Tests of brainscan.metrics.classification against scikit-learn and hand-computed values."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from brainscan.errors import EmptyInputError, NonFiniteError
from brainscan.labels import KAGGLE_CLASSES
from brainscan.metrics.classification import (
    ECE_BINS,
    classification_report,
    expected_calibration_error,
    format_report_markdown,
)

NAMES = list(KAGGLE_CLASSES)


def _random_case(seed: int, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, k, size=n)
    # Logits that lean towards the truth so the metrics are neither trivial nor chance.
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y_true]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y_true, probs


@pytest.mark.parametrize(
    "seed, n, k, as_names",
    [
        (0, 60, 4, False),
        (1, 200, 4, True),
        (2, 37, 2, False),
        (3, 90, 3, True),
    ],
)
def test_report_matches_sklearn(seed: int, n: int, k: int, as_names: bool) -> None:
    names = NAMES[:k]
    y_true, probs = _random_case(seed, n, k)
    y_pred = probs.argmax(axis=1)
    given_truth = [names[i] for i in y_true] if as_names else y_true

    report = classification_report(given_truth, probs, names)

    expected = skm.classification_report(
        y_true, y_pred, labels=list(range(k)), target_names=names, output_dict=True,
        zero_division=0,
    )
    assert report["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert report["n_samples"] == n
    for name in names:
        for key, sk_key in (("precision", "precision"), ("recall", "recall"), ("f1", "f1-score")):
            assert report["per_class"][name][key] == pytest.approx(expected[name][sk_key])
        assert report["per_class"][name]["support"] == expected[name]["support"]
    for ours, theirs in (("macro_avg", "macro avg"), ("weighted_avg", "weighted avg")):
        assert report[ours]["precision"] == pytest.approx(expected[theirs]["precision"])
        assert report[ours]["recall"] == pytest.approx(expected[theirs]["recall"])
        assert report[ours]["f1"] == pytest.approx(expected[theirs]["f1-score"])
    assert report["confusion_matrix"]["labels"] == names
    assert report["confusion_matrix"]["matrix"] == skm.confusion_matrix(
        y_true, y_pred, labels=list(range(k))
    ).tolist()
    for c, name in enumerate(names):
        assert report["roc_auc"]["per_class"][name] == pytest.approx(
            skm.roc_auc_score(y_true == c, probs[:, c])
        )
    if k > 2:
        sk_macro = skm.roc_auc_score(y_true, probs, multi_class="ovr", average="macro")
    else:
        sk_macro = np.mean([skm.roc_auc_score(y_true == c, probs[:, c]) for c in range(k)])
    assert report["roc_auc"]["macro"] == pytest.approx(sk_macro)
    assert report["roc_auc"]["undefined"] == {}
    json.dumps(report, allow_nan=False)


@pytest.mark.parametrize("as_names", [False, True])
def test_hard_predictions_have_no_auc_or_calibration(as_names: bool) -> None:
    rng = np.random.default_rng(5)
    y_true, y_pred = rng.integers(0, 4, 50), rng.integers(0, 4, 50)
    given_pred = [NAMES[i] for i in y_pred] if as_names else y_pred

    report = classification_report(y_true, given_pred, NAMES)

    assert report["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert report["confusion_matrix"]["matrix"] == skm.confusion_matrix(
        y_true, y_pred, labels=range(4)
    ).tolist()
    assert report["roc_auc"] is None
    assert report["calibration"] is None
    json.dumps(report, allow_nan=False)


def test_class_absent_from_truth_gets_null_auc_with_reason() -> None:
    y_true, probs = _random_case(7, 80, 4)
    y_true[y_true == 2] = 0  # "notumor" never occurs

    report = classification_report(y_true, probs, NAMES)

    auc = report["roc_auc"]
    assert auc["per_class"]["notumor"] is None
    assert "absent" in auc["undefined"]["notumor"]
    present = [c for c in range(4) if c != 2]
    expected = np.mean([skm.roc_auc_score(y_true == c, probs[:, c]) for c in present])
    assert auc["macro"] == pytest.approx(expected)
    assert report["per_class"]["notumor"]["support"] == 0
    assert report["per_class"]["notumor"]["recall"] == 0.0
    json.dumps(report, allow_nan=False)


def test_single_class_truth_has_no_auc_at_all() -> None:
    probs = np.array([[0.7, 0.3], [0.4, 0.6], [0.9, 0.1]])
    report = classification_report([0, 0, 0], probs, ["a", "b"])
    assert report["roc_auc"]["per_class"] == {"a": None, "b": None}
    assert report["roc_auc"]["macro"] is None
    assert "no negative" in report["roc_auc"]["undefined"]["a"]


def test_ece_zero_for_perfectly_calibrated_predictions() -> None:
    # In each group the predicted class is right exactly as often as its confidence says.
    groups = [(0.6, 10), (0.8, 10), (1.0, 4)]
    y_true, probs = [], []
    for confidence, count in groups:
        n_correct = round(confidence * count)
        probs += [[confidence, 1 - confidence]] * count
        y_true += [0] * n_correct + [1] * (count - n_correct)
    ece, bins = expected_calibration_error(np.array(y_true), np.array(probs))
    assert ece == pytest.approx(0.0, abs=1e-12)
    assert sum(b["count"] for b in bins) == len(y_true)
    assert len(bins) == ECE_BINS


def test_ece_hand_computed() -> None:
    # Confidences 0.9 (right), 0.9 (wrong) share bin (0.8667, 0.9333]: |0.5 - 0.9| * 2/4 = 0.2.
    # 0.65 (right) in (0.6, 0.6667]: |1 - 0.65| / 4; 0.75 (right) in (0.7333, 0.8]: |1 - 0.75| / 4.
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.35, 0.65], [0.75, 0.25]])
    y_true = np.array([0, 1, 1, 0])
    report = classification_report(y_true, probs, ["a", "b"])
    assert report["calibration"]["ece"] == pytest.approx(0.2 + 0.35 / 4 + 0.25 / 4)
    assert report["calibration"]["n_bins"] == 15
    counts = {round(b["upper"], 4): b["count"] for b in report["calibration"]["bins"] if b["count"]}
    assert counts == {0.9333: 2, 0.6667: 1, 0.8: 1}


@pytest.mark.parametrize(
    "y_true, scores, names, error, message",
    [
        ([0, 1, 1], [0, 1], ["a", "b"], ValueError, "3 samples"),
        ([0, 1], [[0.5, 0.5, 0.0]] * 2, ["a", "b"], ValueError, "shape (N, 2)"),
        ([0, 1], [[0.5, 0.6], [0.5, 0.5]], ["a", "b"], ValueError, "row 0 sums"),
        ([0, 1], [[np.nan, 0.5], [0.5, 0.5]], ["a", "b"], NonFiniteError, "NaN"),
        ([0, 1], [[1.5, -0.5], [0.5, 0.5]], ["a", "b"], ValueError, "[0, 1]"),
        ([0, 2], [0, 1], ["a", "b"], ValueError, "outside 0..1"),
        (["a", "zebra"], [0, 1], ["a", "b"], ValueError, "zebra"),
        ([0, 1], ["a", "cat"], ["a", "b"], ValueError, "cat"),
        ([0.5, 1.0], [0, 1], ["a", "b"], ValueError, "whole-number"),
        ([], [], ["a", "b"], EmptyInputError, "empty"),
        ([0, 1], [0, 1], ["a", "a"], ValueError, "unique"),
        ([0, 0], [0, 0], ["a"], ValueError, "at least 2"),
        ([0, 1], np.full((2, 2, 1), 0.5), ["a", "b"], ValueError, "(N, K)"),
    ],
)
def test_invalid_inputs_raise(y_true, scores, names, error, message) -> None:
    with pytest.raises(error) as caught:
        classification_report(y_true, scores, names)
    assert message in str(caught.value)


def test_markdown_shows_table_and_undefined_auc() -> None:
    y_true, probs = _random_case(11, 40, 4)
    y_true[y_true == 3] = 1
    report = classification_report(y_true, probs, NAMES)
    # The report is written to JSON and may be rendered from the file later.
    text = format_report_markdown(json.loads(json.dumps(report)))
    assert f"Accuracy: {report['accuracy']:.4f}" in text
    for name in NAMES:
        assert f"| {name} |" in text
    assert "| pituitary | 0.0000 | 0.0000 | 0.0000 | 0 | n/a |" in text
    assert "pituitary: class absent" in text
    first_row = " | ".join(str(c) for c in report["confusion_matrix"]["matrix"][0])
    assert f"| glioma | {first_row} |" in text


def test_markdown_rejects_other_dicts() -> None:
    with pytest.raises(ValueError, match="missing keys"):
        format_report_markdown({"accuracy": 1.0})
