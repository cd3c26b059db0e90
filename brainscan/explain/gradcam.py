"""Grad-CAM (Selvaraju et al. 2017) for the convolutional classifiers.

Grad-CAM weights each channel ``k`` of a convolutional feature map ``A`` by the spatial mean of the
gradient of the class score with respect to it, ``alpha_k = mean_ij d y_c / d A_k(i, j)``, and
keeps the positive part of the weighted sum, ``relu(sum_k alpha_k A_k)``: the regions whose features
push the score of class ``c`` up. The map has the feature map's resolution (``S/32`` for ResNet50)
and is upsampled to the input size.

The class score is taken *before* the softmax (the layer named ``logits`` when the network has
one): a confident softmax saturates and its gradients vanish, which would blank the map.

TensorFlow is imported inside the functions, so importing this module stays cheap.

Example:
    >>> cam = GradCam(bundle.model)                 # compiles once; reuse it per request
    >>> heat = cam(images, class_index=[2])         # (1, S, S) float32 in [0, 1]
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

#: the pre-softmax layer whose output is the class score, when the network has one
SCORE_LAYER = "logits"


def _as_batch(images: np.ndarray) -> tuple[np.ndarray, bool]:
    """``(S, S, C)`` or ``(B, S, S, C)`` -> float32 ``(B, S, S, C)`` and whether it was one image."""
    images = np.asarray(images, dtype=np.float32)
    if images.ndim == 3:
        return images[None], True
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be (S, S, C) or (B, S, S, C) with B >= 1, got shape {images.shape}")
    return images, False


def _class_indices(class_index: int | Sequence[int] | None, batch: int, num_classes: int) -> np.ndarray:
    """Per-image class indices as int32 ``(B,)``; ``-1`` means "the predicted class"."""
    if class_index is None:
        return np.full(batch, -1, dtype=np.int32)
    indices = np.atleast_1d(np.asarray(class_index))
    if indices.dtype.kind not in "iu" or indices.ndim != 1:
        raise ValueError(f"class_index must be an int or a sequence of ints, got {class_index!r}")
    if indices.size == 1:
        indices = np.repeat(indices, batch)
    if indices.size != batch:
        raise ValueError(f"class_index has {indices.size} entries for a batch of {batch} images")
    if (indices < 0).any() or (indices >= num_classes).any():
        raise ValueError(f"class_index must be in [0, {num_classes}), got {indices.tolist()}")
    return indices.astype(np.int32)


def normalise_maps(maps: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """Resize each ``(h, w)`` map to ``size`` (``(height, width)``) and scale it to [0, 1].

    Negative values are clipped to 0; an all-zero map stays all zero (nothing to show).

    Args:
        maps: ``(B, h, w)`` non-negative importance maps.
        size: output ``(height, width)``; ``None`` keeps ``(h, w)``.

    Returns:
        float32 ``(B, height, width)`` in [0, 1].
    """
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 3:
        raise ValueError(f"maps must be (B, h, w), got shape {maps.shape}")
    out = []
    for heat in maps:
        if size is not None and heat.shape != tuple(size):
            heat = cv2.resize(heat, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
        heat = np.maximum(heat, 0.0)
        peak = float(heat.max())
        out.append(heat / peak if peak > 0 and np.isfinite(peak) else np.zeros_like(heat))
    return np.stack(out).astype(np.float32)


class GradCam:
    """Grad-CAM of one model, compiled once and reusable from several threads.

    Args:
        model: a ``keras.Model`` whose layer ``layer_name`` outputs ``(B, h, w, K)`` feature maps.
        layer_name: the target layer; default ``GRADCAM_LAYER`` of :mod:`brainscan.models.resnet`
            (``"gradcam_target"``, the name the ResNet50 and ViT-CNN builders give their last
            convolutional feature map).

    Raises:
        ValueError: the model has no such layer, or its output is not a 4D feature map.
    """

    method = "grad-cam"

    def __init__(self, model: Any, *, layer_name: str | None = None) -> None:
        import keras
        import tensorflow as tf

        from brainscan.models.resnet import GRADCAM_LAYER

        layer_name = GRADCAM_LAYER if layer_name is None else layer_name
        names = [layer.name for layer in model.layers]
        if layer_name not in names:
            raise ValueError(f"model {model.name!r} has no layer {layer_name!r} for Grad-CAM")
        target = model.get_layer(layer_name).output
        if len(target.shape) != 4:
            raise ValueError(f"Grad-CAM needs a (B, h, w, K) feature map; layer {layer_name!r} gives {target.shape}")
        score = model.get_layer(SCORE_LAYER).output if SCORE_LAYER in names else model.outputs[0]
        self.layer_name = layer_name
        self.num_classes = int(score.shape[-1])
        grad_model = keras.Model(model.inputs, [target, score], name=f"{model.name}_gradcam")

        # reduce_retracing: one generic trace serves every batch size; never jit_compile (XLA is
        # much slower for convolutions on this CPU, see MACHINE-NOTES).
        @tf.function(reduce_retracing=True)
        def features_and_gradients(images: Any, class_index: Any) -> tuple[Any, Any]:
            with tf.GradientTape() as tape:
                features, scores = grad_model(images, training=False)
                predicted = tf.argmax(scores, axis=-1, output_type=tf.int32)
                chosen = tf.where(class_index < 0, predicted, class_index)
                selected = tf.gather(scores, chosen, axis=1, batch_dims=1)
            return features, tape.gradient(selected, features), chosen

        self._run = features_and_gradients
        self._trace_lock = threading.Lock()
        self._traced = False

    def __call__(
        self, images: np.ndarray, class_index: int | Sequence[int] | None = None, *, upsample: bool = True
    ) -> np.ndarray:
        """Grad-CAM heatmaps.

        Args:
            images: preprocessed ``(S, S, C)`` or ``(B, S, S, C)``.
            class_index: the class to explain, one per image or one for all; ``None``: the
                predicted class of each image.
            upsample: resize to the input size ``(S, S)``; otherwise keep ``(h, w)``.

        Returns:
            float32 ``(B, S, S)`` (or ``(S, S)`` for one image) in [0, 1]; all zero when no
            feature supports the class.
        """
        batch, single = _as_batch(images)
        indices = _class_indices(class_index, len(batch), self.num_classes)
        if self._traced:
            features, gradients, _ = self._run(batch, indices)
        else:
            with self._trace_lock:  # the first call traces; concurrent first calls wait for it
                features, gradients, _ = self._run(batch, indices)
                self._traced = True
        features, gradients = np.asarray(features, np.float32), np.asarray(gradients, np.float32)
        weights = gradients.mean(axis=(1, 2))  # (B, K): alpha_k
        cams = np.maximum(np.einsum("bhwk,bk->bhw", features, weights), 0.0)
        maps = normalise_maps(cams, batch.shape[1:3] if upsample else None)
        return maps[0] if single else maps


def grad_cam(
    model: Any, images: np.ndarray, class_index: int | Sequence[int] | None = None, *, layer_name: str | None = None
) -> np.ndarray:
    """One-off Grad-CAM; build a :class:`GradCam` instead when explaining many images.

    Returns:
        see :meth:`GradCam.__call__` (upsampled to the input size).
    """
    return GradCam(model, layer_name=layer_name)(images, class_index)
