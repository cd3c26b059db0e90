"""Upload validation for DICOM studies: the ``dicom`` field (one zip) and the optional ``series`` mapping.

Runs BEFORE a job exists, like the NIfTI checks of :mod:`services.segmenter.intake`, which has
already copied the zip to staging within ``max_upload_bytes`` and refused a zip that declares more
than ``max_study_files`` entries. Here :func:`brainscan.dicom.check_study` reads the headers only
(no pixel decoding, no registration), within :class:`~brainscan.dicom.StudyLimits` derived from the
service's limits, and every problem it finds is the library's own error with its own code:
``series_unidentified`` (422, a missing or ambiguous sequence: the body lists the series found and
asks for ``series``), ``bad_series_mapping``, ``missing_slices``, ``duplicate_slices``,
``uneven_spacing``, ``mixed_geometry``, ``not_mr``, ``unsupported_transfer_syntax`` (415),
``no_dicom_images``, ``multiple_studies``... Then each chosen series must fit ``max_dim`` and
``max_voxels`` like a NIfTI volume.

The job keeps the zip as uploaded (``input_study.zip``, expiring with the job) and, in its
``input`` record, the series chosen for each modality: the worker passes exactly that mapping to
:func:`brainscan.dicom.load_dicom_case`, so it segments the series that were checked here.
Nothing about the patient is read into the record or the logs: series are named by number,
description and UID.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from brainscan.errors import BadDimensionsError, InputTooLargeError
from brainscan.labels import BRATS2021, MODALITIES
from services.segmenter.intake import DICOM_FIELD, IntakeLimits, IntakeResult
from services.segmenter.jobs import STUDY_FILE

#: the modality whose series is the job's grid (the SEG and the mask lie on it)
REFERENCE_MODALITY = "t1ce"


def study_limits(limits: IntakeLimits) -> Any:
    """The :class:`~brainscan.dicom.StudyLimits` of an upload: ``max_study_files`` files, each at most
    one slice at ``max_dim`` squared in float64 plus its header, and all together at most what four
    volumes at ``max_voxels`` take (a zip that unpacks to more is refused before it is inflated)."""
    from brainscan.dicom import StudyLimits

    return StudyLimits(max_files=limits.max_study_files,
                       max_file_bytes=limits.max_header_bytes + limits.max_dim ** 2 * 8,
                       max_total_bytes=len(MODALITIES) * limits.max_volume_bytes)


def series_mapping(chosen: dict[str, dict[str, Any]]) -> dict[str, str]:
    """``{SeriesInstanceUID: modality}`` of the series :func:`~brainscan.dicom.check_study` chose."""
    return {summary["series_instance_uid"]: modality for modality, summary in chosen.items()}


def accept_dicom(path: Path, name: str, series: str | None, limits: IntakeLimits) -> IntakeResult:
    """Check a staged DICOM study zip from its headers; the job keeps the zip as it is.

    Args:
        path: the staged zip (``staging/input_study.zip``).
        name: the client's file name, made safe (:func:`~services.segmenter.intake.display_name`).
        series: the ``series`` form field (JSON ``{SeriesInstanceUID: modality}``), or ``None``.
        limits: the caps.

    Returns:
        ``files`` ``{"input_study.zip": path}``; ``meta`` with ``source`` ``"dicom"``, the chosen
        ``series`` per modality and the label convention (BraTS 2021: enhancing tumour 4).

    Raises:
        the errors of :func:`brainscan.dicom.check_study` (see the module docstring), and
        BadDimensionsError (422) / InputTooLargeError (413) for a series beyond the limits.
    """
    from brainscan.dicom import check_study, read_study
    from brainscan.dicom.sequences import parse_series_mapping

    mapping = parse_series_mapping(series)
    study = read_study(path, limits=study_limits(limits))
    chosen = check_study(study, mapping)
    for modality, summary in chosen.items():
        _check_series_size(study.series[summary["series_instance_uid"]], modality, limits)
    return IntakeResult(files={STUDY_FILE: path}, meta={
        "source": "dicom",
        "filenames": {DICOM_FIELD: name},
        "label_convention": BRATS2021,
        "reference": REFERENCE_MODALITY,
        "series": {m: {key: chosen[m][key] for key in ("series_instance_uid", "series_number", "description",
                                                       "instances", "mapped")} for m in MODALITIES},
    })


def _check_series_size(series: Any, modality: str, limits: IntakeLimits) -> None:
    """Refuse a series whose slices or volume go beyond ``max_dim`` (422) or ``max_voxels`` (413)."""
    header = series.first
    rows, columns, slices = int(header.get("Rows", 0)), int(header.get("Columns", 0)), len(series.instances)
    if max(rows, columns, slices) > limits.max_dim:
        raise BadDimensionsError(f"{modality} ({series.label}) is {rows} x {columns} pixels in {slices} slices; "
                                 f"axes longer than {limits.max_dim} are not brain MRI this service can segment")
    if rows * columns * slices > limits.max_voxels:
        raise InputTooLargeError(f"{modality} ({series.label}) has {rows * columns * slices} voxels, more than the "
                                 f"limit of {limits.max_voxels}")
