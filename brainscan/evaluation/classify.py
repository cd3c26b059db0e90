"""Evaluate a classification bundle on a Kaggle-layout dataset.

Prediction itself (:func:`classify_images` and its helpers) lives in :mod:`brainscan.inference.classifier`
and is re-exported here. Every image goes through ``bundle.preprocess`` (the manifest's ``image2d`` preprocessing, the same
function training used) and then through the bundle's :class:`~brainscan.inference.classifier.Classifier`
(one compiled ``tf.function``, the manifest's flip TTA and temperature: what the service serves),
batch by batch, so memory stays at one batch of network input whatever the number of images.

Example:
    >>> bundle = load_bundle("models/classification/resnet50/v1")
    >>> probabilities = classify_images(bundle, [Path("a.jpg"), Path("b.png")])   # (2, 4)
    >>> [bundle.classes[k] for k in probabilities.argmax(axis=1)]
    ['glioma', 'notumor']
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from brainscan.errors import BrainscanError, EmptyInputError
from brainscan.inference.classifier import (
    DEFAULT_BATCH_SIZE,
    ProgressFn,
    _check_classifier,
    classifier_for,
    classify_images,
    make_predict_fn,
    predict_probabilities,
    preprocess_one,
    resolve_batch_size,
    source_name,
)

def evaluate_classifier(
    bundle: Any,
    records: Sequence[Any],
    *,
    batch_size: int | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Predict labelled images and compute every classification metric, one split at a time.

    Splits (``Training``, ``Testing``) are reported separately: pooling a split the model trained
    on with the test split would hide overfitting.

    Args:
        bundle: a classification bundle whose ``classes`` the records' ``label_index`` refers to
            (read the dataset with ``read_kaggle_folder(root, classes=bundle.classes)``).
        records: :class:`~brainscan.data.kaggle.ImageRecord` list, any mix of splits.
        batch_size: images per network call.
        progress: called with ``(images_done, images_total)`` over all splits.

    Returns:
        ``{split: {"report": classification_report(...), "seconds": float,
        "images_per_second": float, "predictions": [{"path", "true", "predicted", "confidence"}],
        "failed": [{"path", "error", "detail"}]}}`` in the order splits first appear. Images that
        cannot be decoded are listed in ``failed`` and left out of the metrics.

    Raises:
        EmptyInputError: ``records`` is empty, or no image of a split could be decoded.
    """
    from brainscan.metrics.classification import classification_report

    _check_classifier(bundle)
    if not records:
        raise EmptyInputError("no labelled images to evaluate")
    classes = list(bundle.classes)
    by_split: dict[str, list[Any]] = {}
    for record in records:
        by_split.setdefault(record.split, []).append(record)
    predict_fn = make_predict_fn(bundle, batch_size)  # traced once for every split
    total, done_before = len(records), 0
    results: dict[str, Any] = {}
    for split, split_records in by_split.items():
        offset = done_before

        def report_progress(done: int, _total: int, offset: int = offset) -> None:
            if progress is not None:
                progress(offset + done, total)

        started = time.perf_counter()
        errors: dict[int, BrainscanError] = {}
        probabilities = classify_images(bundle, [r.path for r in split_records], batch_size=batch_size,
                                        progress=report_progress, predict_fn=predict_fn, errors=errors)
        seconds = time.perf_counter() - started
        done_before += len(split_records)
        kept = [i for i in range(len(split_records)) if i not in errors]
        if not kept:
            raise EmptyInputError(f"none of the {len(split_records)} images of split {split!r} could be decoded; "
                                  f"first error: {next(iter(errors.values())).message}")
        evaluated = [split_records[i] for i in kept]
        probabilities = probabilities[kept].astype(np.float64)
        y_true = np.array([r.label_index for r in evaluated])
        predicted = probabilities.argmax(axis=1)
        results[split] = {
            "report": classification_report(y_true, probabilities, classes),
            "seconds": seconds,
            "images_per_second": len(split_records) / seconds if seconds > 0 else None,
            "predictions": [
                {"path": str(r.path), "true": r.label, "predicted": classes[int(k)],
                 "confidence": float(probabilities[i, k])}
                for i, (r, k) in enumerate(zip(evaluated, predicted))
            ],
            "failed": [{"path": str(split_records[i].path), "error": exc.code, "detail": exc.message}
                       for i, exc in errors.items()],
        }
    return results


__all__ = [
    "DEFAULT_BATCH_SIZE", "classifier_for", "classify_images", "evaluate_classifier", "make_predict_fn",
    "predict_probabilities",
    "preprocess_one", "resolve_batch_size", "source_name",
]
