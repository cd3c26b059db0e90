"""The one prediction path for 2D slices: preprocessing, the compiled forward pass, flip TTA, temperature.

A :class:`Classifier` is built from a bundle (its manifest's ``inference`` section says whether
test-time flipping is on and which temperature calibrates the probabilities) or around an
in-memory model (training). The classifier service, ``brainscan predict``, ``brainscan evaluate``,
training validation and ``brainscan models calibrate`` all call it, so the figure a report gives
is the figure the service serves.

Temperature scaling (Guo et al. 2017) divides the logits by ``T`` before the softmax. The networks
end in a softmax, so it is applied to the log-probabilities, which differ from the logits by a
per-image constant: ``softmax(log p / T) == softmax(logits / T)``. ``T > 1`` softens
over-confident outputs; it never changes the predicted class.

Example:
    >>> classifier = Classifier.from_bundle(load_bundle("models/classification/resnet50/1"))
    >>> classifier.probabilities(np.stack([classifier.preprocess(raw)]))   # (1, 4), calibrated
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from brainscan.errors import BrainscanError, BundleError, EmptyInputError

#: Test-time augmentations a classifier may average over: ``flip_lr`` mirrors the slice left-right
#: (brains are near-symmetric; tumours occur on either side).
TTA_CHOICES = ("flip_lr",)
#: Temperatures searched by :func:`fit_temperature`.
TEMPERATURE_RANGE = (0.05, 20.0)


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log p / T)`` row-wise; ``T == 1`` returns the input unchanged (as float32)."""
    probabilities = np.asarray(probabilities, dtype=np.float32)
    if temperature == 1.0 or probabilities.size == 0:
        return probabilities
    logits = np.log(np.clip(probabilities.astype(np.float64), 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=-1, keepdims=True)
    scaled = np.exp(logits)
    return (scaled / scaled.sum(axis=-1, keepdims=True)).astype(np.float32)


def fit_temperature(probabilities: np.ndarray, y_true: np.ndarray) -> float:
    """The temperature that minimises the negative log-likelihood of ``y_true`` (bounded 1-D search).

    Args:
        probabilities: ``(N, K)`` uncalibrated probabilities (with any TTA already averaged in).
        y_true: ``(N,)`` class indices.

    Raises:
        ValueError: shapes that do not match, or no images.
    """
    from scipy.optimize import minimize_scalar

    probabilities = np.asarray(probabilities, dtype=np.float64)
    y_true = np.asarray(y_true, dtype=np.int64)
    if probabilities.ndim != 2 or len(probabilities) == 0 or len(probabilities) != len(y_true):
        raise ValueError(f"need (N, K) probabilities and N labels, got {probabilities.shape} and {y_true.shape}")
    log_p = np.log(np.clip(probabilities, 1e-12, 1.0))

    def nll(log_t: float) -> float:
        z = log_p / np.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        log_softmax = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float(-log_softmax[np.arange(len(y_true)), y_true].mean())

    low, high = np.log(TEMPERATURE_RANGE[0]), np.log(TEMPERATURE_RANGE[1])
    result = minimize_scalar(nll, bounds=(low, high), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(result.x))


def select_calibration(plain: np.ndarray, flipped: np.ndarray, y_true: np.ndarray) -> dict[str, Any]:
    """Choose flip TTA and fit the temperature on labelled (validation) images.

    Flip TTA is switched on only when it classifies more images right than the plain network (it
    doubles the network time of every request); the temperature is then fitted on the chosen
    outputs. Nothing here changes a prediction except the TTA choice.

    Args:
        plain: ``(N, K)`` probabilities of the images as they are.
        flipped: ``(N, K)`` probabilities of the same images mirrored left-right.
        y_true: ``(N,)`` class indices.

    Returns:
        ``{"tta": [...], "temperature": T, "candidates": [{"tta", "accuracy", "nll", "ece"}...],
        "ece_before": ..., "ece_after": ..., "nll_before": ..., "nll_after": ...}``; "before" is the
        plain network, "after" what will be served.
    """
    from brainscan.metrics.classification import expected_calibration_error

    y_true = np.asarray(y_true, dtype=np.int64)

    def scores(probabilities: np.ndarray) -> dict[str, float]:
        p = np.asarray(probabilities, dtype=np.float64)
        p = p / p.sum(axis=1, keepdims=True)
        nll = float(-np.log(np.clip(p[np.arange(len(y_true)), y_true], 1e-12, 1.0)).mean())
        return {"accuracy": float((p.argmax(axis=1) == y_true).mean()), "nll": nll,
                "ece": float(expected_calibration_error(y_true, p)[0])}

    averaged = (np.asarray(plain, np.float64) + np.asarray(flipped, np.float64)) / 2.0
    candidates = [{"tta": [], **scores(plain)}, {"tta": ["flip_lr"], **scores(averaged)}]
    use_flip = candidates[1]["accuracy"] > candidates[0]["accuracy"]
    chosen = averaged if use_flip else np.asarray(plain, np.float64)
    temperature = fit_temperature(chosen, y_true)
    after = scores(apply_temperature(chosen, temperature))
    return {"tta": ["flip_lr"] if use_flip else [], "temperature": temperature, "candidates": candidates,
            "ece_before": candidates[0]["ece"], "ece_after": after["ece"], "nll_before": candidates[0]["nll"],
            "nll_after": after["nll"], "accuracy_before": candidates[0]["accuracy"], "accuracy_after": after["accuracy"],
            "images": int(len(y_true))}


class Classifier:
    """A classification network with everything needed to serve it.

    Args:
        model: the Keras model (``(B, S, S, C) -> (B, K)`` softmax), or ``None`` with ``predict_fn``.
        preprocess: ``image (bytes | path | array) -> (S, S, C) float32``: the bundle's preprocessing
            (``None`` for a classifier fed preprocessed batches only, as in training).
        classes: class names in output order.
        batch_size: largest batch per network call (TTA doubles the images of a batch).
        tta: augmentations averaged with the plain prediction, from :data:`TTA_CHOICES`.
        temperature: divides the logits (1: no calibration).
        predict_fn: a ready ``batch -> probabilities`` forward pass (built from ``model`` if None).

    Raises:
        ValueError: an unknown augmentation, a temperature that is not > 0, no model and no predict_fn.
    """

    def __init__(self, model: Any, preprocess: Callable[[Any], np.ndarray] | None, classes: Sequence[str], *,
                 batch_size: int = 32, tta: Sequence[str] = (), temperature: float = 1.0,
                 predict_fn: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        unknown = sorted(set(tta) - set(TTA_CHOICES))
        if unknown:
            raise ValueError(f"unknown test-time augmentation(s) {unknown}; known: {list(TTA_CHOICES)}")
        if not (isinstance(temperature, (int, float)) and np.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        if model is None and predict_fn is None:
            raise ValueError("Classifier needs a model or a predict_fn")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model = model
        self.preprocess = preprocess
        self.classes = list(classes)
        self.batch_size = int(batch_size)
        self.tta = tuple(tta)
        self.temperature = float(temperature)
        self._predict_fn = predict_fn

    @classmethod
    def from_bundle(cls, bundle: Any, *, batch_size: int | None = None, overrides: dict[str, Any] | None = None,
                    predict_fn: Callable[[np.ndarray], np.ndarray] | None = None) -> Classifier:
        """The classifier a bundle's manifest describes (``tta``, ``temperature``); ``overrides`` win.

        Raises:
            BundleError: not a classification bundle, or an ``inference`` section that cannot be used.
        """
        if bundle.task != "classification":
            raise BundleError(f"bundle {bundle.name} ({bundle.path}) is a {bundle.task} model; "
                              "a classification bundle is needed")
        spec, given = bundle.spec.inference, overrides or {}
        try:
            return cls(bundle.model, bundle.preprocess, bundle.classes,
                       batch_size=int(batch_size or given.get("batch_size", spec.batch_size) or DEFAULT_BATCH_SIZE),
                       tta=tuple(given.get("tta", spec.tta) or ()),
                       temperature=float(given.get("temperature", spec.temperature)), predict_fn=predict_fn)
        except (TypeError, ValueError) as exc:
            raise BundleError(f"bundle {bundle.path}: inference section: {exc}") from exc

    @property
    def predict_fn(self) -> Callable[[np.ndarray], np.ndarray]:
        """The compiled forward pass (built once, on first use)."""
        if self._predict_fn is None:
            from brainscan.inference.sliding_window import keras_predict_fn

            self._predict_fn = keras_predict_fn(self.model, batch_size=self.batch_size)
        return self._predict_fn

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """Uncalibrated probabilities ``(N, K)`` of preprocessed images, averaged over the TTA views."""
        batch = np.asarray(batch, dtype=np.float32)
        if batch.ndim != 4:
            raise ValueError(f"batch must be (N, S, S, C), got shape {batch.shape}")
        if batch.shape[0] == 0:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        views = [batch]
        if "flip_lr" in self.tta:
            views.append(batch[:, :, ::-1, :])
        # One network call for all views: TTA costs network time, not extra calls.
        outputs = np.asarray(self.predict_fn(np.concatenate(views, axis=0)), dtype=np.float32)
        outputs = outputs.reshape(len(views), batch.shape[0], -1)
        return outputs.mean(axis=0)

    def calibrate(self, probabilities: np.ndarray) -> np.ndarray:
        """Apply the temperature to :meth:`forward`'s output."""
        return apply_temperature(probabilities, self.temperature)

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Served probabilities ``(N, K)`` of preprocessed images: TTA, then temperature."""
        return self.calibrate(self.forward(batch))

    def manifest_inference(self) -> dict[str, Any]:
        """The ``inference`` section a bundle of this classifier records."""
        return {"batch_size": self.batch_size, "tta": list(self.tta), "temperature": round(self.temperature, 6)}


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
        batch_size = bundle.spec.inference.batch_size or DEFAULT_BATCH_SIZE
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


def make_predict_fn(bundle: Any, batch_size: int | None = None) -> PredictFn:
    """The bundle's network as one compiled function, ``(N, ...) float32 -> (N, K) or (N, ..., K)``.

    Build it once and pass it to :func:`predict_probabilities` / :func:`classify_images` /
    :func:`~brainscan.inference.segmenter.segment_case` for repeated calls: each new function
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


__all__ = ["Classifier", "DEFAULT_BATCH_SIZE", "TEMPERATURE_RANGE", "TTA_CHOICES", "apply_temperature",
           "classifier_for", "classify_images", "fit_temperature", "make_predict_fn", "predict_probabilities",
           "preprocess_one", "resolve_batch_size", "select_calibration", "source_name"]
