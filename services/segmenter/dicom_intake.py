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

A study can also come from a PACS instead of a zip: form fields ``pacs`` (the name of a DICOMweb
server the operator configured in ``SEGMENTER_DICOMWEB_SERVERS``, or exactly its configured URL)
and ``study_uid``. :func:`accept_pacs` pulls the study with QIDO-RS and WADO-RS
(:mod:`brainscan.dicom.dicomweb`) into the same ``input_study.zip``, within the same
:func:`study_limits`, and checks it exactly as an uploaded zip; the job's ``input.pacs`` records
where it came from, and the worker stores the SEG back there with STOW-RS (:func:`push_seg`),
recording the outcome in ``result.pacs``. A request can never make the service contact a URL
of its own choosing (SSRF): an unknown name is a 422 ``unknown_pacs`` that lists the configured names.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from brainscan.errors import BadDimensionsError, BrainscanError, InputTooLargeError, InvalidInputError
from brainscan.labels import BRATS2021, MODALITIES
from services.segmenter.upload import DICOM_FIELD, SERIES_FIELD, IntakeLimits, IntakeResult, UploadPart
from services.segmenter.jobs import STUDY_FILE, iso, utc_now

log = logging.getLogger("services.segmenter")

#: the modality whose series is the job's grid (the SEG and the mask lie on it)
REFERENCE_MODALITY = "t1ce"
#: the form fields of a study pulled from a PACS
PACS_FIELD = "pacs"
STUDY_UID_FIELD = "study_uid"


class UnknownPacsError(InvalidInputError):
    """A request names a PACS the operator did not configure (422); ``servers`` lists those configured."""

    code = "unknown_pacs"
    http_status = 422

    def __init__(self, message: str, *, servers: Sequence[str]) -> None:
        super().__init__(message)
        self.servers = list(servers)

    def to_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """``{"error", "detail", "servers"}``."""
        return {**super().to_dict(), "servers": self.servers}


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
        name: the client's file name, made safe (:func:`~services.segmenter.upload.display_name`).
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


def resolve_pacs(value: str, servers: Mapping[str, str]) -> str:
    """The configured PACS that ``value`` names: its name, or exactly its configured URL.

    Raises:
        UnknownPacsError: (422) anything else; the message and ``servers`` list the configured
            names (never their URLs).
    """
    text = value.strip()
    if text in servers:
        return text
    by_url = {url.rstrip("/"): name for name, url in servers.items()}
    if text.rstrip("/") in by_url:
        return by_url[text.rstrip("/")]
    names = sorted(servers)
    hint = (f"choose one of {names}" if names else
            "this server has no PACS configured (the operator lists them in SEGMENTER_DICOMWEB_SERVERS)")
    raise UnknownPacsError(f"PACS {text[:80]!r} is not one this server may contact; {hint}", servers=names)


def accept_pacs(parts: Sequence[UploadPart], texts: Mapping[str, str], staging: Path, limits: IntakeLimits,
                servers: Mapping[str, str], *, timeout_s: float = 60.0) -> IntakeResult:
    """Pull a study from a configured PACS into staging and check it as :func:`accept_dicom` checks a zip.

    Args:
        parts: the form's file fields (there must be none).
        texts: the form's text fields: ``pacs``, ``study_uid`` and optionally ``series``.
        staging: the staging folder; the study lands in ``staging/input_study.zip``.
        limits: the caps (:func:`study_limits` bounds the pull).
        servers: the configured PACS, name -> DICOMweb URL.
        timeout_s: connect / read timeout of each DICOMweb call.

    Returns:
        what :func:`accept_dicom` returns, with ``meta["pacs"]`` = ``{"server", "study_uid",
        "instances", ...}``.

    Raises:
        InvalidInputError: (422 ``ambiguous_upload``) files sent with ``pacs``; (422
            ``missing_study_uid`` / ``invalid_uid``) no or a malformed ``study_uid``.
        BrainscanError: (400 ``invalid_upload``) another text field.
        UnknownPacsError: (422) a PACS that is not configured.
        StudyNotFoundError: (404) the PACS has no such study.
        DicomWebError: (503) the PACS is unreachable or answers something else than DICOMweb.
        the errors of :func:`accept_dicom` for the study itself.
    """
    from brainscan.dicom.dicomweb import DicomWebClient, check_uid, summary_of
    from brainscan.dicom.sequences import parse_series_mapping

    if parts:
        raise InvalidInputError(f"'{PACS_FIELD}' pulls the study from a PACS; send no files with it (got "
                                f"{sorted({p.field for p in parts})[:6]})", code="ambiguous_upload")
    unknown = sorted(set(texts) - {PACS_FIELD, STUDY_UID_FIELD, SERIES_FIELD})
    if unknown:
        raise BrainscanError(f"unknown form field(s) {unknown[:6]} with '{PACS_FIELD}'; send '{PACS_FIELD}', "
                             f"'{STUDY_UID_FIELD}' and optionally '{SERIES_FIELD}'", code="invalid_upload")
    name = resolve_pacs(texts[PACS_FIELD], servers)
    if not texts.get(STUDY_UID_FIELD, "").strip():
        raise InvalidInputError(f"send the StudyInstanceUID of the study to pull from PACS {name!r} as "
                                f"'{STUDY_UID_FIELD}'", code="missing_study_uid")
    study_uid = check_uid(texts[STUDY_UID_FIELD])
    parse_series_mapping(texts.get(SERIES_FIELD))  # a bad mapping is refused before anything is pulled
    with DicomWebClient(servers[name], name=name, timeout=timeout_s) as pacs:
        pulled = pacs.retrieve_study(study_uid, staging / STUDY_FILE, limits=study_limits(limits))
    log.info("pulled a study from PACS %s: %d series, %d instances, %d bytes", name, len(pulled.series),
             pulled.instances, pulled.bytes)
    result = accept_dicom(pulled.path, f"PACS {name}", texts.get(SERIES_FIELD), limits)
    result.meta["filenames"] = {PACS_FIELD: name}
    result.meta["pacs"] = {"server": name, **summary_of(pulled)}
    return result


def push_seg(pacs: Mapping[str, Any], seg_path: Path, servers: Mapping[str, str], *,
             timeout_s: float = 60.0) -> dict[str, Any]:
    """Store a job's SEG back in the PACS its study came from (STOW-RS); never raises for the PACS.

    Args:
        pacs: the job's ``input.pacs`` record (``server``, ``study_uid``).
        seg_path: the job's ``seg.dcm``.
        servers: the configured PACS (the worker's settings: the name must still be configured).
        timeout_s: connect / read timeout.

    Returns:
        ``{"server", "study_uid", "at", "status": "stored", "sop_instance_uid"}``, or with
        ``"status": "failed"`` the ``error`` code and ``detail``: the SEG stays a file of the job.
    """
    from brainscan.dicom.dicomweb import store_outcome

    name = str(pacs.get("server"))
    if name in servers:
        outcome = store_outcome(servers[name], seg_path, name=name, timeout=timeout_s)
    else:
        outcome = {"status": "failed", "error": UnknownPacsError.code,
                   "detail": f"PACS {name!r} is no longer configured on the worker (SEGMENTER_DICOMWEB_SERVERS)"}
    if outcome["status"] == "stored":
        log.info("stored the SEG in PACS %s", name)
    else:
        log.warning("storing the SEG in PACS %s failed: %s", name, outcome["error"])
        outcome["detail"] += "; the SEG is still a file of this job (seg.dcm)"
    return {"server": name, "study_uid": pacs.get("study_uid"), "at": iso(utc_now()), **outcome}
