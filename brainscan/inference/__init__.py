"""Whole-volume inference: sliding-window patches with Gaussian blending and test-time mirroring.

TensorFlow is imported only inside :func:`keras_predict_fn`, so importing this package is cheap.
"""

from brainscan.inference.sliding_window import (
    count_patches,
    gaussian_importance_map,
    keras_predict_fn,
    patch_starts,
    predict_segmentation,
    sliding_window_inference,
)

__all__ = [
    "count_patches",
    "gaussian_importance_map",
    "keras_predict_fn",
    "patch_starts",
    "predict_segmentation",
    "sliding_window_inference",
]
