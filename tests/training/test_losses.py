"""Tests for training.losses: soft Dice + cross-entropy, and the foreground Dice metric."""

from __future__ import annotations

import numpy as np
import pytest

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")

from training.losses import DiceCELoss, ForegroundDice, soft_dice_loss  # noqa: E402

SHAPE = (2, 8, 8, 8)


def one_hot(labels: np.ndarray, k: int = 4) -> np.ndarray:
    return np.eye(k, dtype=np.float32)[labels]


def random_labels(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4, size=SHAPE)


def disjoint(labels: np.ndarray) -> np.ndarray:
    """Every voxel moved to another class: no class overlaps itself anywhere."""
    return (labels + 1) % 4


@pytest.mark.parametrize("include_background", [False, True])
@pytest.mark.parametrize("batch_dice", [False, True])
def test_dice_loss_zero_for_perfect_prediction(include_background, batch_dice):
    y = one_hot(random_labels())
    loss = soft_dice_loss(y, y, include_background=include_background, batch_dice=batch_dice)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("include_background", [False, True])
@pytest.mark.parametrize("batch_dice", [False, True])
def test_dice_loss_about_one_for_disjoint_prediction(include_background, batch_dice):
    labels = random_labels()
    loss = soft_dice_loss(one_hot(labels), one_hot(disjoint(labels)), include_background=include_background,
                          batch_dice=batch_dice)
    assert float(loss) == pytest.approx(1.0, abs=1e-4)


def test_dice_loss_ignores_background_by_default():
    """All-background truth predicted as all background: nothing to find, nothing found -> 0."""
    y = one_hot(np.zeros(SHAPE, dtype=np.int64))
    assert float(soft_dice_loss(y, y)) == pytest.approx(0.0, abs=1e-6)
    empty_prediction = one_hot(np.zeros(SHAPE, dtype=np.int64))
    tumour = one_hot(np.full(SHAPE, 2))
    assert float(soft_dice_loss(tumour, empty_prediction)) > 0.3


def test_dice_loss_orders_better_predictions_lower():
    labels = random_labels()
    noisy = labels.copy()
    noisy[:, :4] = disjoint(labels[:, :4])  # half the voxels wrong
    y = one_hot(labels)
    assert 0.0 < float(soft_dice_loss(y, one_hot(noisy))) < float(soft_dice_loss(y, one_hot(disjoint(labels))))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_combined_loss_gradients_finite_and_float32(dtype):
    """Softmax logits -> Dice+CE: finite gradients even for classes absent from the batch."""
    labels = np.zeros(SHAPE, dtype=np.int64)
    labels[:, 2:4, 2:4, 2:4] = 2  # one small tumour class; classes 1 and 3 absent
    y = tf.constant(one_hot(labels))
    logits = tf.Variable(np.random.default_rng(0).normal(size=(*SHAPE, 4)).astype(dtype))
    loss_fn = DiceCELoss()
    with tf.GradientTape() as tape:
        loss = loss_fn(y, tf.nn.softmax(logits))
    gradient = tape.gradient(loss, logits)
    assert loss.dtype == tf.float32
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert np.all(np.isfinite(np.asarray(gradient, dtype=np.float32)))
    assert float(tf.reduce_max(tf.abs(tf.cast(gradient, tf.float32)))) > 0


def test_combined_loss_is_weighted_sum():
    labels = random_labels(1)
    y, p = one_hot(labels), np.full((*SHAPE, 4), 0.25, dtype=np.float32)
    dice = float(soft_dice_loss(y, p))
    ce = float(np.mean(-np.log(0.25)))
    assert float(DiceCELoss(2.0, 0.5)(y, p)) == pytest.approx(2.0 * dice + 0.5 * ce, rel=1e-4)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"dice_weight": -1.0}, "dice_weight"), ({"dice_weight": 0.0, "ce_weight": 0.0}, "not both 0"),
     ({"smooth": 0.0}, "smooth")],
)
def test_combined_loss_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DiceCELoss(**kwargs)


def test_combined_loss_round_trips_through_keras_serialization():
    loss = DiceCELoss(0.7, 0.3, batch_dice=False)
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(restored, DiceCELoss)
    assert (restored.dice_weight, restored.ce_weight, restored.batch_dice) == (0.7, 0.3, False)


@pytest.mark.parametrize(
    "prediction, expected",
    [("same", 1.0), ("disjoint", 0.0)],
)
def test_foreground_dice_metric(prediction, expected):
    labels = random_labels(2)
    predicted = labels if prediction == "same" else disjoint(labels)
    metric = ForegroundDice()
    metric.update_state(one_hot(labels), one_hot(predicted) * 0.7 + 0.075)  # soft, same argmax
    assert float(metric.result()) == pytest.approx(expected, abs=1e-6)
    metric.reset_state()
    assert float(metric.result()) == pytest.approx(1.0)  # nothing seen: nothing missed


def test_foreground_dice_matches_numpy_on_partial_overlap():
    rng = np.random.default_rng(3)
    truth, pred = rng.integers(0, 4, size=SHAPE), rng.integers(0, 4, size=SHAPE)
    metric = ForegroundDice()
    metric.update_state(one_hot(truth[:1]), one_hot(pred[:1]))
    metric.update_state(one_hot(truth[1:]), one_hot(pred[1:]))  # pooled over batches
    expected = np.mean([2 * np.sum((truth == k) & (pred == k)) / (np.sum(truth == k) + np.sum(pred == k))
                        for k in (1, 2, 3)])
    assert float(metric.result()) == pytest.approx(expected, rel=1e-5)
