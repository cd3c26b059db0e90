"""Segmentation losses and a training metric: soft Dice + cross-entropy, and foreground Dice.

All computations run in float32 whatever the model's compute dtype: under mixed precision the
network's softmax already returns float32, and sums over 2 x 128^3 voxels would overflow float16.
Tensors are ``(batch, X, Y, Z, K)``: ``y_true`` one-hot over the K = 4 classes (background, NCR,
ED, ET in :data:`brainscan.labels.BRATS_LABELS` order), ``y_pred`` softmax probabilities.

Batch Dice (nnU-Net's default for BraTS) pools the voxels of the whole batch before the ratio, so
a patch without enhancing tumour does not score ET Dice 0 or 1 on its own: the ratio is taken
over the batch, which gives smoother gradients for small structures.

Example:
    >>> model.compile(optimizer, loss=DiceCELoss(), metrics=[ForegroundDice()])
"""

from __future__ import annotations

import keras
from keras import ops

from brainscan.labels import BRATS_LABELS

NUM_CLASSES = len(BRATS_LABELS)


def soft_dice_loss(y_true, y_pred, *, include_background: bool = False, batch_dice: bool = True,
                   smooth: float = 1e-5):
    """``1 - mean_k (2 sum(p t) + s) / (sum p + sum t + s)`` over the classes.

    Args:
        y_true: one-hot ``(B, X, Y, Z, K)``.
        y_pred: probabilities ``(B, X, Y, Z, K)``.
        include_background: also average class 0 (by default only the 3 tumour classes).
        batch_dice: pool the batch before the ratio (else mean of per-patch Dice).
        smooth: added to numerator and denominator; a class absent from truth and prediction
            then scores Dice 1, not 0/0.

    Returns:
        float32 scalar in [0, 1]: 0 for a perfect prediction, about 1 for a disjoint one.
    """
    y_true = ops.cast(y_true, "float32")
    y_pred = ops.cast(y_pred, "float32")
    axes = (0, 1, 2, 3) if batch_dice else (1, 2, 3)
    intersection = ops.sum(y_true * y_pred, axis=axes)
    denominator = ops.sum(y_true, axis=axes) + ops.sum(y_pred, axis=axes)
    dice = (2.0 * intersection + smooth) / (denominator + smooth)
    if not include_background:
        dice = dice[..., 1:]
    return 1.0 - ops.mean(dice)


@keras.saving.register_keras_serializable(package="brainscan")
class DiceCELoss(keras.losses.Loss):
    """``dice_weight * soft Dice + ce_weight * categorical cross-entropy`` (nnU-Net's loss).

    Args:
        dice_weight, ce_weight: non-negative weights, not both 0.
        include_background, batch_dice, smooth: as :func:`soft_dice_loss`.
        name: Keras name.

    Raises:
        ValueError: negative weights, both weights 0, or ``smooth <= 0``.
    """

    def __init__(self, dice_weight: float = 1.0, ce_weight: float = 1.0, *, include_background: bool = False,
                 batch_dice: bool = True, smooth: float = 1e-5, name: str = "dice_ce", **kwargs) -> None:
        kwargs.pop("dtype", None)
        super().__init__(name=name, dtype="float32", **kwargs)
        if dice_weight < 0 or ce_weight < 0 or dice_weight + ce_weight == 0:
            raise ValueError(f"dice_weight and ce_weight must be >= 0 and not both 0, got {dice_weight}, {ce_weight}")
        if not smooth > 0:
            raise ValueError(f"smooth must be > 0, got {smooth}")
        self.dice_weight, self.ce_weight = float(dice_weight), float(ce_weight)
        self.include_background, self.batch_dice = bool(include_background), bool(batch_dice)
        self.smooth = float(smooth)

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, "float32")
        y_pred = ops.cast(y_pred, "float32")
        dice = soft_dice_loss(y_true, y_pred, include_background=self.include_background,
                              batch_dice=self.batch_dice, smooth=self.smooth)
        ce = ops.mean(keras.losses.categorical_crossentropy(y_true, y_pred))
        # Shape (1,), not a scalar: Keras divides non-scalar losses by the replica count under
        # tf.distribute, and a batch Dice has no per-sample values to return instead.
        return ops.reshape(self.dice_weight * dice + self.ce_weight * ce, (1,))

    def get_config(self) -> dict:
        return {**super().get_config(), "dice_weight": self.dice_weight, "ce_weight": self.ce_weight,
                "include_background": self.include_background, "batch_dice": self.batch_dice, "smooth": self.smooth}


@keras.saving.register_keras_serializable(package="brainscan")
class ForegroundDice(keras.metrics.Metric):
    """Hard Dice of the argmax prediction, per tumour class, pooled over an epoch, then averaged.

    A class absent from both truth and prediction in everything seen scores 1 (the convention of
    :func:`brainscan.metrics.segmentation.dice`). Reported as ``foreground_dice``.
    """

    def __init__(self, num_classes: int = NUM_CLASSES, name: str = "foreground_dice", **kwargs) -> None:
        kwargs.pop("dtype", None)
        super().__init__(name=name, dtype="float32", **kwargs)
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.num_classes = int(num_classes)
        shape = (self.num_classes - 1,)
        self.intersection = self.add_variable(shape=shape, initializer="zeros", name="intersection")
        self.total = self.add_variable(shape=shape, initializer="zeros", name="total")

    def update_state(self, y_true, y_pred, sample_weight=None) -> None:
        true = ops.one_hot(ops.argmax(y_true, axis=-1), self.num_classes, dtype="float32")[..., 1:]
        pred = ops.one_hot(ops.argmax(y_pred, axis=-1), self.num_classes, dtype="float32")[..., 1:]
        axes = tuple(range(len(true.shape) - 1))
        self.intersection.assign_add(ops.sum(true * pred, axis=axes))
        self.total.assign_add(ops.sum(true, axis=axes) + ops.sum(pred, axis=axes))

    def result(self):
        dice = ops.where(self.total > 0, 2.0 * self.intersection / ops.maximum(self.total, 1.0), 1.0)
        return ops.mean(dice)

    def reset_state(self) -> None:
        self.intersection.assign(ops.zeros(self.intersection.shape, dtype=self.intersection.dtype))
        self.total.assign(ops.zeros(self.total.shape, dtype=self.total.dtype))

    def get_config(self) -> dict:
        return {**super().get_config(), "num_classes": self.num_classes}


@keras.saving.register_keras_serializable(package="brainscan")
class RegionDiceBCELoss(keras.losses.Loss):
    """Soft batch Dice + binary cross-entropy over independent region channels (nnU-Net's BraTS loss).

    ``y_true`` holds the nested region masks ``(B, X, Y, Z, 3)`` (WT, TC, ET: 0/1) and ``y_pred``
    their sigmoid probabilities. Every channel counts in the Dice (there is no background channel).

    Args:
        dice_weight, bce_weight: non-negative weights, not both 0.
        smooth: added to the Dice numerator and denominator (> 0).
    """

    def __init__(self, dice_weight: float = 1.0, bce_weight: float = 1.0, *, smooth: float = 1e-5,
                 name: str = "region_dice_bce", **kwargs) -> None:
        kwargs.pop("dtype", None)
        super().__init__(name=name, dtype="float32", **kwargs)
        if dice_weight < 0 or bce_weight < 0 or dice_weight + bce_weight == 0:
            raise ValueError(f"dice_weight and bce_weight must be >= 0 and not both 0, got {dice_weight}, {bce_weight}")
        if not smooth > 0:
            raise ValueError(f"smooth must be > 0, got {smooth}")
        self.dice_weight, self.bce_weight, self.smooth = float(dice_weight), float(bce_weight), float(smooth)

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, "float32")
        y_pred = ops.cast(y_pred, "float32")
        dice = soft_dice_loss(y_true, y_pred, include_background=True, batch_dice=True, smooth=self.smooth)
        bce = ops.mean(keras.losses.binary_crossentropy(y_true, y_pred))
        return ops.reshape(self.dice_weight * dice + self.bce_weight * bce, (1,))

    def get_config(self) -> dict:
        return {**super().get_config(), "dice_weight": self.dice_weight, "bce_weight": self.bce_weight,
                "smooth": self.smooth}


@keras.saving.register_keras_serializable(package="brainscan")
class RegionDice(ForegroundDice):
    """Hard Dice (threshold 0.5) per region channel (WT, TC, ET), pooled over an epoch, then averaged.

    Reported as ``foreground_dice`` like :class:`ForegroundDice`, so logs read the same.
    """

    def __init__(self, num_regions: int = 3, name: str = "foreground_dice", **kwargs) -> None:
        kwargs.pop("num_classes", None)
        # ForegroundDice keeps one counter per class after the background: num_regions of them here.
        super().__init__(num_classes=int(num_regions) + 1, name=name, **kwargs)
        self.num_regions = int(num_regions)

    def update_state(self, y_true, y_pred, sample_weight=None) -> None:
        true = ops.cast(ops.cast(y_true, "float32") > 0.5, "float32")
        pred = ops.cast(ops.cast(y_pred, "float32") > 0.5, "float32")
        axes = tuple(range(len(true.shape) - 1))
        self.intersection.assign_add(ops.sum(true * pred, axis=axes))
        self.total.assign_add(ops.sum(true, axis=axes) + ops.sum(pred, axis=axes))

    def get_config(self) -> dict:
        config = super().get_config()
        config.pop("num_classes", None)
        return {**config, "num_regions": self.num_regions}


@keras.saving.register_keras_serializable(package="brainscan")
class DownsampledLoss(keras.losses.Loss):
    """``loss`` against the targets average-pooled by ``factor`` on each spatial axis: the loss of a deep-supervision
    head that predicts at 1/``factor`` of the patch's resolution (:mod:`training.deep_supervision`). Pooled one-hot
    or region masks become each coarse voxel's fraction of each class or region, as ``--soft-targets`` trains.

    Args:
        loss: the full-resolution loss (:class:`RegionDiceBCELoss` or :class:`DiceCELoss`), or its config.
        factor: the pooling factor, a power of 2 (1 = the targets as they are).
    """

    def __init__(self, loss: keras.losses.Loss | dict, factor: int, *, name: str | None = None, **kwargs) -> None:
        kwargs.pop("dtype", None)
        super().__init__(name=name or f"downsampled_{factor}", dtype="float32", **kwargs)
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1 or factor & (factor - 1):
            raise ValueError(f"factor must be a power of 2, got {factor!r}")
        self.loss = keras.saving.deserialize_keras_object(loss) if isinstance(loss, dict) else loss
        self.factor = factor

    def call(self, y_true, y_pred):
        y_true = ops.cast(y_true, "float32")
        if self.factor > 1:
            y_true = ops.average_pool(y_true, pool_size=self.factor, strides=self.factor, padding="valid")
        return self.loss.call(y_true, y_pred)

    def get_config(self) -> dict:
        return {**super().get_config(), "loss": keras.saving.serialize_keras_object(self.loss), "factor": self.factor}


__all__ = ["DiceCELoss", "DownsampledLoss", "ForegroundDice", "RegionDice", "RegionDiceBCELoss", "soft_dice_loss"]
