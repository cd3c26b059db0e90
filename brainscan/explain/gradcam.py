"""Class activation maps for the convolutional classifiers: Grad-CAM and Layer-CAM.

Grad-CAM (Selvaraju et al. 2017) weights each channel ``k`` of a convolutional feature map ``A`` by
the spatial mean of the gradient of the class score with respect to it,
``alpha_k = mean_ij d y_c / d A_k(i, j)``, and keeps the positive part of the weighted sum,
``relu(sum_k alpha_k A_k)``: the regions whose features push the score of class ``c`` up. The map
has the feature map's resolution: ``S/32`` for ResNet50, a 4x4 blob at 128 px.

Layer-CAM (Jiang et al. 2021, "LayerCAM: exploring hierarchical class activation maps") weights
every position by its own positive gradient, ``relu(sum_k relu(d y_c / d A_k(i, j)) A_k(i, j))``,
so it stays faithful on earlier, finer layers where the gradient varies in space. :class:`LayerCam`
fuses the outputs of several ResNet50 stages, all from one backward pass.

:class:`StageTwoGradCam`, what the service uses for ResNet50, is Grad-CAM on the output of the second
stage (``S/8``: 16x16 at 128 px). On real BraTS T1ce slices its maximum falls inside the tumour
three times as often as Grad-CAM on the last stage, and it beat Layer-CAM on every layer set tried
(``bench/heatmap_localisation.py``); it costs one backward pass through the last two stages.

The class score is taken *before* the softmax (the layer named ``logits`` when the network has
one): a confident softmax saturates and its gradients vanish, which would blank the map.

TensorFlow is imported inside the functions, so importing this module stays cheap.

Example:
    >>> cam = StageTwoGradCam(bundle.model)         # compiles once; reuse it per request
    >>> heat = cam(images, class_index=[2])         # (1, S, S) float32 in [0, 1]
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

#: the pre-softmax layer whose output is the class score, when the network has one
SCORE_LAYER = "logits"
_STAGE_OUTPUT = re.compile(r"^stage(\d+)_block(\d+)_out$")


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


class _ClassActivationMap:
    """Features of some layers and the gradient of one class score with respect to them, from one
    forward and one backward pass compiled once; subclasses turn them into maps (:meth:`_maps`).
    Safe to call from several threads.

    Raises:
        ValueError: the model lacks a layer, or a layer's output is not a 4D feature map.
    """

    method = ""

    def __init__(self, model: Any, layer_names: Sequence[str]) -> None:
        import keras
        import tensorflow as tf

        names = [layer.name for layer in model.layers]
        targets = []
        for layer_name in layer_names:
            if layer_name not in names:
                raise ValueError(f"model {model.name!r} has no layer {layer_name!r} for {self.method}")
            target = model.get_layer(layer_name).output
            if len(target.shape) != 4:
                raise ValueError(
                    f"{self.method} needs a (B, h, w, K) feature map; layer {layer_name!r} gives {target.shape}")
            targets.append(target)
        score = model.get_layer(SCORE_LAYER).output if SCORE_LAYER in names else model.outputs[0]
        self.layer_names = tuple(layer_names)
        self.num_classes = int(score.shape[-1])
        grad_model = keras.Model(model.inputs, [targets, score], name=f"{model.name}_{self.method}")

        # reduce_retracing: one generic trace serves every batch size; never jit_compile (XLA is
        # much slower for convolutions on this CPU, see MACHINE-NOTES).
        @tf.function(reduce_retracing=True)
        def features_and_gradients(images: Any, class_index: Any) -> tuple[Any, Any]:
            with tf.GradientTape() as tape:
                features, scores = grad_model(images, training=False)
                predicted = tf.argmax(scores, axis=-1, output_type=tf.int32)
                chosen = tf.where(class_index < 0, predicted, class_index)
                selected = tf.gather(scores, chosen, axis=1, batch_dims=1)
            return features, tape.gradient(selected, features)

        self._run = features_and_gradients
        self._trace_lock = threading.Lock()
        self._traced = False

    def _maps(self, features: list[np.ndarray], gradients: list[np.ndarray], size: tuple[int, int] | None
              ) -> np.ndarray:
        """``(B, h, w, K)`` features and gradients per layer -> ``(B, height, width)`` in [0, 1]."""
        raise NotImplementedError

    def __call__(
        self, images: np.ndarray, class_index: int | Sequence[int] | None = None, *, upsample: bool = True
    ) -> np.ndarray:
        """Heatmaps of one class per image.

        Args:
            images: preprocessed ``(S, S, C)`` or ``(B, S, S, C)``.
            class_index: the class to explain, one per image or one for all; ``None``: the
                predicted class of each image.
            upsample: resize to the input size ``(S, S)``; otherwise keep the resolution of the
                finest target layer.

        Returns:
            float32 ``(B, S, S)`` (or ``(S, S)`` for one image) in [0, 1]; all zero when no
            feature supports the class.
        """
        batch, single = _as_batch(images)
        indices = _class_indices(class_index, len(batch), self.num_classes)
        if self._traced:
            features, gradients = self._run(batch, indices)
        else:
            with self._trace_lock:  # the first call traces; concurrent first calls wait for it
                features, gradients = self._run(batch, indices)
                self._traced = True
        features = [np.asarray(f, np.float32) for f in features]
        gradients = [np.asarray(g, np.float32) for g in gradients]
        size = batch.shape[1:3] if upsample else max((f.shape[1:3] for f in features), key=lambda s: s[0] * s[1])
        maps = self._maps(features, gradients, tuple(size))
        return maps[0] if single else maps


class GradCam(_ClassActivationMap):
    """Grad-CAM of one model on one layer.

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
        from brainscan.models.resnet import GRADCAM_LAYER

        super().__init__(model, [GRADCAM_LAYER if layer_name is None else layer_name])
        self.layer_name = self.layer_names[0]

    def _maps(self, features: list[np.ndarray], gradients: list[np.ndarray], size: tuple[int, int] | None
              ) -> np.ndarray:
        weights = gradients[0].mean(axis=(1, 2))  # (B, K): alpha_k
        return normalise_maps(np.einsum("bhwk,bk->bhw", features[0], weights), size)


def stage_outputs(model: Any) -> list[str]:
    """Names of the layers that end each ResNet stage, finest first: the last
    ``stage{n}_block{m}_out`` of every stage finer than the last feature map, then
    ``GRADCAM_LAYER`` (which ends the last stage). ``[GRADCAM_LAYER]`` alone for a network
    without such layers.
    """
    from brainscan.models.resnet import GRADCAM_LAYER

    last_grid = tuple(model.get_layer(GRADCAM_LAYER).output.shape[1:3])
    last_block: dict[int, tuple[int, str]] = {}
    for layer in model.layers:
        match = _STAGE_OUTPUT.match(layer.name)
        # the last stage's earlier blocks share its grid: they add no resolution
        if match and tuple(layer.output.shape[1:3]) != last_grid:
            stage, block = int(match[1]), int(match[2])
            last_block[stage] = max(last_block.get(stage, (0, "")), (block, layer.name))
    return [name for _, (_, name) in sorted(last_block.items())] + [GRADCAM_LAYER]


class LayerCam(_ClassActivationMap):
    """Layer-CAM of one model, fused over the outputs of its last ``stages`` stages.

    Each layer's map, ``relu(sum_k relu(dy_c/dA_k) * A_k)``, is normalised to [0, 1] and
    upsampled (bilinear) to the output size; the maps are averaged, so a region must argue for the
    class at the fine and at the coarse scale to be hot, and the fine layer draws its outline.

    Args:
        model: a ``keras.Model`` with a ``GRADCAM_LAYER`` (and, for ResNet50,
            ``stage{n}_block{m}_out`` layers).
        layer_names: the target layers; default: the last ``stages`` of :func:`stage_outputs`.
        stages: how many stage outputs to fuse when ``layer_names`` is not given, at least 1.

    Raises:
        ValueError: ``stages`` < 1, a missing layer, or an output that is not a 4D feature map.
    """

    method = "layer-cam"

    def __init__(self, model: Any, *, layer_names: Sequence[str] | None = None, stages: int = 2) -> None:
        if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
            raise ValueError(f"stages must be an integer >= 1, got {stages!r}")
        super().__init__(model, stage_outputs(model)[-stages:] if layer_names is None else layer_names)

    def _maps(self, features: list[np.ndarray], gradients: list[np.ndarray], size: tuple[int, int] | None
              ) -> np.ndarray:
        layer_maps = [
            normalise_maps((np.maximum(grads, 0.0) * feats).sum(axis=-1), size)
            for feats, grads in zip(features, gradients)
        ]
        return normalise_maps(np.mean(layer_maps, axis=0))


class StageTwoGradCam(GradCam):
    """Grad-CAM on the output of a ResNet's second stage: ``(B, S/8, S/8, 8*base)``, 16x16 at 128 px.

    Args:
        model: a ResNet built by :func:`brainscan.models.resnet.resnet50` (four stages).

    Raises:
        ValueError: the model has fewer than three ``stage{n}_block{m}_out`` stage outputs.
    """

    method = "grad-cam-stage2"

    def __init__(self, model: Any) -> None:
        stages = stage_outputs(model)
        if len(stages) < 4:
            raise ValueError(f"model {model.name!r} has no four ResNet stages (found {stages}); use GradCam")
        super().__init__(model, layer_name=stages[1])


def grad_cam(
    model: Any, images: np.ndarray, class_index: int | Sequence[int] | None = None, *, layer_name: str | None = None
) -> np.ndarray:
    """One-off Grad-CAM; build a :class:`GradCam` instead when explaining many images.

    Returns:
        see :meth:`GradCam.__call__` (upsampled to the input size).
    """
    return GradCam(model, layer_name=layer_name)(images, class_index)
