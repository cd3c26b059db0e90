"""Attention rollout (Abnar & Zuidema 2020) for the hybrid ViT-CNN classifier.

Each encoder block mixes tokens by its attention matrix; the residual connection keeps half of
every token. Rollout models both: per block, the heads are fused (averaged), the identity is
added and the rows renormalised, ``A_l = norm(mean_h(att_l) + I)``; the blocks are chained by
matrix product, ``J = A_L ... A_2 A_1``. Row 0 of ``J`` (the class token, which feeds the head)
over the patch tokens says how much each patch flows into the decision; reshaped to the token
grid it is the heatmap.

Rollout is class-agnostic: it shows where the model looks, not what argues for one class. The
class-specific variant, :class:`GradientAttentionRollout` (Chefer, Gur & Wolf 2021, "Generic
attention-model explainability"), weights each block's attention by the gradient of the explained
class's logit, keeps the positive part, ``Abar_l = mean_h((dy_c/dA_l * A_l)^+)``, and accumulates
``R <- R + Abar_l R`` from ``R = I``; the class token's row of ``R`` over the patches is the map.
The classifier service uses it for the ViT-CNN, so the heatmap answers "what argues for this
class", as Grad-CAM does for ResNet50.

TensorFlow is imported inside the functions, so importing this module stays cheap.

Example:
    >>> rollout = AttentionRollout(bundle.model)
    >>> heat = rollout(images)                      # (B, S, S) float32 in [0, 1]
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from brainscan.explain.gradcam import _as_batch, _class_indices, normalise_maps

HEAD_FUSIONS = ("mean", "max", "min")


def attention_rollout(attentions: Sequence[np.ndarray], *, head_fusion: str = "mean") -> np.ndarray:
    """Chain per-block attention into the joint attention of the output tokens to the input tokens.

    Args:
        attentions: one array per encoder block, first block first, each
            ``(batch, heads, tokens, tokens)`` with rows summing to 1.
        head_fusion: how heads are combined: ``"mean"`` (the paper), ``"max"`` or ``"min"``.

    Returns:
        float32 ``(batch, tokens, tokens)``; row ``i`` is how much each input token flows into
        output token ``i``; every row sums to 1.

    Raises:
        ValueError: no blocks, shapes that are not ``(B, H, T, T)`` or disagree, an unknown fusion.
    """
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
    if len(attentions) == 0:
        raise ValueError("attention_rollout needs the attention of at least one block, got none")
    joint: np.ndarray | None = None
    for index, attention in enumerate(attentions):
        attention = np.asarray(attention, dtype=np.float64)
        if attention.ndim != 4 or attention.shape[-1] != attention.shape[-2]:
            raise ValueError(f"block {index}: attention must be (batch, heads, tokens, tokens), got {attention.shape}")
        if joint is not None and attention.shape[::3] != (joint.shape[0], joint.shape[-1]):
            raise ValueError(f"block {index}: attention {attention.shape} disagrees with the earlier blocks")
        fused = getattr(attention, head_fusion)(axis=1)
        # the residual connection passes every token on unchanged: add it as identity attention
        fused = fused + np.eye(fused.shape[-1])
        fused /= fused.sum(axis=-1, keepdims=True)
        joint = fused if joint is None else fused @ joint
    return joint.astype(np.float32)


def gradient_rollout(attentions: Sequence[np.ndarray], gradients: Sequence[np.ndarray]) -> np.ndarray:
    """Gradient-weighted relevance of the output tokens to the input tokens (Chefer et al. 2021).

    Args:
        attentions: one array per encoder block, first block first, each ``(batch, heads, T, T)``.
        gradients: the gradient of the explained class's score with respect to each of them.

    Returns:
        float64 ``(batch, T, T)``: ``R = prod_l (I + Abar_l)`` applied first block first, with
        ``Abar_l = mean_h(max(grad_l * att_l, 0))``; the identity when no attention argues for the
        class.

    Raises:
        ValueError: no blocks, a different number of gradients, or shapes that disagree.
    """
    if len(attentions) == 0:
        raise ValueError("gradient_rollout needs the attention of at least one block, got none")
    if len(gradients) != len(attentions):
        raise ValueError(f"{len(attentions)} attention blocks but {len(gradients)} gradients")
    relevance: np.ndarray | None = None
    for index, (attention, gradient) in enumerate(zip(attentions, gradients)):
        attention, gradient = np.asarray(attention, np.float64), np.asarray(gradient, np.float64)
        if attention.ndim != 4 or attention.shape[-1] != attention.shape[-2] or gradient.shape != attention.shape:
            raise ValueError(f"block {index}: attention {attention.shape} and gradient {gradient.shape} must be "
                             "the same (batch, heads, tokens, tokens)")
        if relevance is None:
            relevance = np.broadcast_to(np.eye(attention.shape[-1]), attention.shape[:1] + attention.shape[2:]).copy()
        elif relevance.shape != attention.shape[:1] + attention.shape[2:]:
            raise ValueError(f"block {index}: attention {attention.shape} disagrees with the earlier blocks")
        weighted = np.maximum(gradient * attention, 0.0).mean(axis=1)
        relevance = relevance + weighted @ relevance
    assert relevance is not None
    return relevance


def class_token_map(joint: np.ndarray) -> np.ndarray:
    """The class token's row of the joint attention over the patch tokens, as a token grid.

    Args:
        joint: ``(batch, 1 + grid*grid, 1 + grid*grid)`` from :func:`attention_rollout` or
            :func:`gradient_rollout`, token 0 being the class token.

    Returns:
        float32 ``(batch, grid, grid)``, scaled to [0, 1] per image (the minimum maps to 0).

    Raises:
        ValueError: the patch tokens do not form a square grid.
    """
    joint = np.asarray(joint, dtype=np.float32)
    if joint.ndim != 3 or joint.shape[1] != joint.shape[2]:
        raise ValueError(f"joint attention must be (batch, tokens, tokens), got {joint.shape}")
    patches = joint.shape[-1] - 1
    grid = math.isqrt(max(patches, 0))
    if patches < 1 or grid * grid != patches:
        raise ValueError(f"{patches} patch tokens (after the class token) do not form a square grid")
    row = joint[:, 0, 1:].reshape(-1, grid, grid)
    # every patch receives some attention through the identity, so the floor carries no meaning
    row = row - row.min(axis=(1, 2), keepdims=True)
    return normalise_maps(row)


class AttentionRollout:
    """Attention-rollout heatmaps of one ViT-CNN model (see :func:`brainscan.models.vit_cnn.attention_maps`).

    Args:
        model: a model built by :func:`brainscan.models.vit_cnn.vit_cnn`.
        head_fusion: see :func:`attention_rollout`.

    Raises:
        ValueError: the model has no ``encoder_{i}_mha`` layers.
    """

    method = "attention-rollout"

    def __init__(self, model: Any, *, head_fusion: str = "mean") -> None:
        from brainscan.models.vit_cnn import encoder_depth

        if head_fusion not in HEAD_FUSIONS:
            raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
        if encoder_depth(model) == 0:
            raise ValueError(f"model {model.name!r} has no encoder_{{i}}_mha layers; use Grad-CAM for it")
        from brainscan.models.vit_cnn import attention_function

        self.model = model
        self.head_fusion = head_fusion
        # Built once: building a functional model per request was the slow part of an explanation.
        self._attention = attention_function(model)

    def __call__(self, images: np.ndarray, class_index: int | Sequence[int] | None = None) -> np.ndarray:
        """Rollout heatmaps upsampled to the input size.

        Args:
            images: preprocessed ``(S, S, C)`` or ``(B, S, S, C)``.
            class_index: accepted for symmetry with :class:`~brainscan.explain.gradcam.GradCam`
                and ignored: rollout does not depend on the class.

        Returns:
            float32 ``(B, S, S)`` (or ``(S, S)`` for one image) in [0, 1].
        """
        batch, single = _as_batch(images)
        maps = self._attention(batch)
        grid_maps = class_token_map(attention_rollout(maps, head_fusion=self.head_fusion))
        heat = normalise_maps(grid_maps, batch.shape[1:3])
        return heat[0] if single else heat


class GradientAttentionRollout:
    """Class-specific heatmaps of one ViT-CNN model: gradient-weighted attention rollout.

    Built once per model (the replay of the encoder is traced on the first call) and safe to call
    from several threads.

    Args:
        model: a model built by :func:`brainscan.models.vit_cnn.vit_cnn`.

    Raises:
        ValueError: the model has no ``encoder_{i}_mha`` layers.
    """

    method = "gradient-attention-rollout"

    def __init__(self, model: Any) -> None:
        from brainscan.models.vit_cnn import attention_gradient_function, encoder_depth

        if encoder_depth(model) == 0:
            raise ValueError(f"model {model.name!r} has no encoder_{{i}}_mha layers; use Grad-CAM for it")
        self.model = model
        self.num_classes = int(model.outputs[0].shape[-1])
        self._run = attention_gradient_function(model)
        self._trace_lock = threading.Lock()
        self._traced = False

    def explain(self, images: np.ndarray, class_index: int | Sequence[int] | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Heatmaps plus the replayed logits and the explained class of each image.

        Returns:
            ``(heat (B, S, S) float32 in [0, 1], logits (B, classes), explained class (B,))``.
        """
        batch, _ = _as_batch(images)
        indices = _class_indices(class_index, len(batch), self.num_classes)
        if self._traced:
            attentions, gradients, logits, chosen = self._run(batch, indices)
        else:
            with self._trace_lock:  # the first call traces; concurrent first calls wait for it
                attentions, gradients, logits, chosen = self._run(batch, indices)
                self._traced = True
        grid_maps = class_token_map(gradient_rollout(attentions, gradients))
        return normalise_maps(grid_maps, batch.shape[1:3]), logits, chosen

    def __call__(self, images: np.ndarray, class_index: int | Sequence[int] | None = None) -> np.ndarray:
        """Heatmaps of ``class_index`` (one per image or one for all; ``None``: each image's
        predicted class), upsampled to the input size.

        Returns:
            float32 ``(B, S, S)`` (or ``(S, S)`` for one image) in [0, 1]; all zero when no
            attention argues for the class.
        """
        _, single = _as_batch(images)
        heat = self.explain(images, class_index)[0]
        return heat[0] if single else heat
