"""Sliding-window inference for 3D segmentation: overlapping patches, Gaussian blending, mirroring.

A whole BraTS case (240x240x155) rarely fits a network trained on 128^3 patches, so the volume is
covered by a grid of overlapping patches (nnU-Net style: evenly spaced, the last patch flush with
the end, so every voxel is covered). Each patch prediction is weighted by a Gaussian importance
map, because a convolutional network sees less context near a patch's border and is less reliable
there; the weighted sum is divided by the summed weights at the end.

The core is framework-light: it takes any ``predict_fn(batch) -> probabilities`` working on numpy
arrays, so it is tested with plain numpy functions and serves TensorFlow, ONNX Runtime or anything
else. :func:`keras_predict_fn` wraps a Keras model (TensorFlow is imported only there).

Memory: the accumulator is ``(X, Y, Z, K)`` float32 plus a ``(X, Y, Z)`` float32 weight sum; the
patches are cut lazily, one batch at a time. For a 240x240x155 case with K=4 that is ~143 MB for
the accumulator (which becomes the returned array) plus ~36 MB of weights, plus one batch of input
and output patches (2 x 128^3 x 4 channels in and 4 classes out: ~67 MB each).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from brainscan.errors import BadDimensionsError, EmptyInputError, NonFiniteError

PredictFn = Callable[[np.ndarray], np.ndarray]
ProgressFn = Callable[[int, int], None]

#: Smallest value of the (max-normalised) importance map: patch corners get a tiny but positive
#: weight, so a voxel that only a patch corner covers never divides by zero.
MIN_IMPORTANCE = 1e-4

_PAD_MODES = ("constant", "edge", "reflect", "symmetric", "minimum", "mean")


def _check_patch_size(patch_size: Sequence[int]) -> tuple[int, int, int]:
    patch = tuple(patch_size)
    if len(patch) != 3 or not all(isinstance(p, (int, np.integer)) and p > 0 for p in patch):
        raise ValueError(f"patch_size must be three positive integers, got {patch_size}")
    return tuple(int(p) for p in patch)  # type: ignore[return-value]


def _check_overlap(overlap: float) -> float:
    if not isinstance(overlap, (int, float, np.floating)) or not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    return float(overlap)


def _check_spatial_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    spatial = tuple(shape)
    if len(spatial) != 3 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in spatial):
        raise ValueError(f"shape must be three positive integers (X, Y, Z), got {shape}")
    return tuple(int(s) for s in spatial)  # type: ignore[return-value]


def _check_mirror_axes(mirror_axes: Sequence[int]) -> tuple[int, ...]:
    axes = tuple(mirror_axes)
    if any(a not in (0, 1, 2) for a in axes) or len(set(axes)) != len(axes):
        raise ValueError(
            f"mirror_axes must be distinct spatial axes among (0, 1, 2), got {mirror_axes}"
        )
    return axes


def _mirror_combinations(mirror_axes: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Every subset of the mirror axes (the empty one first): 2 ** len(mirror_axes) passes."""
    return [c for r in range(len(mirror_axes) + 1) for c in itertools.combinations(mirror_axes, r)]


def patch_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start indices of the patches along one axis (nnU-Net style).

    The target step is ``patch * (1 - overlap)`` (at least 1 voxel); the number of patches is the
    fewest that keep every step at or below it, and the starts are spread evenly from 0 to
    ``size - patch`` so the last patch is flush with the end. An axis shorter than the patch is
    padded to the patch size by the caller, so it gets the single start 0.

    Args:
        size: length of the axis in voxels.
        patch: patch length along the axis.
        overlap: fraction of a patch shared with its neighbour, in [0, 1).

    Returns:
        sorted, distinct start indices; the first is 0 and the last ``max(size, patch) - patch``.
    """
    overlap = _check_overlap(overlap)
    if size <= patch:
        return [0]
    target_step = max(1.0, patch * (1.0 - overlap))
    n_steps = math.ceil((size - patch) / target_step) + 1
    actual_step = (size - patch) / (n_steps - 1)
    return [int(round(actual_step * i)) for i in range(n_steps)]


def count_patches(
    shape: Sequence[int],
    patch_size: Sequence[int],
    overlap: float = 0.5,
    *,
    mirror_axes: Sequence[int] = (),
) -> int:
    """Number of network passes :func:`sliding_window_inference` makes, known before it starts.

    Args:
        shape: spatial shape ``(X, Y, Z)`` of the volume.
        patch_size: ``(px, py, pz)``.
        overlap: fraction of a patch shared with its neighbour, in [0, 1).
        mirror_axes: test-time mirroring axes; each patch is predicted ``2 ** len(mirror_axes)``
            times. With the default ``()`` this is the number of patches.

    Returns:
        patches per axis multiplied together, times the mirroring passes.

    Raises:
        ValueError: for a bad shape, patch size, overlap or mirror axis.
    """
    spatial = _check_spatial_shape(shape)
    patch = _check_patch_size(patch_size)
    overlap = _check_overlap(overlap)
    passes = len(_mirror_combinations(_check_mirror_axes(mirror_axes)))
    return math.prod(len(patch_starts(s, p, overlap)) for s, p in zip(spatial, patch)) * passes


def gaussian_importance_map(
    patch_size: Sequence[int], sigma_scale: float = 0.125, *, min_value: float = MIN_IMPORTANCE
) -> np.ndarray:
    """Separable Gaussian weight centred on the patch, max 1, clamped below at ``min_value``.

    Args:
        patch_size: ``(px, py, pz)``.
        sigma_scale: sigma per axis as a fraction of the patch length (nnU-Net uses 1/8).
        min_value: lower clamp, > 0, so border voxels keep a positive weight.

    Returns:
        float32 array of shape ``(px, py, pz)``.

    Raises:
        ValueError: for a bad patch size, a non-positive sigma_scale or min_value.
    """
    patch = _check_patch_size(patch_size)
    if not sigma_scale > 0 or not math.isfinite(sigma_scale):
        raise ValueError(f"gaussian_sigma_scale must be a positive number, got {sigma_scale}")
    if not 0 < min_value <= 1:
        raise ValueError(f"min_value must be in (0, 1], got {min_value}")
    importance = np.ones(patch, dtype=np.float64)
    for axis, p in enumerate(patch):
        coords = np.arange(p, dtype=np.float64) - (p - 1) / 2.0
        profile = np.exp(-0.5 * (coords / (sigma_scale * p)) ** 2)
        importance *= profile.reshape([p if a == axis else 1 for a in range(3)])
    importance /= importance.max()
    return np.maximum(importance, min_value).astype(np.float32)


def _check_volume(volume: np.ndarray) -> np.ndarray:
    array = np.asarray(volume)
    if array.ndim != 4:
        raise BadDimensionsError(
            f"volume must be 4D (X, Y, Z, C), got shape {array.shape}; "
            "add a channel axis with volume[..., None] for a single modality"
        )
    if array.size == 0:
        raise EmptyInputError(f"volume is empty, shape {array.shape}")
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        raise NonFiniteError("volume holds NaN or infinite intensities; fix them before inference")
    return array


def _predict_batch(
    predict_fn: PredictFn, batch: np.ndarray, num_classes: int | None, patch: tuple[int, int, int]
) -> np.ndarray:
    out = np.asarray(predict_fn(batch), dtype=np.float32)
    expected = (batch.shape[0], *patch)
    if out.ndim != 5 or out.shape[:4] != expected:
        raise ValueError(f"predict_fn must return shape {(*expected, 'K')}, got {out.shape}")
    if num_classes is not None and out.shape[4] != num_classes:
        raise ValueError(
            f"predict_fn returned {out.shape[4]} classes, expected num_classes={num_classes}"
        )
    if not np.isfinite(out).all():
        raise RuntimeError("predict_fn returned NaN or infinite values; the model is broken")
    return out


def _batched_starts(
    grid: list[list[int]], batch_size: int
) -> Iterator[list[tuple[int, int, int]]]:
    starts = itertools.product(*grid)
    while batch := list(itertools.islice(starts, batch_size)):
        yield batch  # type: ignore[misc]


def sliding_window_inference(
    volume: np.ndarray,
    predict_fn: PredictFn,
    *,
    patch_size: tuple[int, int, int],
    overlap: float = 0.5,
    batch_size: int = 2,
    num_classes: int | None = None,
    gaussian_sigma_scale: float = 0.125,
    mirror_axes: tuple[int, ...] = (),
    progress: ProgressFn | None = None,
    pad_mode: str = "constant",
) -> np.ndarray:
    """Predict a whole volume patch by patch and blend the patches with Gaussian weights.

    Args:
        volume: ``(X, Y, Z, C)`` preprocessed intensities (e.g. C=4 in MODALITIES order).
        predict_fn: maps a float32 batch ``(B, px, py, pz, C)`` to ``(B, px, py, pz, K)``
            (probabilities, e.g. softmax); B is at most ``batch_size``.
        patch_size: ``(px, py, pz)``, the network's input size.
        overlap: fraction of a patch shared with its neighbour, in [0, 1).
        batch_size: patches per ``predict_fn`` call.
        num_classes: K, checked against the output when given; inferred otherwise.
        gaussian_sigma_scale: Gaussian sigma as a fraction of the patch length per axis.
        mirror_axes: spatial axes (0, 1, 2) to mirror for test-time augmentation; every
            combination of flips is predicted (``2 ** len(mirror_axes)`` passes), flipped back
            and averaged.
        progress: called after every ``predict_fn`` call with ``(patches_done, patches_total)``;
            ``patches_total`` is :func:`count_patches` with the same arguments (mirroring
            passes included), and the last call is ``(total, total)``.
        pad_mode: ``numpy.pad`` mode for axes shorter than the patch (``"constant"`` pads 0);
            the padding is centred and cropped away from the result.

    Returns:
        float32 ``(X, Y, Z, K)`` blended probabilities.

    Raises:
        BadDimensionsError: if the volume is not 4D.
        EmptyInputError: if the volume has no voxels.
        NonFiniteError: if the volume holds NaN or infinity.
        ValueError: for a bad patch size, overlap, batch size, mirror axis, pad mode or sigma
            scale, or when ``predict_fn`` returns the wrong shape or number of classes.
        RuntimeError: if ``predict_fn`` returns NaN or infinity.

    Memory:
        ``(X, Y, Z, K)`` float32 accumulator (returned in place) + ``(X, Y, Z)`` float32 weights +
        one batch of patches. A 240x240x155 case with K=4: 142.8 MB accumulator, 35.7 MB weights;
        with 128^3 patches, batch 2, C=4: 67 MB of input patches and 67 MB of predictions.

    Example:
        >>> predict_fn = keras_predict_fn(model, batch_size=2)
        >>> probs = sliding_window_inference(image, predict_fn, patch_size=(128, 128, 128))
    """
    patch = _check_patch_size(patch_size)
    overlap = _check_overlap(overlap)
    axes = _check_mirror_axes(mirror_axes)
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    bad_classes = not isinstance(num_classes, (int, np.integer)) or num_classes < 1
    if num_classes is not None and bad_classes:
        raise ValueError(f"num_classes must be a positive integer or None, got {num_classes}")
    if pad_mode not in _PAD_MODES:
        raise ValueError(f"pad_mode must be one of {_PAD_MODES}, got {pad_mode!r}")
    importance = gaussian_importance_map(patch, gaussian_sigma_scale)
    image = _check_volume(volume)

    original = image.shape[:3]
    pad_before = [max(p - s, 0) // 2 for s, p in zip(original, patch)]
    padding = [(b, max(p - s, 0) - b) for b, s, p in zip(pad_before, original, patch)]
    if any(sum(pad) for pad in padding):
        image = np.pad(image, [*padding, (0, 0)], mode=pad_mode)
    spatial = image.shape[:3]

    grid = [patch_starts(s, p, overlap) for s, p in zip(spatial, patch)]
    flips = _mirror_combinations(axes)
    total = math.prod(len(g) for g in grid) * len(flips)
    done = 0
    summed: np.ndarray | None = None
    weights = np.zeros(spatial, dtype=np.float32)
    for starts in _batched_starts(grid, batch_size):
        batch = np.stack(
            [image[x : x + patch[0], y : y + patch[1], z : z + patch[2]] for x, y, z in starts]
        )
        averaged: np.ndarray | None = None
        for flip in flips:
            # Spatial axis a is array axis a + 1 in the batch (axis 0 holds the patches).
            batch_axes = tuple(a + 1 for a in flip)
            flipped = np.flip(batch, batch_axes) if flip else batch
            pred = _predict_batch(predict_fn, flipped, num_classes, patch)
            if flip:
                pred = np.flip(pred, batch_axes)
            averaged = pred if averaged is None else averaged + pred
            num_classes = pred.shape[4]
            done += len(starts)
            if progress is not None:
                progress(done, total)
        assert averaged is not None
        if len(flips) > 1:
            averaged /= len(flips)
        if summed is None:
            summed = np.zeros((*spatial, averaged.shape[4]), dtype=np.float32)
        for (x, y, z), pred in zip(starts, averaged):
            window = (slice(x, x + patch[0]), slice(y, y + patch[1]), slice(z, z + patch[2]))
            summed[window] += pred * importance[..., None]
            weights[window] += importance
    assert summed is not None
    summed /= weights[..., None]
    if any(sum(pad) for pad in padding):
        crop = tuple(slice(b, b + s) for b, s in zip(pad_before, original))
        summed = np.ascontiguousarray(summed[crop])
    return summed


def predict_segmentation(volume: np.ndarray, predict_fn: PredictFn, **kwargs) -> np.ndarray:
    """Class index per voxel: argmax of :func:`sliding_window_inference`.

    Args:
        volume: ``(X, Y, Z, C)`` preprocessed intensities.
        predict_fn: as for :func:`sliding_window_inference`.
        **kwargs: the keyword arguments of :func:`sliding_window_inference`.

    Returns:
        uint8 ``(X, Y, Z)`` class indices (0..K-1; map to BraTS labels with
        ``brainscan.labels.index_to_brats``).

    Raises:
        ValueError: if the model predicts more than 256 classes, and as
            :func:`sliding_window_inference`.
    """
    probabilities = sliding_window_inference(volume, predict_fn, **kwargs)
    if probabilities.shape[-1] > 256:
        raise ValueError(f"uint8 class indices need K <= 256, got K={probabilities.shape[-1]}")
    return np.argmax(probabilities, axis=-1).astype(np.uint8)


def keras_predict_fn(model, batch_size: int = 2) -> PredictFn:
    """Wrap a Keras model as a ``predict_fn`` backed by one compiled ``tf.function`` (other Keras
    backends: the model's own compiled ``predict_on_batch``).

    ``tf.function`` is faster than ``model.predict`` on this CPU and avoids its per-call overhead;
    XLA (``jit_compile``) is deliberately off because it runs Conv3D 13-25x slower here.
    ``reduce_retracing`` keeps a smaller last batch from forcing one trace per batch size.

    Args:
        model: a Keras model mapping ``(B, px, py, pz, C)`` to ``(B, px, py, pz, K)``.
        batch_size: largest batch handed to the model at once; bigger inputs are split.

    Returns:
        ``predict_fn(batch: np.ndarray) -> np.ndarray`` float32.

    Raises:
        ValueError: if batch_size is not a positive integer, or (when called) the model has
            several outputs.
    """
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    import keras  # lazily: the numpy core and the services that use it stay TF-free

    if keras.backend.backend() != "tensorflow":
        # Another Keras backend (JAX on a GPU machine without TensorFlow): its compiled predict step.
        forward = model.predict_on_batch
    else:
        import tensorflow as tf

        @tf.function(reduce_retracing=True, jit_compile=False)
        def forward(x):
            return model(x, training=False)

    def predict(batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch, dtype=np.float32)
        outputs = []
        for start in range(0, batch.shape[0], batch_size):
            out = forward(batch[start : start + batch_size])
            if isinstance(out, (list, tuple, dict)):
                raise ValueError("keras_predict_fn needs a model with a single output tensor")
            outputs.append(np.asarray(out, dtype=np.float32))
        return np.concatenate(outputs, axis=0)

    return predict
