"""Reports on BraTS case folders and datasets for ``brainscan data inspect``: they list every
problem instead of raising, so one broken case does not hide the others."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from brainscan.data.brats import BratsCase, _case_prefix, _load_volume, _scan_folder, _validate, find_case, scan_dataset
from brainscan.errors import BrainscanError, DatasetLayoutError, MissingModalityError, VolumeMismatchError
from brainscan.io.nifti import Volume, read_nifti_header
from brainscan.labels import BRATS2021, BRATS2023, MODALITIES, convention_label_names


def inspect_case(folder: str | Path, *, read_data: bool = True) -> dict[str, Any]:
    """Describe a case folder, listing its problems instead of raising (``brainscan data inspect``).

    Args:
        folder: the case folder.
        read_data: also decode voxels to check finiteness, affines against flair, and count
            labels; ``False`` reads headers only (fast, for whole datasets).

    Returns:
        JSON-able dict: ``case_id``, ``folder``, ``label_convention`` (``"brats2021"`` or
        ``"brats2023"``, from the file names), ``modalities`` (MODALITIES name -> file name, those
        found), ``seg`` (file name or None), ``shape``, ``spacing_mm``, ``orientation`` (axis codes
        of the voxel order, e.g. ``"LPS"``), ``dtypes`` (on-disk, per file), ``labels`` (label
        value as stored in the file -> ``{"name", "voxels", "volume_ml"}``, named in the case's
        convention, if the seg was read, else None) and ``problems`` (list of
        ``{"error": code, "detail": message}``; empty if good).
    """
    folder = Path(folder)
    report: dict[str, Any] = {
        "case_id": None, "folder": str(folder), "label_convention": None, "modalities": {}, "seg": None,
        "shape": None, "spacing_mm": None, "orientation": None, "dtypes": {}, "labels": None, "problems": [],
    }
    try:
        case = find_case(folder)
    except (DatasetLayoutError, MissingModalityError) as exc:
        report["problems"].append(exc.to_dict())
        if not folder.is_dir():
            return report
        case = _partial_case(folder)
    report["case_id"] = case.case_id
    report["label_convention"] = case.label_convention
    report["modalities"] = {m: p.name for m, p in case.modalities.items()}
    report["seg"] = case.seg.name if case.seg is not None else None

    files = {**case.modalities, **({"seg": case.seg} if case.seg is not None else {})}
    volumes: dict[str, Volume] = {}
    headers = {}
    for name, path in files.items():
        try:
            if read_data:
                volumes[name] = _load_volume(path)
                headers[name] = volumes[name].header
            else:
                headers[name] = read_nifti_header(path)
        except BrainscanError as exc:
            report["problems"].append({"error": exc.code, "detail": f"{path.name}: {exc.message}"})
            continue
        report["dtypes"][name] = str(headers[name].get_data_dtype())
    if not headers:
        return report
    first = headers["flair"] if "flair" in headers else next(iter(headers.values()))
    report["shape"] = [int(s) for s in first.get_data_shape()[:3]]
    report["spacing_mm"] = [float(z) for z in first.get_zooms()[:3]]
    report["orientation"] = "".join(nib.aff2axcodes(first.get_best_affine()))

    if not read_data:
        shapes = {n: tuple(int(s) for s in h.get_data_shape()) for n, h in headers.items()}
        if len(set(shapes.values())) > 1:
            error = VolumeMismatchError(f"{case.case_id} volumes differ in shape: {shapes}")
            report["problems"].append(error.to_dict())
        return report
    problems = _validate(volumes, volumes.get("seg"), case.case_id, case.label_convention)
    report["problems"].extend(p.to_dict() for p in problems)
    seg = volumes.get("seg")
    if seg is not None and np.isfinite(seg.data).all():
        values, counts = np.unique(seg.data, return_counts=True)
        names = convention_label_names(case.label_convention)
        report["labels"] = {
            int(v): {
                "name": names.get(int(v), "not a BraTS label"),
                "voxels": int(c),
                "volume_ml": round(int(c) * seg.voxel_volume_ml, 3),
            }
            for v, c in zip(values.tolist(), counts.tolist())
        }
    return report


def _partial_case(folder: Path) -> BratsCase:
    """Best-effort :class:`BratsCase` of a broken folder: the first file found per kind; the
    convention of most of its files (2018-2021 on a tie)."""
    by_kind, segm, _, conventions = _scan_folder(folder)
    modalities = {m: by_kind[m][0] for m in MODALITIES if m in by_kind}
    seg = by_kind["seg"][0] if "seg" in by_kind else (segm[0] if len(segm) == 1 else None)
    prefixes = sorted({_case_prefix(p) for p in modalities.values()})
    convention = max((BRATS2021, BRATS2023), key=lambda c: len(conventions.get(c, [])))
    return BratsCase(case_id=prefixes[0] if prefixes else folder.name, folder=folder, modalities=modalities, seg=seg,
                     label_convention=convention)


def inspect_dataset(dataset_root: str | Path, *, read_data: bool = False) -> dict[str, Any]:
    """Summarise a dataset: case count, shapes, spacings, label totals and every problem.

    Args:
        dataset_root: dataset folder holding one subfolder per case.
        read_data: decode voxels of every case (slow on a full dataset: ~0.3 s per case).

    Returns:
        JSON-able dict: ``root``, ``n_cases`` (usable by name), ``n_with_seg``,
        ``label_conventions`` (convention -> number of cases), ``shapes`` and ``spacings_mm``
        (value -> number of cases), ``label_voxels`` (label as stored in the files -> total
        voxels, if ``read_data``), ``cases`` (per-case :func:`inspect_case` reports) and
        ``problems`` (``{"folder", "error", "detail"}`` for every broken folder or case).
    """
    cases, layout_problems = scan_dataset(dataset_root)
    conventions: dict[str, int] = {}
    for case in cases:
        conventions[case.label_convention] = conventions.get(case.label_convention, 0) + 1
    summary: dict[str, Any] = {
        "root": str(dataset_root), "n_cases": len(cases), "n_with_seg": sum(c.seg is not None for c in cases),
        "label_conventions": conventions, "shapes": {}, "spacings_mm": {},
        "label_voxels": {} if read_data else None, "cases": [], "problems": [p.to_dict() for p in layout_problems],
    }
    for case in cases:
        report = inspect_case(case.folder, read_data=read_data)
        summary["cases"].append(report)
        for key, value in (("shapes", report["shape"]), ("spacings_mm", report["spacing_mm"])):
            if value is not None:
                label = "x".join(f"{v:g}" for v in value)
                summary[key][label] = summary[key].get(label, 0) + 1
        for label, info in (report["labels"] or {}).items():
            summary["label_voxels"][label] = summary["label_voxels"].get(label, 0) + info["voxels"]
        summary["problems"].extend({"folder": str(case.folder), **p} for p in report["problems"])
    return summary


__all__ = ["inspect_case", "inspect_dataset"]
