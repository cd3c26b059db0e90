"""Explanations of classifier decisions: Grad-CAM, Layer-CAM, attention rollout, and their PNG rendering.

:func:`explainer_for` picks the method a model supports: gradient-weighted attention rollout for
the ViT-CNN (it has ``encoder_{i}_mha`` layers; its token grid is S/8, 16x16 at 128 px), Grad-CAM
on the output of the second stage for ResNet50 (also S/8; Grad-CAM on the last stage is a 4x4 blob
at 128 px and points at the tumour a third as often, see ``bench/heatmap_localisation.py``), and
Grad-CAM on ``GRADCAM_LAYER`` for any other network.
Both explain one class (the predicted one by default). Both return
``(B, S, S)`` maps in [0, 1] at the input size; :mod:`brainscan.explain.overlay` renders them.
TensorFlow is imported only when an explainer is built.
"""

from __future__ import annotations

from typing import Any

from brainscan.explain.gradcam import (
    GradCam,
    LayerCam,
    StageTwoGradCam,
    grad_cam,
    normalise_maps,
    stage_outputs,
)
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
    "LayerCam",
    "StageTwoGradCam",
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
    "stage_outputs",
]


def explainer_for(model: Any) -> GradCam | GradientAttentionRollout:
    """The explainer suited to ``model``: :class:`GradientAttentionRollout` for transformer
    encoders, :class:`StageTwoGradCam` for a four-stage ResNet, else :class:`GradCam`. Its
    ``method`` attribute names it (``"gradient-attention-rollout"`` / ``"grad-cam-stage2"`` /
    ``"grad-cam"``), and calling it maps ``(images, class_index)`` to heatmaps of that class."""
    from brainscan.models.vit_cnn import encoder_depth

    if encoder_depth(model) > 0:
        return GradientAttentionRollout(model)
    return StageTwoGradCam(model) if len(stage_outputs(model)) >= 4 else GradCam(model)
