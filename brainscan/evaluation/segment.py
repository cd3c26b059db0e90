"""Evaluate a segmentation bundle on BraTS cases with ground truth (``brainscan evaluate``).

Prediction itself, :func:`segment_case` (one case -> BraTS mask on the input grid), lives in
:mod:`brainscan.inference.segmenter` with :class:`~brainscan.inference.segmenter.Segmenter`, and is
re-exported here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from brainscan.errors import BrainscanError, EmptyInputError
from brainscan.inference.segmenter import _check_segmenter, inference_settings, segment_case
from brainscan.labels import to_convention


def evaluate_segmenter(
    bundle: Any,
    cases: Sequence[Any],
    *,
    progress: Callable[[int, int, int, int], None] | None = None,
    inference: dict[str, Any] | None = None,
    masks_dir: Path | None = None,
) -> dict[str, Any]:
    """Segment cases that have a ground truth and compute every BraTS metric per case.

    Args:
        bundle: a segmentation bundle.
        cases: :class:`~brainscan.data.brats.BratsCase` list, each with ``seg``.
        progress: called as ``(case_index, n_cases, patches_done, patches_total)`` during each case.
        inference: overrides of the manifest's sliding-window settings.
        masks_dir: if given, each predicted mask is written there as ``<case_id>_pred.nii.gz``
            on its input grid.

    Returns:
        ``{"cases": [{"case_id", "folder", "shape", "spacing", "seconds", "mask",
        "metrics": segmentation_metrics(...)}], "failed": [{"case_id", "folder", "error", "detail"}],
        "aggregate": aggregate_cases(...), "inference": settings}``. Metric definitions are those
        of :mod:`brainscan.metrics.segmentation` (HD95 ``null`` when exactly one mask is empty).
        A case whose files cannot be loaded (corrupt, mismatched grids, bad labels) is listed in
        ``failed`` and left out of the aggregate.

    Raises:
        EmptyInputError: no cases, a case without segmentation, or no case could be loaded.
        And as :func:`segment_case`.
    """
    from brainscan.data.brats import load_case
    from brainscan.io.nifti import save_like
    from brainscan.metrics.segmentation import aggregate_cases, segmentation_metrics

    _check_segmenter(bundle)
    if not cases:
        raise EmptyInputError("no BraTS cases to evaluate")
    unlabelled = [c.case_id for c in cases if c.seg is None]
    if unlabelled:
        raise EmptyInputError(f"cases without a segmentation cannot be evaluated: {unlabelled[:5]}")
    from brainscan.inference.sliding_window import keras_predict_fn

    settings = inference_settings(bundle, inference)
    predict_fn = keras_predict_fn(bundle.model, batch_size=settings["batch_size"])
    rows, failed = [], []
    for index, case in enumerate(cases):
        try:
            loaded = load_case(case, with_seg=True)
        except (BrainscanError, OSError) as exc:
            # One broken case must not throw away the work done on the others; it is reported.
            failed.append({"case_id": case.case_id, "folder": str(case.folder),
                           "error": getattr(exc, "code", "not_readable"), "detail": getattr(exc, "message", str(exc))})
            continue

        def report_progress(done: int, total: int, index: int = index) -> None:
            if progress is not None:
                progress(index, len(cases), done, total)

        started = time.perf_counter()
        mask = segment_case(bundle, loaded, progress=report_progress, inference=settings,
                            predict_fn=predict_fn)
        seconds = time.perf_counter() - started
        mask_path = None
        if masks_dir is not None:
            mask_path = save_like(to_convention(mask, loaded.label_convention), loaded.reference,
                                  Path(masks_dir) / f"{loaded.case_id}_pred.nii.gz")
        rows.append({
            "case_id": loaded.case_id,
            "folder": str(case.folder),
            "shape": list(mask.shape),
            "spacing": list(loaded.reference.spacing),
            "seconds": seconds,
            "mask": str(mask_path) if mask_path is not None else None,
            "metrics": segmentation_metrics(mask, loaded.seg, loaded.reference.spacing),
        })
    if not rows:
        raise EmptyInputError(f"none of the {len(cases)} case(s) could be loaded; first error: {failed[0]['detail']}")
    return {
        "cases": rows,
        "failed": failed,
        "aggregate": aggregate_cases([row["metrics"] for row in rows]),
        "inference": {key: list(v) if isinstance(v, tuple) else v for key, v in settings.items()},
    }


__all__ = ["evaluate_segmenter", "inference_settings", "segment_case"]
