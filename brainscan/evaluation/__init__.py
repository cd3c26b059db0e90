"""Prediction with model bundles, and evaluation reports (``brainscan predict`` / ``brainscan evaluate``).

- :mod:`.classify`: :func:`evaluate_classifier` (labelled Kaggle records -> metrics per split);
- :mod:`.segment`: :func:`evaluate_segmenter` (cases with ground truth -> BraTS metrics per case);
- prediction (:func:`classify_images`, :func:`segment_case`) lives in :mod:`brainscan.inference`
  and is re-exported here;
- :mod:`.report`: :func:`evaluate` (bundle + dataset folder -> ``report.json``, ``report.md``,
  CSV tables and figures), :mod:`.plots` the figures.

Importing this package does not import TensorFlow or matplotlib; they load on first use.
"""

from brainscan.evaluation.classify import (
    classify_images,
    evaluate_classifier,
    make_predict_fn,
    predict_probabilities,
    preprocess_one,
)
from brainscan.evaluation.report import check_layout, evaluate, read_report, summary_lines, write_report
from brainscan.evaluation.segment import evaluate_segmenter, inference_settings, segment_case

__all__ = [
    "check_layout", "classify_images", "evaluate", "evaluate_classifier", "evaluate_segmenter",
    "inference_settings", "make_predict_fn", "predict_probabilities", "preprocess_one", "read_report",
    "segment_case", "summary_lines", "write_report",
]
