"""Classification metrics for the 2D tumour classifier: one JSON-serialisable report per evaluation.

The report is written next to a model (``manifest.json`` metrics, ``report.md``) and read by people
comparing models, so it holds plain Python numbers only (``json.dumps(report, allow_nan=False)``
works) and says *why* a number is missing rather than putting NaN in it.

Report layout (``classification_report``)::

    {
      "class_names": ["glioma", ...],            # order of every per-class list below
      "n_samples": 120,
      "accuracy": 0.91,
      "per_class": {"glioma": {"precision", "recall", "f1", "support"}, ...},
      "macro_avg": {"precision", "recall", "f1", "support"},
      "weighted_avg": {"precision", "recall", "f1", "support"},
      "confusion_matrix": {"labels": [...], "matrix": [[...]]},   # rows = true, cols = predicted
      "roc_auc": null | {"per_class": {name: float | null}, "macro": float | null,
                         "undefined": {name: reason}},
      "calibration": null | {"ece": float, "n_bins": 15, "bins": [{"lower", "upper", "count",
                                                                   "accuracy", "confidence"}]}
    }

``roc_auc`` and ``calibration`` are ``null`` when only hard predictions are given.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from brainscan.errors import EmptyInputError, NonFiniteError

#: Equal-width confidence bins for the expected calibration error (Guo et al., 2017).
ECE_BINS = 15
#: How far a probability row may sum from 1 (float32 softmax outputs drift by ~1e-6).
_ROW_SUM_TOLERANCE = 1e-3


def _check_class_names(class_names: Sequence[str]) -> list[str]:
    names = list(class_names)
    if len(names) < 2:
        raise ValueError(f"class_names must hold at least 2 classes, got {names}")
    if not all(isinstance(n, str) for n in names):
        raise ValueError(f"class_names must be strings, got {names}")
    if len(set(names)) != len(names):
        raise ValueError(f"class_names must be unique, got {names}")
    return names


def _to_indices(labels: Any, class_names: list[str], what: str) -> np.ndarray:
    """Class indices (int64, shape (N,)) from integer indices or class-name strings."""
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {array.shape}")
    if array.size == 0:
        raise EmptyInputError(f"{what} is empty")
    if array.dtype.kind in "US" or array.dtype == object:
        lookup = {name: i for i, name in enumerate(class_names)}
        unknown = sorted({str(v) for v in array.tolist() if v not in lookup})
        if unknown:
            raise ValueError(f"{what} holds class names {unknown[:10]} not in {class_names}")
        return np.asarray([lookup[v] for v in array.tolist()], dtype=np.int64)
    if array.dtype.kind == "b" or array.dtype.kind not in "iuf":
        raise ValueError(f"{what} must be class indices or class names, got dtype {array.dtype}")
    if array.dtype.kind == "f" and not np.all(np.isfinite(array) & (array == np.round(array))):
        raise ValueError(f"{what} must hold whole-number class indices, got float values")
    indices = array.astype(np.int64)
    bad = sorted(set(indices[(indices < 0) | (indices >= len(class_names))].tolist()))
    if bad:
        raise ValueError(
            f"{what} holds class indices {bad[:10]} outside 0..{len(class_names) - 1}"
        )
    return indices


def _check_probabilities(probs: np.ndarray, n_classes: int) -> np.ndarray:
    if probs.ndim != 2 or probs.shape[1] != n_classes:
        raise ValueError(
            f"probabilities must have shape (N, {n_classes}) to match class_names, "
            f"got {probs.shape}"
        )
    if probs.dtype.kind not in "iuf":
        raise ValueError(f"probabilities must be numeric, got dtype {probs.dtype}")
    probs = probs.astype(np.float64)
    if not np.all(np.isfinite(probs)):
        raise NonFiniteError("probabilities hold NaN or infinite values")
    if probs.min() < 0.0 or probs.max() > 1.0:
        raise ValueError(
            f"probabilities must lie in [0, 1], got range [{probs.min():.4g}, {probs.max():.4g}]"
        )
    row_sums = probs.sum(axis=1)
    worst = int(np.argmax(np.abs(row_sums - 1.0)))
    if abs(row_sums[worst] - 1.0) > _ROW_SUM_TOLERANCE:
        raise ValueError(
            f"probability rows must sum to 1 (softmax outputs); row {worst} sums to "
            f"{row_sums[worst]:.6g}"
        )
    return probs


def expected_calibration_error(
    y_true: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS
) -> tuple[float, list[dict[str, float | int | None]]]:
    """Expected calibration error of the top-1 prediction.

    The confidence of a sample is its largest probability and its prediction the ``argmax`` (ties
    go to the lower class index). Confidences fall into ``n_bins`` equal-width bins over [0, 1];
    bin ``b`` holds confidences in ``(b / n_bins, (b + 1) / n_bins]`` (bin 0 also holds 0).
    ``ECE = sum_b (n_b / N) * |accuracy_b - mean_confidence_b|``; empty bins contribute nothing.

    Args:
        y_true: class indices, shape (N,).
        probs: probabilities, shape (N, K), already validated.
        n_bins: number of bins.

    Returns:
        ``(ece, bins)`` where ``bins`` lists every bin as ``{"lower", "upper", "count",
        "accuracy", "confidence"}`` (accuracy and confidence are ``None`` for an empty bin).

    Raises:
        ValueError: if ``n_bins`` < 1 or the shapes disagree.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if probs.ndim != 2 or len(y_true) != len(probs):
        raise ValueError(f"y_true {np.shape(y_true)} and probs {probs.shape} do not match")
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # right=True makes bins closed on the right, so a confidence of exactly 1 lands in the last bin.
    bin_index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    ece = 0.0
    bins: list[dict[str, float | int | None]] = []
    for b in range(n_bins):
        in_bin = bin_index == b
        count = int(in_bin.sum())
        accuracy = float(correct[in_bin].mean()) if count else None
        mean_confidence = float(confidence[in_bin].mean()) if count else None
        if count:
            ece += count / len(y_true) * abs(accuracy - mean_confidence)
        bins.append(
            {
                "lower": float(edges[b]),
                "upper": float(edges[b + 1]),
                "count": count,
                "accuracy": accuracy,
                "confidence": mean_confidence,
            }
        )
    return float(ece), bins


def _roc_auc(y_true: np.ndarray, probs: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """One-vs-rest ROC-AUC per class; a class lacking positives or negatives gets ``None``."""
    from sklearn.metrics import roc_auc_score  # here: scikit-learn costs seconds to import, see classification_report

    per_class: dict[str, float | None] = {}
    undefined: dict[str, str] = {}
    for k, name in enumerate(class_names):
        positives = int(np.sum(y_true == k))
        if positives == 0:
            per_class[name] = None
            undefined[name] = "class absent from y_true (no positive samples)"
        elif positives == len(y_true):
            per_class[name] = None
            undefined[name] = "every sample is this class (no negative samples)"
        else:
            per_class[name] = float(roc_auc_score(y_true == k, probs[:, k]))
    defined = [v for v in per_class.values() if v is not None]
    # Macro over the classes where AUC is defined; equals sklearn's multi_class="ovr" macro when
    # every class is present, and still gives a number (with the gaps listed) when one is not.
    macro = float(np.mean(defined)) if defined else None
    return {"per_class": per_class, "macro": macro, "undefined": undefined}


def classification_report(
    y_true: Sequence[int] | Sequence[str] | np.ndarray,
    y_prob_or_pred: Sequence[int] | Sequence[str] | np.ndarray,
    class_names: Sequence[str],
    *,
    n_bins: int = ECE_BINS,
) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1, confusion matrix, ROC-AUC and calibration.

    Args:
        y_true: true classes, shape (N,), as indices into ``class_names`` or as class names.
        y_prob_or_pred: either probabilities of shape (N, K) with ``K == len(class_names)``
            (rows sum to 1, e.g. softmax outputs), or hard predictions of shape (N,) as indices
            or class names. ROC-AUC and calibration need probabilities and are ``None`` otherwise.
        class_names: class names in model output order, e.g. ``labels.KAGGLE_CLASSES``.
        n_bins: equal-width bins of the expected calibration error.

    Returns:
        A JSON-serialisable dict (layout in the module docstring). Precision/recall/F1 of a class
        that is never predicted or never true is 0 (``zero_division=0``); macro averages weigh
        classes equally, weighted averages by support.

    Raises:
        EmptyInputError: if there are no samples.
        NonFiniteError: if probabilities hold NaN or infinity.
        ValueError: on mismatched lengths, a wrong probability shape, rows not summing to 1,
            unknown class names or out-of-range indices.

    Example:
        >>> probs = [[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]
        >>> report = classification_report([0, 1, 1], probs, ["a", "b"])
        >>> report["accuracy"]
        0.6666666666666666
    """
    names = _check_class_names(class_names)
    truth = _to_indices(y_true, names, "y_true")
    scores = np.asarray(y_prob_or_pred)
    if scores.ndim not in (1, 2):
        raise ValueError(
            f"y_prob_or_pred must be predictions (N,) or probabilities (N, K), got {scores.shape}"
        )
    if len(scores) != len(truth):
        raise ValueError(
            f"y_true has {len(truth)} samples but y_prob_or_pred has {len(scores)}"
        )
    probs: np.ndarray | None = None
    if scores.ndim == 2:
        probs = _check_probabilities(scores, len(names))
        pred = probs.argmax(axis=1)
    else:
        pred = _to_indices(scores, names, "y_pred")

    # Imported here, not at the top: scikit-learn (with SciPy's stats and pandas, which it loads) takes 2-3 CPU-s
    # to import, and every process that imports brainscan.metrics for the segmentation scores would pay it.
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    labels = list(range(len(names)))
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, pred, labels=labels, zero_division=0
    )
    per_class = {
        name: {
            "precision": float(precision[k]),
            "recall": float(recall[k]),
            "f1": float(f1[k]),
            "support": int(support[k]),
        }
        for k, name in enumerate(names)
    }
    averages = {}
    for average in ("macro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(
            truth, pred, labels=labels, average=average, zero_division=0
        )
        averages[f"{average}_avg"] = {
            "precision": float(p),
            "recall": float(r),
            "f1": float(f),
            "support": int(len(truth)),
        }
    matrix = confusion_matrix(truth, pred, labels=labels)

    report: dict[str, Any] = {
        "class_names": names,
        "n_samples": int(len(truth)),
        "accuracy": float(np.mean(truth == pred)),
        "per_class": per_class,
        **averages,
        "confusion_matrix": {"labels": names, "matrix": matrix.astype(int).tolist()},
        "roc_auc": None,
        "calibration": None,
    }
    if probs is not None:
        report["roc_auc"] = _roc_auc(truth, probs, names)
        ece, bins = expected_calibration_error(truth, probs, n_bins)
        report["calibration"] = {"ece": ece, "n_bins": n_bins, "bins": bins}
    return report


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def format_report_markdown(report: dict[str, Any]) -> str:
    """Render a :func:`classification_report` dict as Markdown for ``report.md``.

    Args:
        report: the dict returned by :func:`classification_report` (or read back from JSON).

    Returns:
        Markdown text: summary lines, a per-class table with macro/weighted rows, the confusion
        matrix (rows = true class, columns = predicted class) and notes on undefined ROC-AUCs.

    Raises:
        ValueError: if ``report`` lacks the keys of a classification report.
    """
    required = ("class_names", "accuracy", "per_class", "macro_avg", "weighted_avg",
                "confusion_matrix")
    missing = [key for key in required if key not in report]
    if missing:
        raise ValueError(f"not a classification report: missing keys {missing}")
    names = report["class_names"]
    auc = report.get("roc_auc")
    calibration = report.get("calibration")

    lines = [
        "## Classification report",
        "",
        f"- Samples: {report.get('n_samples', 'n/a')}",
        f"- Accuracy: {report['accuracy']:.4f}",
    ]
    if auc is not None:
        lines.append(f"- Macro ROC-AUC (one-vs-rest): {_fmt(auc['macro'])}")
    if calibration is not None:
        lines.append(
            f"- Expected calibration error ({calibration['n_bins']} bins): "
            f"{calibration['ece']:.4f}"
        )
    lines += ["", "| Class | Precision | Recall | F1 | Support | ROC-AUC |",
              "|---|---:|---:|---:|---:|---:|"]
    for name in names:
        row = report["per_class"][name]
        class_auc = _fmt(auc["per_class"][name]) if auc is not None else "n/a"
        lines.append(
            f"| {name} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} "
            f"| {row['support']} | {class_auc} |"
        )
    for key, title in (("macro_avg", "macro avg"), ("weighted_avg", "weighted avg")):
        row = report[key]
        macro_auc = _fmt(auc["macro"]) if auc is not None and key == "macro_avg" else ""
        lines.append(
            f"| **{title}** | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} "
            f"| {row['support']} | {macro_auc} |"
        )

    matrix = report["confusion_matrix"]
    lines += ["", "### Confusion matrix (rows = true, columns = predicted)", "",
              "| true \\ predicted | " + " | ".join(matrix["labels"]) + " |",
              "|---|" + "---:|" * len(matrix["labels"])]
    for name, counts in zip(matrix["labels"], matrix["matrix"]):
        lines.append(f"| {name} | " + " | ".join(str(c) for c in counts) + " |")

    if auc is not None and auc["undefined"]:
        lines += ["", "ROC-AUC not defined for:"]
        lines += [f"- {name}: {reason}" for name, reason in auc["undefined"].items()]
    return "\n".join(lines) + "\n"
