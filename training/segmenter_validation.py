"""Validation of a segmenter in training: whole cases scored as serving predicts them, and the choices made on them.

- :func:`evaluate_cases`: segment whole validation cases with the
  :class:`~brainscan.inference.segmenter.Segmenter` the bundle will serve, score them on their
  own label files;
- :func:`select_postprocessing` and :func:`select_mirroring`: the post-processing and mirroring
  TTA a bundle records, each kept only where it measurably helps on validation (the post-processing
  chosen again, :func:`select_postprocessing_pooled`, once a mirroring is chosen);
- :func:`cross_validation_summary`: per-region Dice and HD95 over the bundles of a K-fold run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from brainscan.labels import REGIONS

log = logging.getLogger(__name__)


def predict_cases(segmenter: Any, cases: list[Any], cache_dir: Path | None = None) -> Iterator[tuple]:
    """Segmenter probabilities of labelled cases, with what scoring them needs.

    Yields:
        ``(case_id, CropInfo, probabilities (X', Y', Z', K), truth labels (X, Y, Z) uint8, spacing)``.
        The truth is the label file itself, on its own grid, not the cropped training labels: a
        tumour voxel the crop lost counts as missed.
    """
    from training.patches import prepare_case, read_truth

    for case in cases:
        prepared = prepare_case(case, segmenter.preprocess_config, cache_dir)
        probabilities = segmenter.probabilities(np.asarray(prepared.image))
        labels, spacing = read_truth(case)
        yield case.case_id, prepared.info, probabilities, labels, spacing


def evaluate_cases(segmenter: Any, cases: list[Any], cache_dir: Path | None = None) -> dict[str, dict]:
    """Segment whole cases as serving does and score them against their label files, on their own grid.

    Args:
        segmenter: the :class:`~brainscan.inference.segmenter.Segmenter` the bundle will serve.
        cases: labelled :class:`~brainscan.data.brats.BratsCase` objects.
        cache_dir: preprocessed-case cache shared with training (the same function, computed once).

    Returns:
        ``{case_id: segmentation_metrics(...)}`` (BraTS regions WT/TC/ET, labels, mean IoU).
    """
    return score_predictions(segmenter, predict_cases(segmenter, cases, cache_dir))


def score_predictions(segmenter: Any, predicted: Iterable[tuple]) -> dict[str, dict]:
    """Decode :func:`predict_cases` output with the segmenter's post-processing and score each case.

    Returns:
        ``{case_id: segmentation_metrics(...)}``.
    """
    from brainscan.metrics.segmentation import segmentation_metrics

    return {case_id: segmentation_metrics(segmenter.decode(probabilities, info, spacing), labels, spacing)
            for case_id, info, probabilities, labels, spacing in predicted}


def predictions_nbytes(predicted: list[tuple]) -> int:
    """Bytes held by a list of :func:`predict_cases` results (probabilities and truth)."""
    return sum(int(item[2].nbytes) + int(item[3].nbytes) for item in predicted)


#: Smallest gain in mean validation Dice for which a post-processing step is switched on.
MEASURABLE_GAIN = 1e-3
#: Candidates tried by :func:`select_postprocessing` (mm^3; BraTS cases are 1 mm^3 a voxel).
POSTPROCESSING_CANDIDATES: tuple[dict[str, float], ...] = (
    {}, {"min_enhancing_mm3": 200.0}, {"min_enhancing_mm3": 500.0}, {"min_component_mm3": 200.0},
    {"min_component_mm3": 200.0, "min_enhancing_mm3": 200.0}, {"min_component_mm3": 200.0, "min_enhancing_mm3": 500.0},
)


def select_postprocessing(segmenter: Any, cases: list[Any], cache_dir: Path | None = None,
                          candidates: tuple[dict[str, float], ...] = POSTPROCESSING_CANDIDATES,
                          predicted: list[tuple] | None = None,
                          ) -> tuple[Any, dict[str, dict], list[dict[str, Any]]]:
    """Pick the post-processing that scores best on the validation cases; none unless it helps.

    Each case is predicted once; every candidate decodes the same probabilities. A candidate replaces
    the current best only with a strictly higher mean of WT/TC/ET Dice, so a step that does not
    measurably help stays off (the first candidate, ``{}``, is no post-processing).

    Args:
        predicted: :func:`predict_cases` of these cases by this segmenter's weights and window settings,
            when the caller already has them (the training's validation of its best epoch); else
            the cases are predicted here.

    Returns:
        ``(PostprocessConfig, per_case metrics of the chosen one, table of every candidate's Dice)``.
    """
    from brainscan.inference.postprocess import PostprocessConfig

    if predicted is None:
        predicted = list(predict_cases(segmenter, cases, cache_dir))
    elif [item[0] for item in predicted] != [case.case_id for case in cases]:
        raise ValueError("predicted must hold the given cases, in their order")
    best: tuple[Any, dict[str, dict], float] | None = None
    table = []
    for candidate in candidates:
        config = PostprocessConfig(threshold=segmenter.postprocessing.threshold, **candidate)
        segmenter.postprocessing = config
        per_case = score_predictions(segmenter, predicted)
        scores = region_dice(per_case)
        table.append({"postprocessing": config.to_dict(), "dice": scores})
        log.info("post-processing %s: Dice WT %.3f TC %.3f ET %.3f mean %.4f", candidate or "none", scores["WT"],
                 scores["TC"], scores["ET"], scores["mean"])
        if best is None or scores["mean"] > best[2] + MEASURABLE_GAIN:
            best = (config, per_case, scores["mean"])
    assert best is not None
    return best[0], best[1], table


def select_postprocessing_pooled(groups: list[tuple[Any, list[Any]]], cache_dir: Path | None = None,
                                 candidates: tuple[dict[str, float], ...] = POSTPROCESSING_CANDIDATES,
                                 ) -> tuple[Any, dict[str, dict], list[dict[str, Any]]]:
    """:func:`select_postprocessing` over several ``(segmenter, its cases)`` groups scored as one set, each
    case predicted by its group's segmenter with that segmenter's window settings and mirroring (the folds
    of a cross-validation; one group for a single run). Every segmenter is left with the choice.

    Called again once a mirroring is chosen: mirroring moves the probabilities (a few hundred mm^3 of
    enhancing tumour can come or go), so the post-processing is chosen on the predictions that are served.
    """
    ordered = [case for _, cases in groups for case in cases]
    predicted = [item for segmenter, cases in groups for item in predict_cases(segmenter, cases, cache_dir)]
    config, per_case, table = select_postprocessing(groups[0][0], ordered, predicted=predicted, candidates=candidates)
    for segmenter, _ in groups:
        segmenter.postprocessing = config
    return config, per_case, table


#: Mirroring candidates of :func:`select_mirroring`, cheapest first: none, left-right (2 passes), all
#: three axes (8 passes).
MIRROR_CANDIDATES: tuple[tuple[int, ...], ...] = ((), (0,), (0, 1, 2))
#: Smallest gain in mean validation Dice for which a costlier mirroring is chosen: it multiplies
#: every user's inference time, so it must pay more than post-processing (which is free).
MIRROR_GAIN = 5e-3


def select_mirroring(segmenter: Any, cases: list[Any], cache_dir: Path | None = None,
                     candidates: tuple[tuple[int, ...], ...] = MIRROR_CANDIDATES
                     ) -> tuple[tuple[int, ...], dict[str, dict], list[dict[str, Any]]]:
    """Pick the test-time mirroring that serves best on the validation cases, for its cost.

    Candidates are tried cheapest first, with the segmenter's post-processing; a costlier one
    replaces the current choice only when it gains more than :data:`MIRROR_GAIN` mean Dice of
    WT/TC/ET over it. The segmenter is left with the chosen axes.

    Returns:
        ``(mirror axes, per-case metrics of the chosen one, table of every candidate's Dice and seconds)``.
    """
    return select_mirroring_pooled([(segmenter, cases)], cache_dir, candidates)


def select_mirroring_pooled(groups: list[tuple[Any, list[Any]]], cache_dir: Path | None = None,
                            candidates: tuple[tuple[int, ...], ...] = MIRROR_CANDIDATES
                            ) -> tuple[tuple[int, ...], dict[str, dict], list[dict[str, Any]]]:
    """:func:`select_mirroring` over several ``(segmenter, its cases)`` groups scored as one set: the
    folds of a cross-validation, each predicting the cases it did not train on. Every segmenter is
    left with the chosen axes."""
    n_cases = sum(len(cases) for _, cases in groups)
    best: tuple[tuple[int, ...], dict[str, dict], float] | None = None
    table = []
    for axes in candidates:
        start = time.perf_counter()
        per_case: dict[str, dict] = {}
        for segmenter, cases in groups:
            segmenter.mirror_axes = tuple(axes)
            per_case.update(evaluate_cases(segmenter, cases, cache_dir))
        seconds = time.perf_counter() - start
        scores = region_dice(per_case)
        table.append({"mirror_axes": list(axes), "passes": 2 ** len(axes), "dice": scores,
                      "seconds_per_case": round(seconds / max(1, n_cases), 2)})
        log.info("mirroring %s (%d passes): Dice WT %.3f TC %.3f ET %.3f mean %.4f, %.1f s a case", list(axes),
                 2 ** len(axes), scores["WT"], scores["TC"], scores["ET"], scores["mean"], seconds / max(1, n_cases))
        if best is None or scores["mean"] > best[2] + MIRROR_GAIN:
            best = (tuple(axes), per_case, scores["mean"])
    assert best is not None
    for segmenter, _ in groups:
        segmenter.mirror_axes = best[0]
    return best[0], best[1], table


def region_dice(per_case: dict[str, dict]) -> dict[str, float]:
    """Mean Dice per region over cases, and ``mean`` (their average: the model-selection score)."""
    scores = {r: float(np.mean([m[r]["dice"] for m in per_case.values()])) for r in REGIONS}
    scores["mean"] = float(np.mean(list(scores.values())))
    return scores


def validation_metrics(per_case: dict[str, dict]) -> dict[str, Any]:
    """The ``metrics`` a segmenter bundle records of its per-case validation: the mean Dice per region
    (``dice``), every metric aggregated (``validation``), Dice and HD95 per case, and the number of cases."""
    from brainscan.metrics.segmentation import aggregate_cases

    return {
        "dice": region_dice(per_case),
        "validation": aggregate_cases(list(per_case.values())),
        "validation_per_case": {cid: {r: m[r]["dice"] for r in REGIONS} for cid, m in per_case.items()},
        "validation_per_case_hd95": {cid: {r: finite_or_none(m[r]["hd95"]) for r in REGIONS}
                                     for cid, m in per_case.items()},
        "validation_cases": len(per_case),
    }


def finite_or_none(value: Any) -> float | None:
    """A metric for JSON: ``None`` where it is undefined (NaN, inf: e.g. HD95 with an empty mask)."""
    return float(value) if value is not None and np.isfinite(value) else None


def cross_validation_summary(bundle_paths: list[Path]) -> dict[str, Any]:
    """Pool the validation of the fold runs of one cross-validation (``--folds K --fold I``).

    Reads the manifests only. Every case is validated by the fold that did not train on it, so the
    pooled per-case Dice and HD95 are an estimate over all cases of what the recipe reaches on
    unseen cases of the same data (still not an independent test: the recipe was chosen on them).

    Returns:
        ``{"folds": K, "folds_found": [...], "folds_missing": [...], "cases": N, "per_fold": [...],
        "dice": {WT, TC, ET, mean}, "hd95": {WT, TC, ET}, "hd95_cases": {region: n}}``.

    Raises:
        BundleError: a bundle is not a fold run, or the runs are not folds of one cross-validation
            (other data, seed, K or architecture; a fold twice; overlapping validation cases).
    """
    from brainscan.errors import BundleError
    from brainscan.models.bundle import read_spec

    if not bundle_paths:
        raise BundleError("cv-summary needs the bundles of the fold runs")
    runs = []
    for path in bundle_paths:
        manifest = read_spec(path)
        config = manifest.training.get("config") or {}
        if manifest.task != "segmentation" or config.get("folds") is None:
            raise BundleError(f"{path} is not a segmenter trained with --folds/--fold")
        runs.append((path, manifest, config))
    key = {(m.architecture.name, m.training.get("data_fingerprint"), c["folds"], c["seed"]) for _, m, c in runs}
    if len(key) > 1:
        raise BundleError(f"these bundles are not folds of one cross-validation (architecture, data, folds, seed "
                          f"differ: {sorted(key)})")
    folds = runs[0][2]["folds"]
    seen: dict[int, Path] = {}
    dice_rows: dict[str, dict[str, float]] = {}
    hd95_rows: dict[str, dict[str, float | None]] = {}
    per_fold = []
    for path, manifest, config in sorted(runs, key=lambda r: r[2]["fold"]):
        fold = config["fold"]
        if fold in seen:
            raise BundleError(f"fold {fold} twice: {seen[fold]} and {path}")
        seen[fold] = path
        metrics = manifest.metrics
        overlap = sorted(set(metrics["validation_per_case"]) & set(dice_rows))
        if overlap:
            raise BundleError(f"{path} validates on {overlap}, which another fold validates on too")
        dice_rows.update(metrics["validation_per_case"])
        hd95_rows.update(metrics.get("validation_per_case_hd95") or {})
        per_fold.append({"fold": fold, "bundle": str(path), "cases": sorted(metrics["validation_per_case"]),
                         "dice": metrics["dice"]})
    dice = {r: float(np.mean([row[r] for row in dice_rows.values()])) for r in REGIONS}
    dice["mean"] = float(np.mean([dice[r] for r in REGIONS]))
    hd95 = {}
    counts = {}
    for r in REGIONS:
        values = [row[r] for row in hd95_rows.values() if row.get(r) is not None]
        hd95[r] = float(np.mean(values)) if values else None
        counts[r] = len(values)
    return {"folds": folds, "folds_found": sorted(seen), "folds_missing": sorted(set(range(folds)) - set(seen)),
            "cases": len(dice_rows), "per_fold": per_fold, "dice": dice, "hd95": hd95, "hd95_cases": counts}


__all__ = [
    "MEASURABLE_GAIN", "MIRROR_CANDIDATES", "MIRROR_GAIN", "POSTPROCESSING_CANDIDATES", "cross_validation_summary",
    "evaluate_cases", "finite_or_none", "predict_cases", "region_dice", "select_mirroring", "select_mirroring_pooled",
    "select_postprocessing", "select_postprocessing_pooled", "validation_metrics",
]
