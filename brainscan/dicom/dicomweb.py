"""A small DICOMweb client: find a study (QIDO-RS), pull it (WADO-RS), store a SEG back (STOW-RS).

Hospitals keep their images in a PACS, and most PACS (Orthanc, dcm4chee, Google/Azure/AWS health
imaging, Sectra, ...) speak DICOMweb: plain HTTP under a base URL such as
``http://pacs:8042/dicom-web``. brainscan needs three of its calls:

- QIDO-RS ``GET {base}/studies/{study}/series``: the study's series, with their modality and
  instance count, before any pixel is moved (an unknown study is an empty answer or a 404);
- WADO-RS ``GET {base}/studies/{study}/series/{series}`` with
  ``Accept: multipart/related; type="application/dicom"``: the instances of one series as DICOM
  Part 10 files, one per part; without a ``transfer-syntax`` parameter the server sends them
  uncompressed (Explicit VR Little Endian), which brainscan always decodes;
- STOW-RS ``POST {base}/studies`` with a ``multipart/related`` body of DICOM files; the answer
  (``application/dicom+json``) lists the stored and the failed instances.

:meth:`DicomWebClient.retrieve_study` writes a study into a zip that
:func:`brainscan.dicom.read_study` reads like an uploaded one, within the same
:class:`~brainscan.dicom.StudyLimits`: the instance count is checked from QIDO before the
transfer, each part and the running total while it streams (nothing past a limit is kept).
Reports, presentation states and earlier segmentations (:data:`~brainscan.dicom.reader.NON_IMAGE_MODALITIES`)
are not pulled. UIDs are checked to be DICOM UIDs before they go into a URL, so a request can
never reach another path of the server. Messages name the server by ``name`` (or its URL without
credentials) and never carry patient attributes.

Example:
    >>> with DicomWebClient("http://127.0.0.1:8042/dicom-web") as pacs:
    ...     pulled = pacs.retrieve_study("1.2.840.113619.2.55.3", Path("study.zip"))
    ...     case = load_dicom_case(pulled.path)
    ...     pacs.store([Path("out/seg.dcm")])
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from brainscan.dicom.multipart import MultipartError, encode_multipart, iter_multipart, multipart_boundary
from brainscan.dicom.reader import NON_IMAGE_MODALITIES, StudyLimits
from brainscan.errors import BrainscanError, EmptyInputError, InputTooLargeError, InvalidInputError

#: a DICOM UID: numeric components separated by dots, at most 64 characters (PS3.5 9.1)
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_DICOM_MAGIC_OFFSET = 128
DICOM_MEDIA_TYPE = "application/dicom"
MULTIPART_DICOM = f'multipart/related; type="{DICOM_MEDIA_TYPE}"'
DICOM_JSON = "application/dicom+json"
#: the DICOM JSON tags read from answers (PS3.18 F.2): keyword -> tag
TAGS = {"Modality": "00080060", "SeriesInstanceUID": "0020000E", "SeriesNumber": "00200011",
        "SeriesDescription": "0008103E", "NumberOfSeriesRelatedInstances": "00201209",
        "SOPInstanceUID": "00080018", "ReferencedSOPSequence": "00081199", "FailedSOPSequence": "00081198",
        "ReferencedSOPInstanceUID": "00081155", "FailureReason": "00081197"}
_CHUNK = 1 << 16


class DicomWebError(BrainscanError):
    """The DICOMweb server could not be reached, refused the request or answered something that is
    not DICOMweb (code ``pacs_unreachable``, ``pacs_timeout``, ``pacs_refused``, ``pacs_error``,
    ``pacs_bad_response`` or ``pacs_store_failed``). A service answers 503: the fault is not the
    caller's input, and trying again later may work."""

    code = "pacs_error"
    http_status = 503


class StudyNotFoundError(DicomWebError):
    """The server has no study with this StudyInstanceUID (or none of its series are images)."""

    code = "study_not_found"
    http_status = 404


@dataclass(frozen=True)
class PulledStudy:
    """A study retrieved by :meth:`DicomWebClient.retrieve_study`.

    Attributes:
        path: the zip written (one member per instance, ``<series index>/<instance index>.dcm``).
        study_uid: the StudyInstanceUID asked for.
        series: SeriesInstanceUID of each series pulled, in the server's order.
        instances: instances written.
        bytes: bytes written (uncompressed).
        skipped_series: series not pulled because they carry no image (SR, SEG, PR...).
    """

    path: Path
    study_uid: str
    series: list[str]
    instances: int
    bytes: int
    skipped_series: int = 0


@dataclass(frozen=True)
class StoreResult:
    """What STOW-RS stored: the SOPInstanceUIDs sent, and those confirmed: found again with QIDO-RS
    (``verify``), else those the answer listed (empty when it listed none: some servers answer XML)."""

    sop_instance_uids: list[str]
    confirmed: list[str] = field(default_factory=list)
    status: int = 200


def check_uid(value: str, what: str = "StudyInstanceUID") -> str:
    """``value`` if it is a DICOM UID (digits and dots, at most 64 characters).

    Raises:
        InvalidInputError: (422, ``invalid_uid``) anything else; a UID goes into a URL path, so
            ``..``, ``/``, ``?`` or spaces must never get that far.
    """
    text = value.strip() if isinstance(value, str) else ""
    if not text or len(text) > 64 or not _UID.match(text):
        shown = value[:80] if isinstance(value, str) else type(value).__name__
        raise InvalidInputError(f"{what} must be a DICOM UID (digits and dots, at most 64 characters, e.g. "
                                f"1.2.840.113619.2.55.3), got {shown!r}", code="invalid_uid")
    return text


def display_url(url: str) -> str:
    """``url`` without user name and password, for messages."""
    parsed = httpx.URL(url)
    return str(parsed.copy_with(username=None, password=None)) if parsed.userinfo else url


def json_value(item: dict[str, Any], keyword: str) -> Any:
    """The first value of attribute ``keyword`` in a DICOM JSON object, or ``None``."""
    values = (item.get(TAGS[keyword]) or {}).get("Value") or [None]
    return values[0]


class DicomWebClient:
    """Client of one DICOMweb server.

    Args:
        base_url: the DICOMweb root, e.g. ``"http://127.0.0.1:8042/dicom-web"``; a user name and
            password in it are sent as HTTP Basic authentication.
        name: how messages name the server (default: the URL without credentials).
        timeout: seconds to connect, and to wait for each read.
        transport: an ``httpx`` transport (unit tests).

    Raises:
        ValueError: a URL that is not ``http://`` or ``https://``.
    """

    def __init__(self, base_url: str, *, name: str | None = None, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"a DICOMweb URL must start with http:// or https://, got {base_url!r}")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        self.base_url = base_url.rstrip("/")
        self.name = name or display_url(self.base_url)
        # trust_env off: a hospital's proxy variables must not send patient data elsewhere
        self._http = httpx.Client(timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)), transport=transport,
                                  trust_env=False, follow_redirects=False)

    def __enter__(self) -> DicomWebClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    # -- transport -------------------------------------------------------------------------------

    def _failure(self, exc: httpx.HTTPError) -> DicomWebError:
        if isinstance(exc, httpx.TimeoutException):
            return DicomWebError(f"the DICOMweb server {self.name} did not answer in time ({type(exc).__name__})",
                                 code="pacs_timeout")
        return DicomWebError(f"cannot reach the DICOMweb server {self.name} ({type(exc).__name__}); is it running "
                             "and is the configured URL right?", code="pacs_unreachable")

    def _check_status(self, response: httpx.Response, what: str, study_uid: str | None = None) -> None:
        status = response.status_code
        if status < 300:
            return
        if status == 404 and study_uid is not None:
            raise StudyNotFoundError(f"the DICOMweb server {self.name} has no study {study_uid} (HTTP 404; if it "
                                     "does, check that the URL is the DICOMweb root, e.g. .../dicom-web)")
        text = " ".join(response.read().decode("utf-8", "replace").split())[:200]
        if status in (401, 403):
            raise DicomWebError(f"the DICOMweb server {self.name} refused {what} (HTTP {status}); its credentials or "
                                "access rules must allow brainscan", code="pacs_refused")
        raise DicomWebError(f"the DICOMweb server {self.name} answered {what} with HTTP {status}: {text}",
                            code="pacs_error")

    def _get_json(self, path: str, params: dict[str, str] | None, what: str, study_uid: str) -> list[dict[str, Any]]:
        try:
            response = self._http.get(self.base_url + path, params=params, headers={"Accept": DICOM_JSON})
        except httpx.HTTPError as exc:
            raise self._failure(exc) from exc
        if response.status_code == 204:
            return []
        self._check_status(response, what, study_uid)
        try:
            body = response.json()
        except (ValueError, UnicodeDecodeError):
            body = None
        if not isinstance(body, list) or not all(isinstance(item, dict) for item in body):
            raise DicomWebError(f"the DICOMweb server {self.name} answered {what} with something that is not a "
                                f"DICOM JSON list ({response.headers.get('content-type', 'no content type')}); is "
                                "the URL the DICOMweb root (e.g. .../dicom-web)?", code="pacs_bad_response")
        return body

    # -- QIDO-RS -----------------------------------------------------------------------------------

    def search_series(self, study_uid: str) -> list[dict[str, Any]]:
        """QIDO-RS: the series of a study as DICOM JSON objects (with their instance counts).

        Raises:
            InvalidInputError: ``study_uid`` is not a UID.
            StudyNotFoundError: the server has no such study.
            DicomWebError: unreachable, refused, or not a DICOMweb answer.
        """
        study_uid = check_uid(study_uid)
        found = self._get_json(f"/studies/{study_uid}/series",
                               {"includefield": ",".join(TAGS[k] for k in ("NumberOfSeriesRelatedInstances",
                                                                            "SeriesDescription", "SeriesNumber"))},
                               "the series search", study_uid)
        if not found:
            raise StudyNotFoundError(f"the DICOMweb server {self.name} has no study {study_uid}")
        return found

    def search_instances(self, study_uid: str, series_uid: str) -> list[dict[str, Any]]:
        """QIDO-RS: the instances of one series as DICOM JSON objects."""
        study_uid, series_uid = check_uid(study_uid), check_uid(series_uid, "SeriesInstanceUID")
        return self._get_json(f"/studies/{study_uid}/series/{series_uid}/instances", None, "the instance search",
                              study_uid)

    # -- WADO-RS -----------------------------------------------------------------------------------

    def iter_series(self, study_uid: str, series_uid: str, max_instance_bytes: int) -> Iterator[bytes]:
        """WADO-RS: the instances of one series, each a DICOM Part 10 file, as they stream in.

        Raises:
            StudyNotFoundError: no such study or series.
            InputTooLargeError: an instance larger than ``max_instance_bytes``.
            DicomWebError: unreachable, refused, or a part that is not a DICOM file.
        """
        study_uid, series_uid = check_uid(study_uid), check_uid(series_uid, "SeriesInstanceUID")
        url = f"{self.base_url}/studies/{study_uid}/series/{series_uid}"
        try:
            with self._http.stream("GET", url, headers={"Accept": MULTIPART_DICOM}) as response:
                self._check_status(response, "the retrieval of a series", study_uid)
                content_type = response.headers.get("content-type", "")
                boundary = multipart_boundary(content_type)
                if boundary is None:
                    raise DicomWebError(f"the DICOMweb server {self.name} answered a series retrieval with "
                                        f"{content_type or 'no content type'}, not multipart/related DICOM",
                                        code="pacs_bad_response")
                for headers, content in iter_multipart(response.iter_bytes(_CHUNK), boundary, max_instance_bytes):
                    media = headers.get("content-type", DICOM_MEDIA_TYPE).split(";")[0].strip().lower()
                    if media != DICOM_MEDIA_TYPE or content[_DICOM_MAGIC_OFFSET:_DICOM_MAGIC_OFFSET + 4] != b"DICM":
                        raise DicomWebError(f"the DICOMweb server {self.name} sent a part that is not a DICOM file "
                                            f"({media})", code="pacs_bad_response")
                    yield content
        except httpx.HTTPError as exc:
            raise self._failure(exc) from exc
        except MultipartError as exc:
            raise DicomWebError(f"the DICOMweb server {self.name} sent a broken series: {exc.message}",
                                code="pacs_bad_response") from exc

    def retrieve_study(self, study_uid: str, dest: Path, *, limits: StudyLimits | None = None) -> PulledStudy:
        """Pull the image series of a study into the zip ``dest``, within ``limits``.

        Args:
            study_uid: the StudyInstanceUID.
            dest: the zip to write (replaced; removed again if the pull fails).
            limits: most instances, bytes per instance and bytes in all (default :class:`StudyLimits`).

        Returns:
            The :class:`PulledStudy`.

        Raises:
            InvalidInputError: ``study_uid`` is not a UID.
            StudyNotFoundError: (404) no such study.
            EmptyInputError: (400 ``no_dicom_images``) the study holds no image series.
            InputTooLargeError: (413) more instances or bytes than ``limits`` allow.
            DicomWebError: (503) unreachable, refused, or not a DICOMweb answer.
        """
        limits = limits or StudyLimits()
        study_uid = check_uid(study_uid)
        found = self.search_series(study_uid)
        images = [s for s in found if str(json_value(s, "Modality") or "") not in NON_IMAGE_MODALITIES]
        if not images:
            modalities = sorted({str(json_value(s, "Modality") or "?") for s in found})
            raise EmptyInputError(f"study {study_uid} on {self.name} holds no image series (modalities: {modalities})",
                                  code="no_dicom_images")
        series_uids = [check_uid(str(json_value(s, "SeriesInstanceUID") or ""), "SeriesInstanceUID") for s in images]
        counts = [json_value(s, "NumberOfSeriesRelatedInstances") for s in images]
        if any(count is None for count in counts):  # the server does not count: ask for the instances
            counts = [len(self.search_instances(study_uid, uid)) for uid in series_uids]
        declared = sum(int(count) for count in counts)
        if declared > limits.max_files:
            raise InputTooLargeError(f"study {study_uid} on {self.name} holds {declared} image instances; at most "
                                     f"{limits.max_files} are read")
        written = total = 0
        try:
            with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as archive:
                for index, series_uid in enumerate(series_uids):
                    for instance in self.iter_series(study_uid, series_uid, limits.max_file_bytes):
                        written += 1
                        total += len(instance)
                        if written > limits.max_files or total > limits.max_total_bytes:
                            raise InputTooLargeError(f"study {study_uid} on {self.name} is larger than the limits "
                                                     f"({limits.max_files} files, {limits.max_total_bytes} bytes)")
                        archive.writestr(f"{index:03d}/{written:05d}.dcm", instance)
        except BaseException:
            dest.unlink(missing_ok=True)
            raise
        if written == 0:
            dest.unlink(missing_ok=True)
            raise StudyNotFoundError(f"the DICOMweb server {self.name} listed study {study_uid} but sent no instance")
        return PulledStudy(path=dest, study_uid=study_uid, series=series_uids, instances=written, bytes=total,
                           skipped_series=len(found) - len(images))

    # -- STOW-RS -----------------------------------------------------------------------------------

    def store(self, files: Sequence[Path | bytes], *, verify: bool = True) -> StoreResult:
        """STOW-RS: store DICOM files (e.g. a SEG) on the server, then check that it lists them.

        A PACS may answer success and still drop an instance (a routing or filtering rule, a SOP
        class it keeps nowhere), so with ``verify`` each instance is looked up afterwards with
        QIDO-RS (``/studies/{study}/instances?SOPInstanceUID=...``).

        Raises:
            InvalidInputError: a file that is not DICOM Part 10, or without Study/SOPInstanceUID.
            DicomWebError: (``pacs_store_failed``) the server stored none or not all of them, or
                does not list them afterwards; or the errors of an unreachable or refusing server.
        """
        contents = [f.read_bytes() if isinstance(f, Path) else bytes(f) for f in files]
        identities = [_instance_identity(raw) for raw in contents]
        body, content_type = encode_multipart(contents, DICOM_MEDIA_TYPE)
        headers = {"Content-Type": content_type, "Accept": DICOM_JSON}
        try:
            response = self._http.post(f"{self.base_url}/studies", content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise self._failure(exc) from exc
        try:
            answer = response.json()
        except (ValueError, UnicodeDecodeError):
            answer = None
        answer = answer if isinstance(answer, dict) else {}
        failed = (answer.get(TAGS["FailedSOPSequence"]) or {}).get("Value") or []
        if response.status_code in (401, 403):
            self._check_status(response, "the store request")
        if failed or response.status_code >= 300:
            reasons = sorted({str(json_value(item, "FailureReason")) for item in failed})
            detail = f"failure reasons {reasons}" if failed else f"HTTP {response.status_code}"
            raise DicomWebError(f"the DICOMweb server {self.name} did not store {len(failed) or len(contents)} of "
                                f"{len(contents)} instance(s) ({detail})", code="pacs_store_failed")
        confirmed = [str(json_value(item, "ReferencedSOPInstanceUID"))
                     for item in (answer.get(TAGS["ReferencedSOPSequence"]) or {}).get("Value") or []]
        if verify:
            missing = [sop for study, sop in identities if not self._lists_instance(study, sop)]
            if missing:
                raise DicomWebError(f"the DICOMweb server {self.name} answered that it stored the instance(s) but "
                                    f"does not list {missing}: a rule of the PACS may have dropped them",
                                    code="pacs_store_failed")
            confirmed = [sop for _, sop in identities]
        return StoreResult(sop_instance_uids=[sop for _, sop in identities], confirmed=confirmed,
                           status=response.status_code)

    def _lists_instance(self, study_uid: str, sop_uid: str) -> bool:
        """Whether QIDO-RS finds instance ``sop_uid`` in study ``study_uid``."""
        try:
            found = self._get_json(f"/studies/{study_uid}/instances", {"SOPInstanceUID": sop_uid},
                                   "the check of a stored instance", study_uid)
        except StudyNotFoundError:
            return False
        return any(json_value(item, "SOPInstanceUID") == sop_uid for item in found)


def _instance_identity(raw: bytes) -> tuple[str, str]:
    """``(StudyInstanceUID, SOPInstanceUID)`` of a DICOM Part 10 file's bytes.

    Raises:
        InvalidInputError: not DICOM Part 10 (code ``not_dicom``), or UIDs missing or malformed.
    """
    import pydicom

    if raw[_DICOM_MAGIC_OFFSET:_DICOM_MAGIC_OFFSET + 4] != b"DICM":
        raise InvalidInputError("only DICOM Part 10 files (with the 'DICM' marker) can be stored", code="not_dicom")
    header = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True)
    return (check_uid(str(header.get("StudyInstanceUID", ""))),
            check_uid(str(header.get("SOPInstanceUID", "")), "SOPInstanceUID"))


def store_outcome(base_url: str, path: Path, *, name: str | None = None, timeout: float = 60.0) -> dict[str, Any]:
    """Store one DICOM file with STOW-RS and say how it went; the server's failures are reported, not raised.

    Returns:
        ``{"status": "stored", "sop_instance_uid"}``, or ``{"status": "failed", "error", "detail"}``
        (the codes of :class:`DicomWebError`, or ``not_dicom``/``file_error`` for the file).
    """
    try:
        with DicomWebClient(base_url, name=name, timeout=timeout) as client:
            stored = client.store([path])
    except BrainscanError as exc:
        return {"status": "failed", "error": exc.code, "detail": exc.message}
    except OSError as exc:
        return {"status": "failed", "error": "file_error", "detail": f"{path.name}: {type(exc).__name__}"}
    return {"status": "stored", "sop_instance_uid": stored.sop_instance_uids[0]}


def summary_of(pulled: PulledStudy) -> dict[str, Any]:
    """JSON-able record of a pull (no patient attributes)."""
    return {"study_uid": pulled.study_uid, "series": len(pulled.series), "instances": pulled.instances,
            "bytes": pulled.bytes, "skipped_series": pulled.skipped_series}


__all__ = ["DICOM_JSON", "MULTIPART_DICOM", "DicomWebClient", "DicomWebError", "PulledStudy", "StoreResult",
           "StudyNotFoundError", "check_uid", "display_url", "json_value", "store_outcome", "summary_of"]
