"""Tests for brainscan.inference.sliding_window: grid, blending, mirroring, progress, Keras."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys

import numpy as np
import pytest

from brainscan.errors import BadDimensionsError, EmptyInputError, NonFiniteError
from brainscan.inference import (
    count_patches,
    gaussian_importance_map,
    keras_predict_fn,
    patch_starts,
    predict_segmentation,
    sliding_window_inference,
)
from tests.paths import REPO_ROOT

NUM_CLASSES = 4
_RNG = np.random.default_rng(1234)
_WEIGHTS = _RNG.normal(size=(3, NUM_CLASSES))
_BIAS = _RNG.normal(size=NUM_CLASSES)


def voxelwise_softmax(batch: np.ndarray) -> np.ndarray:
    """A deterministic, purely per-voxel 'network': softmax of a nonlinear map of the channels."""
    channels = batch.shape[-1]
    logits = np.tanh(batch.astype(np.float64)) @ _WEIGHTS[:channels] + _BIAS
    logits -= logits.max(axis=-1, keepdims=True)
    exp = np.exp(logits)
    return (exp / exp.sum(axis=-1, keepdims=True)).astype(np.float32)


def position_in_patch(batch: np.ndarray) -> np.ndarray:
    """Not voxelwise: adds each voxel's position inside its patch, so patch seams matter."""
    _, px, py, pz, _ = batch.shape
    ramp = (
        np.linspace(0, 1, px)[:, None, None]
        + 0.5 * np.linspace(0, 1, py)[None, :, None]
        + 0.25 * np.linspace(0, 1, pz)[None, None, :]
    )
    first = batch[..., 0] + ramp
    return np.stack([first, 1 - first], axis=-1).astype(np.float32)


def reference_blend(volume, predict_fn, patch, overlap, mirror_axes=(), sigma_scale=0.125):
    """Brute force: one patch at a time, explicit weighted sum over the grid (no padding)."""
    grid = [patch_starts(s, p, overlap) for s, p in zip(volume.shape[:3], patch)]
    importance = gaussian_importance_map(patch, sigma_scale).astype(np.float64)
    flips = [c for r in range(len(mirror_axes) + 1) for c in itertools.combinations(mirror_axes, r)]
    total, weight = None, np.zeros(volume.shape[:3])
    for x, y, z in itertools.product(*grid):
        window = (slice(x, x + patch[0]), slice(y, y + patch[1]), slice(z, z + patch[2]))
        preds = []
        for flip in flips:
            axes = tuple(a + 1 for a in flip)
            pred = predict_fn(np.flip(volume[window][None], axes))
            preds.append(np.flip(pred, axes)[0])
        pred = np.mean(preds, axis=0)
        if total is None:
            total = np.zeros((*volume.shape[:3], pred.shape[-1]))
        total[window] += pred * importance[..., None]
        weight[window] += importance
    return total / weight[..., None]


def random_volume(shape, channels=3, seed=0):
    return np.random.default_rng(seed).normal(size=(*shape, channels)).astype(np.float32)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"overlap": -0.1}, ValueError, r"overlap must be in \[0, 1\), got -0.1"),
        ({"overlap": 1.0}, ValueError, r"overlap must be in \[0, 1\), got 1.0"),
        ({"overlap": float("nan")}, ValueError, r"overlap must be in \[0, 1\), got nan"),
        ({"patch_size": (0, 4, 4)}, ValueError, r"patch_size .* got \(0, 4, 4\)"),
        ({"patch_size": (-2, 4, 4)}, ValueError, r"patch_size .* got \(-2, 4, 4\)"),
        ({"patch_size": (4, 4)}, ValueError, r"patch_size .* got \(4, 4\)"),
        ({"patch_size": (4.5, 4, 4)}, ValueError, r"patch_size .* got \(4.5, 4, 4\)"),
        ({"batch_size": 0}, ValueError, "batch_size must be a positive integer, got 0"),
        ({"mirror_axes": (3,)}, ValueError, r"mirror_axes .* got \(3,\)"),
        ({"mirror_axes": (0, 0)}, ValueError, r"mirror_axes .* got \(0, 0\)"),
        ({"gaussian_sigma_scale": 0.0}, ValueError, "gaussian_sigma_scale .* got 0.0"),
        ({"num_classes": 0}, ValueError, "num_classes .* got 0"),
        ({"num_classes": 3}, ValueError, "returned 4 classes, expected num_classes=3"),
        ({"pad_mode": "wrapped"}, ValueError, "pad_mode .* got 'wrapped'"),
    ],
)
def test_bad_arguments_are_rejected_with_the_bad_value(kwargs, error, message):
    arguments = {"patch_size": (4, 4, 4), **kwargs}
    with pytest.raises(error, match=message):
        sliding_window_inference(random_volume((6, 6, 6)), voxelwise_softmax, **arguments)


@pytest.mark.parametrize(
    "volume, error, message",
    [
        (np.zeros((6, 6, 6), np.float32), BadDimensionsError, r"4D .* got shape \(6, 6, 6\)"),
        (np.zeros((1, 6, 6, 6, 1), np.float32), BadDimensionsError, "got shape"),
        (np.zeros((0, 6, 6, 1), np.float32), EmptyInputError, "empty"),
        (np.full((6, 6, 6, 1), np.nan, np.float32), NonFiniteError, "NaN"),
        (np.full((6, 6, 6, 1), np.inf, np.float32), NonFiniteError, "infinite"),
    ],
)
def test_bad_volumes_raise_brainscan_errors(volume, error, message):
    with pytest.raises(error, match=message):
        sliding_window_inference(volume, voxelwise_softmax, patch_size=(4, 4, 4))


@pytest.mark.parametrize(
    "predict_fn, error, message",
    [
        (lambda b: b[..., 0], ValueError, r"shape \(1, 4, 4, 4, 'K'\), got \(1, 4, 4, 4\)"),
        (lambda b: b[:, :2], ValueError, "must return shape"),
        (lambda b: np.full(b.shape, np.nan, np.float32), RuntimeError, "NaN"),
    ],
)
def test_bad_predict_fn_output_is_reported(predict_fn, error, message):
    with pytest.raises(error, match=message):
        sliding_window_inference(random_volume((4, 4, 4)), predict_fn, patch_size=(4, 4, 4))


@pytest.mark.parametrize(
    "size, patch, overlap, expected",
    [
        (10, 4, 0.5, [0, 2, 4, 6]),  # target step 2 fits exactly
        (10, 4, 0.0, [0, 3, 6]),  # 6 / 4 -> 2 steps of 3, last flush with the end
        (8, 4, 0.0, [0, 4]),  # exact multiple: plain tiling
        (4, 4, 0.5, [0]),
        (3, 4, 0.5, [0]),  # shorter than the patch: padded, one patch
        (240, 128, 0.5, [0, 56, 112]),
        (155, 128, 0.5, [0, 27]),
        (5, 2, 0.9, [0, 1, 2, 3]),  # step never below one voxel
    ],
)
def test_patch_starts_table(size, patch, overlap, expected):
    assert patch_starts(size, patch, overlap) == expected


@pytest.mark.parametrize(
    "shape, patch, overlap, mirror_axes, expected",
    [
        ((240, 240, 155), (128, 128, 128), 0.5, (), 3 * 3 * 2),
        ((240, 240, 155), (128, 128, 128), 0.5, (0, 1, 2), 3 * 3 * 2 * 8),
        ((8, 8, 8), (4, 4, 4), 0.0, (1,), 8 * 2),
        ((3, 3, 3), (4, 4, 4), 0.5, (), 1),
    ],
)
def test_count_patches_table(shape, patch, overlap, mirror_axes, expected):
    assert count_patches(shape, patch, overlap, mirror_axes=mirror_axes) == expected


@pytest.mark.parametrize("shape", [(0, 4, 4), (4, 4), (4, 4, 4, 2)])
def test_count_patches_rejects_bad_shapes(shape):
    with pytest.raises(ValueError, match="shape must be three positive integers"):
        count_patches(shape, (4, 4, 4), 0.5)


@pytest.mark.parametrize(
    "patch, sigma_scale", [((5, 5, 5), 0.125), ((8, 6, 3), 0.125), ((7, 7, 7), 1.0)]
)
def test_gaussian_importance_map_is_centred_symmetric_and_positive(patch, sigma_scale):
    importance = gaussian_importance_map(patch, sigma_scale)
    assert importance.shape == patch and importance.dtype == np.float32
    assert importance.max() == pytest.approx(1.0)
    assert importance.min() > 0
    for axis in range(3):
        np.testing.assert_allclose(importance, np.flip(importance, axis), rtol=1e-6)
    centre = tuple(p // 2 for p in patch)
    assert importance[centre] >= importance[0, 0, 0]


@pytest.mark.parametrize(
    "shape, patch, overlap, mirror_axes, batch_size",
    [
        ((12, 10, 8), (4, 4, 4), 0.5, (), 2),
        ((12, 10, 8), (5, 3, 6), 0.25, (), 3),
        ((8, 8, 8), (4, 4, 4), 0.0, (), 1),  # exact multiple, no overlap
        ((3, 5, 2), (4, 4, 4), 0.5, (), 2),  # smaller than the patch on every axis but one
        ((2, 2, 2), (6, 6, 6), 0.5, (0, 1, 2), 4),
        ((11, 9, 7), (4, 6, 3), 0.6, (0, 2), 5),
        ((9, 9, 9), (9, 9, 9), 0.5, (1,), 2),  # one patch covers the volume
    ],
)
def test_voxelwise_fn_gives_exact_voxelwise_result(shape, patch, overlap, mirror_axes, batch_size):
    volume = random_volume(shape, seed=sum(shape))
    expected = voxelwise_softmax(volume[None])[0]
    result = sliding_window_inference(
        volume, voxelwise_softmax, patch_size=patch, overlap=overlap,
        mirror_axes=mirror_axes, batch_size=batch_size, num_classes=NUM_CLASSES,
    )
    assert result.shape == (*shape, NUM_CLASSES) and result.dtype == np.float32
    np.testing.assert_allclose(result, expected, atol=1e-5)


@pytest.mark.parametrize("seed", range(4))
def test_every_voxel_is_covered_for_random_shapes(seed):
    rng = np.random.default_rng(seed)
    for _ in range(60):
        size, patch = int(rng.integers(1, 60)), int(rng.integers(1, 20))
        overlap = float(rng.uniform(0, 0.95))
        starts = patch_starts(size, patch, overlap)
        padded = max(size, patch)
        covered = np.zeros(padded, bool)
        for start in starts:
            covered[start : start + patch] = True
        assert covered.all(), (size, patch, overlap, starts)
        assert starts[0] == 0 and starts[-1] == padded - patch
        assert starts == sorted(set(starts))

    # End to end: an uncovered voxel would have zero weight and come back NaN, not 1.
    for _ in range(5):
        shape = tuple(int(s) for s in rng.integers(1, 14, size=3))
        patch = tuple(int(p) for p in rng.integers(1, 8, size=3))
        overlap = float(rng.uniform(0, 0.9))
        seen = []

        def ones(batch):
            seen.append(batch.shape[0])
            return np.ones((*batch.shape[:4], 1), np.float32)

        result = sliding_window_inference(
            random_volume(shape, seed=seed), ones, patch_size=patch, overlap=overlap, batch_size=3
        )
        np.testing.assert_allclose(result, 1.0, rtol=1e-6)
        assert sum(seen) == count_patches(shape, patch, overlap)
        assert max(seen) <= 3  # patches are batched, never all cut at once


@pytest.mark.parametrize(
    "shape, patch, overlap, batch_size, mirror_axes",
    [
        ((12, 10, 8), (4, 4, 4), 0.5, 1, ()),
        ((12, 10, 8), (4, 4, 4), 0.5, 4, ()),
        ((12, 10, 8), (5, 5, 5), 0.3, 7, (0,)),
        ((6, 6, 6), (4, 4, 4), 0.0, 1, (0, 1, 2)),
        ((3, 3, 3), (4, 4, 4), 0.5, 2, (2,)),
    ],
)
def test_progress_counts_every_pass_up_to_count_patches(
    shape, patch, overlap, batch_size, mirror_axes
):
    calls = []
    sliding_window_inference(
        random_volume(shape), voxelwise_softmax, patch_size=patch, overlap=overlap,
        batch_size=batch_size, mirror_axes=mirror_axes, progress=lambda k, n: calls.append((k, n)),
    )
    patches = count_patches(shape, patch, overlap)
    passes = 2 ** len(mirror_axes)
    total = count_patches(shape, patch, overlap, mirror_axes=mirror_axes)
    assert total == patches * passes
    assert {n for _, n in calls} == {total}
    done = [k for k, _ in calls]
    assert all(a < b for a, b in zip(done, done[1:])) and done[-1] == total
    assert len(calls) == math.ceil(patches / batch_size) * passes  # one call per predict_fn call
    if batch_size == 1:
        assert done == list(range(1, total + 1))


@pytest.mark.parametrize("mirror_axes", [(0,), (1, 2), (0, 1, 2)])
def test_mirroring_a_voxelwise_fn_changes_nothing(mirror_axes):
    volume = random_volume((10, 9, 7), seed=3)
    kwargs = {"patch_size": (4, 5, 3), "overlap": 0.5}
    plain = sliding_window_inference(volume, voxelwise_softmax, **kwargs)
    mirrored = sliding_window_inference(
        volume, voxelwise_softmax, mirror_axes=mirror_axes, **kwargs
    )
    np.testing.assert_allclose(mirrored, plain, atol=1e-6)


@pytest.mark.parametrize(
    "shape, patch, overlap, mirror_axes, batch_size",
    [
        ((12, 10, 8), (4, 4, 4), 0.5, (), 2),
        ((11, 9, 7), (5, 4, 3), 0.25, (0,), 3),
        ((10, 10, 10), (6, 6, 6), 0.5, (0, 1, 2), 5),
    ],
)
def test_position_dependent_fn_matches_brute_force_blend(
    shape, patch, overlap, mirror_axes, batch_size
):
    volume = random_volume(shape, seed=7)
    result = sliding_window_inference(
        volume, position_in_patch, patch_size=patch, overlap=overlap,
        mirror_axes=mirror_axes, batch_size=batch_size,
    )
    expected = reference_blend(volume, position_in_patch, patch, overlap, mirror_axes)
    np.testing.assert_allclose(result, expected, atol=1e-5)


def test_mirroring_is_applied_to_a_position_dependent_fn():
    volume = random_volume((8, 8, 8), seed=5)
    kwargs = {"patch_size": (4, 4, 4), "overlap": 0.5}
    plain = sliding_window_inference(volume, position_in_patch, **kwargs)
    mirrored = sliding_window_inference(volume, position_in_patch, mirror_axes=(0,), **kwargs)
    assert not np.allclose(plain, mirrored, atol=1e-3)


def test_gaussian_blending_smooths_seams_that_naive_tiling_leaves():
    volume = np.zeros((24, 1, 1, 1), np.float32)  # the ramp inside each patch is all there is
    patch, overlap = (8, 1, 1), 0.5
    blended = sliding_window_inference(volume, position_in_patch, patch_size=patch, overlap=overlap)
    naive = np.zeros((24, 1, 1, 2), np.float32)
    for x in patch_starts(24, patch[0], overlap):  # each patch overwrites its predecessor
        naive[x : x + patch[0]] = position_in_patch(volume[None, x : x + patch[0]])[0]
    assert not np.allclose(blended, naive, atol=1e-3)
    # A seam shows as a drop from the end of one patch's ramp to the start of the next one's.
    blended_drop = -np.diff(blended[:, 0, 0, 0]).min()
    naive_drop = -np.diff(naive[:, 0, 0, 0]).min()
    assert blended_drop < 0.8 * naive_drop


def test_batch_size_not_dividing_the_patch_count_gives_the_same_result():
    volume = random_volume((12, 10, 8), seed=11)
    kwargs = {"patch_size": (4, 4, 4), "overlap": 0.5}
    assert count_patches((12, 10, 8), (4, 4, 4), 0.5) % 7 != 0
    results = [
        sliding_window_inference(volume, position_in_patch, batch_size=b, **kwargs)
        for b in (1, 7, 1000)
    ]
    for result in results[1:]:
        np.testing.assert_allclose(result, results[0], atol=1e-6)


def test_predict_segmentation_is_the_argmax_as_uint8():
    volume = random_volume((9, 8, 7), seed=2)
    kwargs = {"patch_size": (4, 4, 4), "overlap": 0.5}
    labels = predict_segmentation(volume, voxelwise_softmax, **kwargs)
    assert labels.dtype == np.uint8 and labels.shape == (9, 8, 7)
    np.testing.assert_array_equal(labels, np.argmax(voxelwise_softmax(volume[None])[0], axis=-1))


def test_importing_the_package_does_not_import_tensorflow():
    code = "import sys, brainscan.inference; assert 'tensorflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


@pytest.fixture(scope="module")
def tiny_conv_model():
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape=(None, None, None, 2))
    hidden = keras.layers.Conv3D(6, 3, padding="same", activation="relu")(inputs)
    outputs = keras.layers.Conv3D(NUM_CLASSES, 3, padding="same", activation="softmax")(hidden)
    return keras.Model(inputs, outputs, name="tiny_seg")


def test_keras_single_patch_equals_one_model_call(tiny_conv_model, monkeypatch):
    def no_predict(*args, **kwargs):
        raise AssertionError("keras_predict_fn must not use model.predict")

    monkeypatch.setattr(tiny_conv_model, "predict", no_predict)
    volume = random_volume((12, 10, 8), channels=2, seed=4)
    expected = np.asarray(tiny_conv_model(volume[None], training=False))[0]
    result = sliding_window_inference(
        volume, keras_predict_fn(tiny_conv_model, batch_size=2),
        patch_size=(12, 10, 8), num_classes=NUM_CLASSES,
    )
    np.testing.assert_allclose(result, expected, atol=1e-5)


def test_keras_predict_fn_splits_batches_larger_than_batch_size(tiny_conv_model):
    batch = random_volume((5, 6, 6, 6), channels=2, seed=6)
    predict = keras_predict_fn(tiny_conv_model, batch_size=2)
    out = predict(batch)
    assert out.dtype == np.float32 and out.shape == (5, 6, 6, 6, NUM_CLASSES)
    np.testing.assert_allclose(out, np.asarray(tiny_conv_model(batch, training=False)), atol=1e-5)


@pytest.mark.parametrize("batch_size", [0, -1, 1.5])
def test_keras_predict_fn_rejects_bad_batch_size(batch_size):
    message = f"batch_size must be a positive integer, got {batch_size}"
    with pytest.raises(ValueError, match=message):
        keras_predict_fn(object(), batch_size=batch_size)
