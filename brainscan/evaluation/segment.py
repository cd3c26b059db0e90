"""Segment BraTS cases with a segmentation bundle, and evaluate a bundle on cases with ground truth.

:func:`segment_case` is the one inference path for 3D segmentation (CLI, evaluation and the
segmenter worker all call it):

it checks the case and hands it to :class:`brainscan.inference.segmenter.Segmenter` built from the
manifest: preprocessing (z-score, crop to brain, resampling to the manifest's spacing, pad), the
sliding window of the ``inference`` section, decoding (argmax over classes, or nested WT/TC/ET
thresholds for region outputs) back on the input grid, and the recorded post-processing.

The mask therefore lies voxel for voxel on the input grid and can be written with
:func:`brainscan.io.nifti.save_like` next to the input.

Example:
    >>> bundle = load_bundle("models/segmentation/unet3d/v1")
    >>> loaded = load_case(find_case(Path("BraTS2021_00006")), with_seg=False)
    >>> mask = segment_case(bundle, loaded)          # uint8 (240, 240, 155), labels {0, 1, 2, 4}
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from brainscan.errors import BadDimensionsError, BrainscanError, BundleError, EmptyInputError, VolumeMismatchError
from brainscan.labels import MODALITIES, to_convention

ProgressFn = Callable[[int, int], None]

_INFERENCE_KEYS = ("patch_size", "overlap", "batch_size", "mirror_axes", "one_pass")


def _check_segmenter(bundle: Any) -> None:
    if bundle.task != "segmentation":
        raise BundleError(
            f"bundle {bundle.name} ({bundle.path}) is a {bundle.task} model; a segmentation bundle is needed"
        )


def inference_settings(bundle: Any, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The sliding-window settings: the manifest's ``inference`` section, updated by ``overrides``.

    Args:
        bundle: a segmentation bundle.
        overrides: any of ``patch_size``, ``overlap``, ``batch_size``, ``mirror_axes``, ``one_pass``
            (``None`` values are ignored), e.g. ``{"overlap": 0.0}`` for a quick preview.

    Returns:
        ``{"patch_size": (x, y, z), "overlap": float, "batch_size": int, "mirror_axes": tuple,
        "one_pass": bool}`` (``one_pass``: the whole preprocessed volume in one network call).

    Raises:
        ValueError: an unknown override key.
        BundleError: the manifest has no patch size (and none was given).
    """
    unknown = sorted(set(overrides or {}) - set(_INFERENCE_KEYS))
    if unknown:
        raise ValueError(f"unknown inference settings {unknown}; known: {list(_INFERENCE_KEYS)}")
    merged = {**bundle.inference, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    if merged.get("patch_size") is None:
        raise BundleError(f"bundle {bundle.path}: manifest inference section has no patch_size")
    return {
        "patch_size": tuple(int(p) for p in merged["patch_size"]),
        "overlap": float(merged.get("overlap", 0.5)),
        "batch_size": int(merged.get("batch_size") or 1),
        "mirror_axes": tuple(int(a) for a in (merged.get("mirror_axes") or ())),
        "one_pass": bool(merged.get("one_pass", False)),
    }


def _select_modalities(bundle: Any, channels: np.ndarray) -> np.ndarray:
    """The channels the network expects, in its order, from ``(4, X, Y, Z)`` in MODALITIES order."""
    wanted = list(bundle.manifest["input"].get("modalities") or MODALITIES)
    if wanted == list(MODALITIES):
        return channels
    missing = [m for m in wanted if m not in MODALITIES]
    if missing:
        raise BundleError(f"bundle {bundle.path} expects modalities {missing} that BraTS cases do not have")
    return channels[[MODALITIES.index(m) for m in wanted]]


def segment_case(
    bundle: Any,
    case: Any,
    reference: Any | None = None,
    *,
    progress: ProgressFn | None = None,
    inference: dict[str, Any] | None = None,
    predict_fn: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Segment one case and return BraTS labels on the input grid.

    Args:
        bundle: a segmentation :class:`~brainscan.models.bundle.Bundle`.
        case: a :class:`~brainscan.data.brats.LoadedCase`, or channels ``(4, X, Y, Z)`` in
            :data:`~brainscan.labels.MODALITIES` order.
        reference: the :class:`~brainscan.io.nifti.Volume` the mask will be written against
            (default: ``case.reference`` for a loaded case); only its shape is checked here.
        progress: called after each network call with ``(patches_done, patches_total)``.
        inference: overrides of the manifest's sliding-window settings (see
            :func:`inference_settings`).
        predict_fn: ``keras_predict_fn(bundle.model, batch_size)`` built once by a caller that
            segments many cases (each new one traces the graph again); built here if ``None``.

    Returns:
        uint8 ``(X, Y, Z)`` mask with values in {0, 1, 2, 4}; 0 outside the brain crop.

    Raises:
        BundleError: ``bundle`` is not a segmentation bundle.
        BadDimensionsError: ``case`` is not ``(4, X, Y, Z)``.
        VolumeMismatchError: ``reference`` is on another grid than the channels.
        And the errors of ``preprocess_case`` (NaN/inf voxels) and ``sliding_window_inference``.
    """
    from brainscan.inference.segmenter import Segmenter

    _check_segmenter(bundle)
    channels = np.asarray(getattr(case, "channels", case))
    if reference is None:
        reference = getattr(case, "reference", None)
    if channels.ndim != 4 or channels.shape[0] != len(MODALITIES):
        raise BadDimensionsError(
            f"case channels must be ({len(MODALITIES)}, X, Y, Z) in {MODALITIES} order, got shape {channels.shape}"
        )
    if channels.size == 0:
        raise EmptyInputError(f"case channels are empty, shape {channels.shape}")
    if reference is not None and tuple(reference.shape[:3]) != tuple(channels.shape[1:]):
        raise VolumeMismatchError(
            f"reference grid {tuple(reference.shape[:3])} differs from the channels' grid {tuple(channels.shape[1:])}"
        )
    spacing = tuple(reference.spacing[:3]) if reference is not None else None
    affine = getattr(reference, "affine", None)
    segmenter = Segmenter.from_bundle(bundle, inference, predict_fn=predict_fn)
    return segmenter.segment(_select_modalities(bundle, channels), spacing, affine=affine, progress=progress)


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
