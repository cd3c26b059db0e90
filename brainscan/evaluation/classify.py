"""Classify 2D slices with a classification bundle, and evaluate a bundle on a Kaggle-layout dataset.

Every image goes through ``bundle.preprocess`` (the manifest's ``image2d`` preprocessing, the same
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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from brainscan.errors import BrainscanError, BundleError, EmptyInputError

ProgressFn = Callable[[int, int], None]
PredictFn = Callable[[np.ndarray], np.ndarray]
ImageSource = bytes | str | Path | np.ndarray

#: Images per network call when neither the caller nor the manifest says otherwise.
DEFAULT_BATCH_SIZE = 32



def _check_classifier(bundle: Any) -> None:
    if bundle.task != "classification":
        raise BundleError(
            f"bundle {bundle.name} ({bundle.path}) is a {bundle.task} model; a classification bundle is needed"
        )


def resolve_batch_size(bundle: Any, batch_size: int | None) -> int:
    """``batch_size`` if given, else the manifest's ``inference.batch_size``, else 32.

    Raises:
        ValueError: ``batch_size`` is not a positive integer.
    """
    if batch_size is None:
        batch_size = bundle.inference.get("batch_size") or DEFAULT_BATCH_SIZE
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


def make_predict_fn(bundle: Any, batch_size: int | None = None) -> PredictFn:
    """The bundle's network as one compiled function, ``(N, ...) float32 -> (N, K) or (N, ..., K)``.

    Build it once and pass it to :func:`predict_probabilities` / :func:`classify_images` /
    :func:`~brainscan.evaluation.segment.segment_case` for repeated calls: each new function
    traces the graph again (about a second on CPU).

    Args:
        bundle: any :class:`~brainscan.models.bundle.Bundle`.
        batch_size: largest batch per network call (default: the manifest's, else 32).
    """
    from brainscan.inference.sliding_window import keras_predict_fn

    return keras_predict_fn(bundle.model, batch_size=resolve_batch_size(bundle, batch_size))


def source_name(image: ImageSource, index: int) -> str:
    """How messages name an image: its path, else ``image <index>``."""
    return str(image) if isinstance(image, (str, Path)) else f"image {index}"


def preprocess_one(bundle: Any, image: ImageSource, *, name: str = "image") -> np.ndarray:
    """Read (if a path) and preprocess one image exactly as the bundle's training did.

    Args:
        bundle: a classification :class:`~brainscan.models.bundle.Bundle`.
        image: a file path, encoded file bytes, or a decoded array ``(H, W[, C])``.
        name: how error messages name the image.

    Returns:
        float32 ``(S, S, C)`` network input.

    Raises:
        FileNotFoundError: a path that does not exist.
        EmptyInputError: a path that is a folder, or empty content.
        The errors of :func:`brainscan.preprocess.image2d.preprocess_image`, their message
        prefixed with ``name``.
    """
    if isinstance(image, (str, Path)):
        path = Path(image)
        if path.is_dir():
            raise EmptyInputError(f"{name}: is a folder, not an image file")
        image = path.read_bytes()
    try:
        return bundle.preprocess(image)
    except BrainscanError as exc:
        raise type(exc)(f"{name}: {exc.message}", code=exc.code) from exc


def predict_probabilities(
    bundle: Any, batch: np.ndarray, *, batch_size: int | None = None, predict_fn: PredictFn | None = None
) -> np.ndarray:
    """Run the network on already preprocessed images.

    Args:
        bundle: a classification bundle.
        batch: float32 ``(N, S, S, C)`` from :func:`preprocess_one` (N may be 0).
        batch_size: images per network call (default: the manifest's, else 32).
        predict_fn: from :func:`make_predict_fn`, to reuse across calls (built here if ``None``).

    Returns:
        float32 ``(N, K)`` class probabilities, columns in ``bundle.classes`` order.

    Raises:
        BundleError: ``bundle`` is not a classification bundle.
        ValueError: ``batch`` is not 4D.
    """
    _check_classifier(bundle)
    batch = np.asarray(batch, dtype=np.float32)
    if batch.ndim != 4:
        raise ValueError(f"batch must be (N, S, S, C), got shape {batch.shape}")
    return classifier_for(bundle, batch_size, predict_fn).probabilities(batch)


def classifier_for(bundle: Any, batch_size: int | None = None, predict_fn: PredictFn | None = None) -> Any:
    """The bundle's :class:`~brainscan.inference.classifier.Classifier` (its TTA and temperature)."""
    from brainscan.inference.classifier import Classifier

    size = resolve_batch_size(bundle, batch_size)
    return Classifier.from_bundle(bundle, batch_size=size, predict_fn=predict_fn or make_predict_fn(bundle, size))


def classify_images(
    bundle: Any,
    images: Sequence[ImageSource],
    *,
    batch_size: int | None = None,
    progress: ProgressFn | None = None,
    predict_fn: PredictFn | None = None,
    errors: dict[int, BrainscanError] | None = None,
) -> np.ndarray:
    """Class probabilities of many images, preprocessing and predicting one batch at a time.

    Args:
        bundle: a classification :class:`~brainscan.models.bundle.Bundle`.
        images: file paths, encoded bytes or decoded arrays (mixed is fine).
        batch_size: images per network call (default: the manifest's ``inference.batch_size``, else 32).
        progress: called after each batch with ``(images_done, images_total)``.
        predict_fn: from :func:`make_predict_fn`, to reuse across calls (built here if ``None``).
        errors: if given, an image that cannot be read or decoded does not stop the run: its
            error is stored here under its index and its row of the result is NaN.

    Returns:
        float32 ``(N, K)`` probabilities, rows in the order of ``images``, columns in
        ``bundle.classes`` order.

    Raises:
        BundleError: ``bundle`` is not a classification bundle.
        The errors of :func:`preprocess_one` for the first bad image (named in the message),
        unless ``errors`` is given.
    """
    _check_classifier(bundle)
    size = resolve_batch_size(bundle, batch_size)
    classifier = classifier_for(bundle, size, predict_fn)
    total = len(images)
    result = np.full((total, len(bundle.classes)), np.nan, dtype=np.float32)
    for start in range(0, total, size):
        inputs, rows = [], []
        for index in range(start, min(start + size, total)):
            try:
                inputs.append(preprocess_one(bundle, images[index], name=source_name(images[index], index)))
                rows.append(index)
            except (BrainscanError, OSError) as exc:
                if errors is None:
                    raise
                errors[index] = exc if isinstance(exc, BrainscanError) else EmptyInputError(
                    f"{source_name(images[index], index)}: cannot read: {exc.strerror or exc}", code="not_readable")
        if inputs:
            result[rows] = classifier.probabilities(np.stack(inputs))
        if progress is not None:
            progress(min(start + size, total), total)
    return result


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
