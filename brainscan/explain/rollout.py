"""Attention rollout (Abnar & Zuidema 2020) for the hybrid ViT-CNN classifier.

Each encoder block mixes tokens by its attention matrix; the residual connection keeps half of
every token. Rollout models both: per block, the heads are fused (averaged), the identity is
added and the rows renormalised, ``A_l = norm(mean_h(att_l) + I)``; the blocks are chained by
matrix product, ``J = A_L ... A_2 A_1``. Row 0 of ``J`` (the class token, which feeds the head)
over the patch tokens says how much each patch flows into the decision; reshaped to the token
grid it is the heatmap.

Rollout is class-agnostic: it shows where the model looks, not what argues for one class.

TensorFlow is imported inside the functions, so importing this module stays cheap.

Example:
    >>> rollout = AttentionRollout(bundle.model)
    >>> heat = rollout(images)                      # (B, S, S) float32 in [0, 1]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from brainscan.explain.gradcam import _as_batch, normalise_maps

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


def class_token_map(joint: np.ndarray) -> np.ndarray:
    """The class token's row of the joint attention over the patch tokens, as a token grid.

    Args:
        joint: ``(batch, 1 + grid*grid, 1 + grid*grid)`` from :func:`attention_rollout`, token 0
            being the class token.

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
