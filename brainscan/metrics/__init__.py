"""Evaluation metrics: classification reports (2D classifier) and BraTS segmentation scores."""

from brainscan.metrics.classification import (
    ECE_BINS,
    classification_report,
    expected_calibration_error,
    format_report_markdown,
)
from brainscan.metrics.segmentation import (
    BRATS_HD95_EMPTY_VALUE,
    aggregate_cases,
    dice,
    hd95,
    iou,
    mean_iou,
    segmentation_metrics,
    volumes_ml,
)

__all__ = [
    "BRATS_HD95_EMPTY_VALUE",
    "ECE_BINS",
    "aggregate_cases",
    "classification_report",
    "dice",
    "expected_calibration_error",
    "format_report_markdown",
    "hd95",
    "iou",
    "mean_iou",
    "segmentation_metrics",
    "volumes_ml",
]
