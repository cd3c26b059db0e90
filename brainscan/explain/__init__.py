"""Explanations of classifier decisions: Grad-CAM, attention rollout, and their PNG rendering.

:func:`explainer_for` picks the method a model supports: gradient-weighted attention rollout for
the ViT-CNN (it has ``encoder_{i}_mha`` layers), Grad-CAM on ``GRADCAM_LAYER`` otherwise (ResNet50).
Both explain one class (the predicted one by default). Both return
``(B, S, S)`` maps in [0, 1] at the input size; :mod:`brainscan.explain.overlay` renders them.
TensorFlow is imported only when an explainer is built.
"""

from __future__ import annotations

from typing import Any

from brainscan.explain.gradcam import GradCam, grad_cam, normalise_maps
from brainscan.explain.overlay import colorize, heatmap_pngs, model_view, png_data_url
from brainscan.explain.rollout import (
    AttentionRollout,
    GradientAttentionRollout,
    attention_rollout,
    class_token_map,
    gradient_rollout,
)

__all__ = [
    "AttentionRollout",
    "GradCam",
    "GradientAttentionRollout",
    "attention_rollout",
    "class_token_map",
    "colorize",
    "explainer_for",
    "grad_cam",
    "gradient_rollout",
    "heatmap_pngs",
    "model_view",
    "normalise_maps",
    "png_data_url",
]


def explainer_for(model: Any) -> GradCam | GradientAttentionRollout:
    """The explainer suited to ``model``: :class:`GradientAttentionRollout` for transformer
    encoders, else :class:`GradCam`. Its ``method`` attribute names it
    (``"gradient-attention-rollout"`` / ``"grad-cam"``), and calling it maps
    ``(images, class_index)`` to heatmaps of that class."""
    from brainscan.models.vit_cnn import encoder_depth

    return GradientAttentionRollout(model) if encoder_depth(model) > 0 else GradCam(model)
