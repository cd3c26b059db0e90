"""Evaluate a model bundle on a dataset folder and write the report (``brainscan evaluate``).

:func:`evaluate` recognises the folder (Kaggle layout for classifiers; a BraTS dataset or case
folder for segmenters), refuses a folder that does not fit the bundle's task, runs the bundle and
writes into ``out_dir``:

- ``report.json``: every metric of :mod:`brainscan.metrics.classification` (per split) or
  :mod:`brainscan.metrics.segmentation` (per case and aggregated), the bundle's name, version and
  demo flag, the data path, counts, warnings and timings;
- ``report.md``: the same for people, with tables and the figures;
- classification: ``confusion_matrix.png``, ``per_class_metrics.png``, ``predictions.csv``;
- segmentation: ``dice_boxplot.png``, ``per_case.csv`` (and ``masks/`` with ``save_masks``).

Example:
    >>> report = evaluate("models/classification/resnet50/v1", "data/kaggle", "reports/resnet50")
    >>> report["splits"]["Testing"]["accuracy"]
    0.93
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

import brainscan
from brainscan.errors import DatasetLayoutError
from brainscan.labels import REGIONS

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
#: The dataset layouts each task can be evaluated on (names from ``brainscan.data.inspect``).
LAYOUTS_BY_TASK = {"classification": ("kaggle",), "segmentation": ("brats_dataset", "brats_case")}
_LAYOUT_WORDS = {"kaggle": "a Kaggle-layout folder of 2D slices (Training|Testing/<class>/*.jpg)",
                 "brats_dataset": "a folder of BraTS case folders (3D NIfTI volumes)",
                 "brats_case": "a BraTS case folder (3D NIfTI volumes)"}
_NEEDS = {"classification": "a Kaggle-layout folder (Training|Testing/<class>/*.jpg)",
          "segmentation": "a BraTS dataset folder of cases with <case>_seg.nii[.gz] (or BraTS 2023-2024 "
                          "<case>-seg.nii.gz) files"}
_SEG_METRICS = ("dice", "iou", "sensitivity", "specificity", "hd95", "volume_ml", "volume_ml_truth")


def check_layout(task: str, data_dir: str | Path) -> str:
    """Detect the layout of ``data_dir`` and check that a ``task`` bundle can be evaluated on it.

    Returns:
        the layout name (``"kaggle"``, ``"brats_dataset"`` or ``"brats_case"``).

    Raises:
        FileNotFoundError: ``data_dir`` does not exist.
        DatasetLayoutError: an empty folder, an unknown layout, or one that does not fit ``task``.
    """
    from brainscan.data.inspect import detect_layout

    data_dir = Path(data_dir)
    if data_dir.is_dir() and not any(not p.name.startswith(".") for p in data_dir.iterdir()):
        raise DatasetLayoutError(f"{data_dir} is empty; give {_NEEDS[task]}")
    layout = detect_layout(data_dir)
    if layout not in LAYOUTS_BY_TASK[task]:
        raise DatasetLayoutError(
            f"the bundle is a {task} model but {data_dir} is {_LAYOUT_WORDS[layout]}; give {_NEEDS[task]}"
        )
    return layout


def _sample(records: list[Any], limit: int | None) -> list[Any]:
    """At most ``limit`` records, drawn with a fixed seed and kept in their order (all classes
    stay represented, unlike the first ``limit`` of a class-sorted list)."""
    if limit is None or len(records) <= limit:
        return records
    keep = np.sort(np.random.default_rng(0).choice(len(records), size=limit, replace=False))
    return [records[i] for i in keep]


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer, got {limit!r}")


def _bundle_section(bundle: Any) -> dict[str, Any]:
    training = bundle.spec.training
    return {
        "name": bundle.name, "version": bundle.version, "architecture": bundle.architecture,
        "demo": bundle.demo, "path": str(bundle.path), "created_at": bundle.spec.created_at,
        "precision": bundle.precision,
        "training_data": {"fingerprint": training.get("data_fingerprint"),
                          "description": training.get("data_description")},
    }


def _training_overlap_warnings(bundle: Any, split: str, records: list[Any]) -> list[str]:
    from brainscan.data.kaggle import dataset_fingerprint

    if bundle.spec.training.get("data_fingerprint") == dataset_fingerprint(records):
        return [f"the bundle was trained on exactly the images of split {split!r} (its training data "
                "fingerprint matches): these numbers measure fit, not generalisation"]
    if split.lower() == "training":
        return [f"split {split!r} is a training split: if this bundle was trained on it, "
                "the numbers are optimistic; evaluate on Testing for an honest estimate"]
    return []


VALIDATION_SPLIT = "Validation"


def bundle_validation_records(bundle: Any, dataset: Any) -> list[Any]:
    """The validation images ``bundle`` was selected on, rebuilt from ``dataset`` and its manifest.

    Training records :func:`brainscan.data.kaggle.training_records` with the manifest's
    ``max_per_class`` and ``seed``, split by :func:`~brainscan.data.kaggle.split_train_validation`
    with its ``val_fraction`` and ``seed``: the very split ``brainscan train classifier`` made. The
    records come back with split ``"Validation"``.

    Raises:
        DatasetLayoutError: the manifest holds no training configuration, or ``dataset`` is not the
            data the bundle was trained on (its data fingerprint differs).
    """
    import dataclasses

    from brainscan.data.kaggle import dataset_fingerprint, split_train_validation, training_records

    training = bundle.spec.training
    config = training.get("config") or {}
    if "val_fraction" not in config or "seed" not in config:
        raise DatasetLayoutError(f"bundle {bundle.name} records no training split (manifest training.config lacks "
                                 "val_fraction and seed); evaluate it on a folder instead")
    records = training_records(dataset, max_per_class=config.get("max_per_class"), seed=int(config["seed"]))
    train, val = split_train_validation(records, val_fraction=float(config["val_fraction"]), seed=int(config["seed"]))
    if dataset_fingerprint(train + val) != training.get("data_fingerprint"):
        raise DatasetLayoutError(
            f"{dataset.root} is not the data bundle {bundle.name} was trained on (the training data fingerprint "
            "differs: files were added, removed or replaced), so its validation split cannot be rebuilt")
    return [dataclasses.replace(r, split=VALIDATION_SPLIT) for r in val]


def _evaluate_classification(bundle: Any, data_dir: Path, layout: str, *, batch_size: int | None,
                             limit: int | None, progress: Callable[[int, int], None] | None,
                             validation_split: bool = False) -> dict[str, Any]:
    from brainscan.data.kaggle import read_kaggle_folder
    from brainscan.evaluation.classify import evaluate_classifier

    dataset = read_kaggle_folder(data_dir, classes=bundle.classes)
    warnings: list[str] = []
    records: list[Any] = []
    if validation_split:
        # Only the rebuilt validation images count as available: the rest of the folder trained the bundle.
        dataset = type(dataset)(records=bundle_validation_records(bundle, dataset), classes=dataset.classes,
                                problems=dataset.problems, root=dataset.root)
        warnings.append("the Validation split is the one this bundle was selected on (best epoch): an honest "
                        "held-out estimate, but not an independent test set; evaluate on Testing for that")
    for split in dict.fromkeys(r.split for r in dataset.records):
        split_records = dataset.select(split)
        if not validation_split:
            warnings += _training_overlap_warnings(bundle, split, split_records)
        records += _sample(split_records, limit)
    if dataset.problems:
        warnings.append(f"{len(dataset.problems)} file(s) under {data_dir} were skipped (see data.problems)")
    started = time.perf_counter()
    results = evaluate_classifier(bundle, records, batch_size=batch_size, progress=progress)
    failed = {f["path"] for r in results.values() for f in r["failed"]}
    for split, r in results.items():
        if r["failed"]:
            warnings.append(f"{len(r['failed'])} image(s) of split {split!r} could not be decoded and were left out "
                            f"(see splits.{split}.failed); first: {r['failed'][0]['detail']}")
    evaluated = type(dataset)(records=[r for r in records if str(r.path) not in failed], classes=dataset.classes)
    return {
        "data": {"path": str(data_dir), "layout": layout, "limit": limit, "problems": dataset.problems[:50]},
        "counts": {"available": dataset.counts(), "evaluated": evaluated.counts()},
        "splits": {split: {**r["report"], "seconds": r["seconds"], "images_per_second": r["images_per_second"],
                           "failed": r["failed"]}
                   for split, r in results.items()},
        "predictions": [p for r in results.values() for p in r["predictions"]],
        "warnings": warnings,
        "evaluate_s": time.perf_counter() - started,
    }


def _evaluate_segmentation(bundle: Any, data_dir: Path, layout: str, out_dir: Path, *, limit: int | None,
                           inference: dict[str, Any] | None, save_masks: bool,
                           progress: Callable[[int, int, int, int], None] | None) -> dict[str, Any]:
    from brainscan.data.brats import scan_dataset
    from brainscan.evaluation.segment import evaluate_segmenter

    cases, problems = scan_dataset(data_dir)
    labelled = [c for c in cases if c.seg is not None]
    if not cases:
        detail = "; ".join(f"{p.folder.name}: {p.message}" for p in problems[:3])
        raise DatasetLayoutError(f"no usable BraTS case under {data_dir}" + (f": {detail}" if detail else ""))
    if not labelled:
        raise DatasetLayoutError(
            f"none of the {len(cases)} BraTS case(s) under {data_dir} has a segmentation (<case>_seg.nii[.gz], "
            "or <case>-seg.nii.gz in the BraTS 2023-2024 layout); "
            "evaluation needs ground truth; use `brainscan predict segment` for unlabelled cases"
        )
    warnings = [f"{p.folder.name}: skipped ({p.message})" for p in problems]
    unlabelled = [c.case_id for c in cases if c.seg is None]
    if unlabelled:
        warnings.append(f"{len(unlabelled)} case(s) without segmentation skipped: {unlabelled[:10]}")
    selected = labelled[:limit] if limit is not None else labelled
    started = time.perf_counter()
    results = evaluate_segmenter(bundle, selected, progress=progress, inference=inference,
                                 masks_dir=out_dir / "masks" if save_masks else None)
    warnings += [f"{f['case_id']}: failed and left out ({f['detail']})" for f in results["failed"]]
    return {
        "data": {"path": str(data_dir), "layout": layout, "limit": limit,
                 "problems": [p.to_dict() for p in problems[:50]]},
        "counts": {"cases_found": len(cases), "cases_with_seg": len(labelled),
                   "cases_evaluated": len(results["cases"]), "skipped_without_seg": unlabelled,
                   "failed": results["failed"]},
        "inference": results["inference"],
        "aggregate": results["aggregate"],
        "cases": results["cases"],
        "warnings": warnings,
        "evaluate_s": time.perf_counter() - started,
    }


def evaluate(
    bundle: Any,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    batch_size: int | None = None,
    limit: int | None = None,
    inference: dict[str, Any] | None = None,
    save_masks: bool = False,
    image_progress: Callable[[int, int], None] | None = None,
    case_progress: Callable[[int, int, int, int], None] | None = None,
    validation_split: bool = False,
    precision: str | None = "auto",
) -> dict[str, Any]:
    """Evaluate a bundle on a dataset folder and write the report files into ``out_dir``.

    Args:
        bundle: a loaded :class:`~brainscan.models.bundle.Bundle`, or a bundle folder (the folder's
            layout is checked against the manifest before the model is loaded).
        data_dir: classification: a Kaggle-layout folder (every split present is evaluated and
            reported separately); segmentation: a BraTS dataset or case folder (cases with seg).
        out_dir: report folder (created; existing report files are replaced).
        batch_size: classification images per network call (default: the manifest's).
        limit: at most this many images per split (seeded sample) or cases (the first ones).
        inference: segmentation: overrides of the manifest's sliding-window settings.
        save_masks: segmentation: also write each predicted mask into ``out_dir/masks/``.
        image_progress: classification: ``(images_done, images_total)`` after each batch.
        case_progress: segmentation: ``(case_index, n_cases, patches_done, patches_total)``.
        validation_split: classification: evaluate only the validation split the bundle was
            selected on, rebuilt from ``data_dir`` (its Training data) and the manifest (see
            :func:`bundle_validation_records`); reported as split ``Validation``.
        precision: a segmentation bundle's arithmetic (:func:`~brainscan.models.precision.resolve_precision`;
            ``auto``: bfloat16 where the CPU has it, as served); classifiers run in float32.

    Returns:
        the report dict written as ``report.json`` (layout in the module docstring).

    Raises:
        DatasetLayoutError: empty folder, unknown layout, layout of the other task, or a BraTS
            folder without any segmentation.
        BundleError: the bundle cannot be loaded.
        ValueError: a bad ``limit`` or ``batch_size``.
    """
    from brainscan.models.bundle import load_bundle, read_spec

    _check_limit(limit)
    started = time.perf_counter()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if isinstance(bundle, (str, Path)):
        layout = check_layout(task := read_spec(bundle).task, data_dir)
        bundle = load_bundle(bundle, precision=(precision or "auto") if task == "segmentation" else "float32")
    else:
        layout = check_layout(bundle.task, data_dir)
    load_s = time.perf_counter() - started
    if bundle.task == "classification":
        body = _evaluate_classification(bundle, data_dir, layout, batch_size=batch_size, limit=limit,
                                        progress=image_progress, validation_split=validation_split)
    else:
        if validation_split:
            raise DatasetLayoutError("--validation-split applies to classification bundles only")
        body = _evaluate_segmentation(bundle, data_dir, layout, out_dir, limit=limit, inference=inference,
                                      save_masks=save_masks, progress=case_progress)
    if bundle.demo:
        body["warnings"].insert(0, "DEMO bundle (trained on phantoms or for minutes): not a real model")
    report = {
        "task": bundle.task,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "brainscan_version": brainscan.__version__,
        "bundle": _bundle_section(bundle),
        **{k: v for k, v in body.items() if k not in ("evaluate_s", "predictions")},
        "timing": {"load_s": load_s, "evaluate_s": body["evaluate_s"], "total_s": time.perf_counter() - started},
    }
    write_report(report, out_dir, predictions=body.get("predictions"))
    return report


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A few lines for the terminal: accuracy per split, or mean Dice and HD95 per region
    (warnings are in ``report["warnings"]``, for the caller to show where it shows problems)."""
    bundle = report["bundle"]
    lines = [f"{bundle['name']} (version {bundle['version']}{', DEMO' if bundle['demo'] else ''}) "
             f"on {report['data']['path']}"]
    if report["task"] == "classification":
        for split, r in report["splits"].items():
            lines.append(f"  {split}: accuracy {r['accuracy']:.4f}, macro F1 {r['macro_avg']['f1']:.4f} "
                         f"({r['n_samples']} images)")
    else:
        aggregate = report["aggregate"]
        dice = ", ".join(f"{region} {_num(aggregate[region]['dice']['mean'])}" for region in REGIONS)
        hd95 = ", ".join(f"{region} {_num(aggregate[region]['hd95']['mean'], 2)}" for region in REGIONS)
        lines.append(f"  mean Dice: {dice} ({aggregate['n_cases']} cases)")
        lines.append(f"  mean HD95 (mm): {hd95}")
    return lines


def _num(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _markdown_header(report: dict[str, Any]) -> list[str]:
    bundle = report["bundle"]
    lines = [f"# Evaluation: {bundle['name']} (version {bundle['version']})", ""]
    if bundle["demo"]:
        lines += ["> **DEMO bundle**: trained on phantoms or for minutes. Not a real model.", ""]
    lines += [
        f"- Task: {report['task']}",
        f"- Architecture: {bundle['architecture']}",
        f"- Bundle: `{bundle['path']}` (created {bundle['created_at']})",
        f"- Training data: {bundle['training_data']['description'] or 'not recorded'}",
        f"- Data: `{report['data']['path']}` ({report['data']['layout']}"
        + (f", limited to {report['data']['limit']} per split" if report["data"]["limit"] else "") + ")",
        f"- Evaluated: {report['created_at']}, brainscan {report['brainscan_version']}, "
        f"{report['timing']['total_s']:.1f} s in total",
        "",
    ]
    if report["warnings"]:
        lines += ["## Warnings", ""] + [f"- {w}" for w in report["warnings"]] + [""]
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    """``report.md``: header, warnings, metric tables and links to the figures."""
    from brainscan.metrics.classification import format_report_markdown

    lines = _markdown_header(report)
    if report["task"] == "classification":
        lines += ["![Confusion matrices](confusion_matrix.png)", "",
                  "![Per-class precision, recall and F1](per_class_metrics.png)", ""]
        for split, r in report["splits"].items():
            # Demote the metrics module's headings one level, under this split's heading.
            body = "\n".join("#" + line if line.startswith("#") else line
                             for line in format_report_markdown(r).splitlines())
            lines += [f"## Split: {split}", "", f"{r['n_samples']} images in {r['seconds']:.1f} s", "", body, ""]
        return "\n".join(lines).rstrip() + "\n"
    aggregate = report["aggregate"]
    inference = report["inference"]
    lines += [
        f"Sliding window: patch {inference['patch_size']}, overlap {inference['overlap']}, "
        f"mirror axes {inference['mirror_axes'] or 'none'}.", "",
        f"## Summary over {aggregate['n_cases']} case(s) (mean ± std, median)", "",
        "| Region | Dice | IoU | Sensitivity | Specificity | HD95 (mm) |", "|---|---:|---:|---:|---:|---:|",
    ]
    for region in REGIONS:
        cells = [f"{_num(s['mean'])} ± {_num(s['std'])} ({_num(s['median'])})"
                 for s in (aggregate[region][m] for m in ("dice", "iou", "sensitivity", "specificity"))]
        hd95 = aggregate[region]["hd95"]
        cells.append(f"{_num(hd95['mean'], 2)} ± {_num(hd95['std'], 2)} (n={hd95['n']})")
        lines.append(f"| {region} | " + " | ".join(cells) + " |")
    lines += ["", f"Mean IoU over labels: {_num(aggregate['mean_iou']['mean'])}", "",
              "![Dice per region](dice_boxplot.png)", "", "## Per case", "",
              "| Case | Dice WT | Dice TC | Dice ET | HD95 WT | HD95 TC | HD95 ET | WT mL (pred / true) | s |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for case in report["cases"]:
        m = case["metrics"]
        lines.append(
            f"| {case['case_id']} | " + " | ".join(_num(m[r]["dice"]) for r in REGIONS) + " | "
            + " | ".join(_num(m[r]["hd95"], 2) for r in REGIONS)
            + f" | {_num(m['WT']['volume_ml'], 1)} / {_num(m['WT']['volume_ml_truth'], 1)} | {case['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _write_csv(path: Path, header: list[str], rows: list[list[Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows([["" if v is None else v for v in row] for row in rows])
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (np.ndarray, tuple)):
        return value.tolist() if isinstance(value, np.ndarray) else list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_report(report: dict[str, Any], out_dir: str | Path, *,
                 predictions: list[dict[str, Any]] | None = None) -> list[Path]:
    """Write ``report.json``, ``report.md``, the CSV tables and the figures of a report.

    Args:
        report: from :func:`evaluate`.
        out_dir: the report folder (created).
        predictions: classification: per-image ``{"path", "true", "predicted", "confidence"}``,
            written as ``predictions.csv`` (kept out of ``report.json``, which stays small).

    Returns:
        the files written.
    """
    from brainscan.evaluation import plots

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if report["task"] == "classification":
        written.append(plots.plot_confusion_matrices(report["splits"], out_dir / "confusion_matrix.png"))
        written.append(plots.plot_per_class_metrics(report["splits"], out_dir / "per_class_metrics.png"))
        if predictions is not None:
            written.append(_write_csv(out_dir / "predictions.csv", ["path", "true", "predicted", "confidence"],
                                      [[p["path"], p["true"], p["predicted"], f"{p['confidence']:.6f}"]
                                       for p in predictions]))
    else:
        written.append(plots.plot_dice_boxplot([c["metrics"] for c in report["cases"]], out_dir / "dice_boxplot.png"))
        header = ["case_id"] + [f"{metric}_{region}" for metric in _SEG_METRICS for region in REGIONS]
        header += ["mean_iou", "seconds"]
        rows = [[c["case_id"], *[c["metrics"][region][metric] for metric in _SEG_METRICS for region in REGIONS],
                 c["metrics"]["mean_iou"], round(c["seconds"], 3)] for c in report["cases"]]
        written.append(_write_csv(out_dir / "per_case.csv", header, rows))
    (out_dir / REPORT_MD).write_text(render_markdown(report), encoding="utf-8")
    # allow_nan=False: the metrics modules already report undefined values as null.
    text = json.dumps(report, indent=2, allow_nan=False, default=_json_default)
    (out_dir / REPORT_JSON).write_text(text + "\n", encoding="utf-8")
    return [*written, out_dir / REPORT_MD, out_dir / REPORT_JSON]


def read_report(path: str | Path) -> dict[str, Any]:
    """Read a ``report.json`` (or the folder holding it)."""
    path = Path(path)
    return json.loads((path / REPORT_JSON if path.is_dir() else path).read_text(encoding="utf-8"))


__all__ = ["LAYOUTS_BY_TASK", "check_layout", "evaluate", "read_report", "render_markdown", "summary_lines",
           "write_report"]
