"""Read a DICOM study from a folder or a zip, in any folder structure, and group it into series.

Files are recognised by content (the ``DICM`` marker of a DICOM Part 10 file), never by name, so
``IM0001``, ``1.2.840...dcm`` and ``DICOM/S1/I1`` all count; anything else (a ``README.txt``, a
``DICOMDIR``, macOS ``__MACOSX`` copies) is skipped. Headers are read first, without pixel data;
voxels are decoded only for the series that are used (:meth:`DicomInstance.load`), so a study
with a thousand diffusion slices costs little.

Nothing here logs patient attributes: log lines name series by number and modality only.

Example:
    >>> study = read_study("exports/study.zip")
    >>> [(s.number, s.description, len(s.instances)) for s in study.series.values()]
    [(3, 'AX T1 POST', 48), (4, 'SAG T1', 40), ...]
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path, PurePosixPath
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from brainscan.errors import (
    CorruptFileError,
    EmptyInputError,
    InputTooLargeError,
    InvalidInputError,
    NotMRError,
    UnsupportedFormatError,
    UnsupportedTransferSyntaxError,
)

logger = logging.getLogger(__name__)

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
#: Enhanced and legacy-converted enhanced MR: one multi-frame instance per series (not read yet).
MULTIFRAME_MR_STORAGE = {"1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.4.4"}
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
#: Modalities of instances that carry no image to segment: reports, presentation states, earlier
#: segmentations, registrations... A study pulled from a PACS may hold them; they are set aside.
NON_IMAGE_MODALITIES = frozenset({"SR", "PR", "KO", "SEG", "REG", "RTSTRUCT", "DOC", "PLAN", "FID", "RWV"})
_SKIP_DIRS = {"__MACOSX"}


@dataclass(frozen=True)
class StudyLimits:
    """Bounds on what :func:`read_study` accepts, checked before bytes are inflated or parsed.

    Attributes:
        max_files: most files (or zip members) looked at.
        max_file_bytes: largest single file; a 512x512 16-bit slice is 0.5 MB.
        max_total_bytes: most bytes read in all.
    """

    max_files: int = 20_000
    max_file_bytes: int = 64 * 1024**2
    max_total_bytes: int = 4 * 1024**3


@dataclass
class DicomInstance:
    """One DICOM file: its header (no pixel data) and where to read the rest.

    Attributes:
        header: the data set read with ``stop_before_pixels=True`` (file meta included).
        name: the file's path inside the study (for messages: never a server folder).
        source: a folder file path, or ``(zip_path, member_name)``.
    """

    header: Dataset
    name: str
    source: Path | tuple[Path, str]

    def load(self) -> Dataset:
        """The whole data set, pixel data included."""
        if isinstance(self.source, Path):
            return pydicom.dcmread(self.source)
        zip_path, member = self.source
        with zipfile.ZipFile(zip_path) as archive:
            return pydicom.dcmread(BytesIO(archive.read(member)))

    @property
    def transfer_syntax(self) -> str:
        meta = getattr(self.header, "file_meta", None)
        return str(getattr(meta, "TransferSyntaxUID", "")) or "1.2.840.10008.1.2"


@dataclass
class DicomSeries:
    """The instances of one SeriesInstanceUID, in the order they were found."""

    uid: str
    instances: list[DicomInstance] = field(default_factory=list)

    @property
    def first(self) -> Dataset:
        return self.instances[0].header

    @property
    def number(self) -> int | None:
        value = self.first.get("SeriesNumber")
        return int(value) if value not in (None, "") else None

    @property
    def description(self) -> str:
        return str(self.first.get("SeriesDescription", "") or "")

    @property
    def modality(self) -> str:
        return str(self.first.get("Modality", "") or "")

    @property
    def label(self) -> str:
        """How messages name the series: ``series 3 'AX T1 POST'``."""
        number = f"series {self.number}" if self.number is not None else "series (no number)"
        return f"{number} {self.description!r}" if self.description else number

    def summary(self) -> dict[str, Any]:
        """JSON-able description for messages and mappings (no patient attributes)."""
        return {"series_instance_uid": self.uid, "series_number": self.number, "description": self.description,
                "modality": self.modality, "instances": len(self.instances)}


@dataclass
class DicomStudy:
    """The image series of one study.

    Attributes:
        study_uid: StudyInstanceUID shared by every instance.
        series: SeriesInstanceUID -> :class:`DicomSeries` for every image series (MR or not).
        skipped: how many files were not DICOM image instances (text files, DICOMDIR, reports...).
    """

    study_uid: str
    series: dict[str, DicomSeries]
    skipped: int = 0

    @property
    def mr_series(self) -> list[DicomSeries]:
        return [s for s in self.series.values() if s.modality == "MR"]

    def summary(self) -> list[dict[str, Any]]:
        """Every series, ordered by series number."""
        ordered = sorted(self.series.values(), key=lambda s: (s.number is None, s.number or 0, s.uid))
        return [s.summary() for s in ordered]


def _folder_files(folder: Path) -> Iterator[tuple[str, Path]]:
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") or part in _SKIP_DIRS for part in relative.parts) or not path.is_file():
            continue
        yield relative.as_posix(), path


def _read_header(raw: Any, name: str) -> Dataset | None:
    """The header of a DICOM Part 10 file, or ``None`` if the content is not one."""
    try:
        return pydicom.dcmread(raw, stop_before_pixels=True)
    except InvalidDicomError:
        return None
    except Exception as exc:  # pydicom raises many types for a damaged file
        raise CorruptFileError(f"{name} looks like DICOM but cannot be read: {' '.join(str(exc).split())}") from exc


def _iter_instances(path: Path, limits: StudyLimits) -> Iterator[tuple[str, Dataset | None, Path | tuple[Path, str]]]:
    """``(name, header or None, source)`` for each file of a folder or zip, within ``limits``."""
    total = 0
    if path.is_dir():
        for count, (name, file) in enumerate(_folder_files(path), start=1):
            if count > limits.max_files:
                raise InputTooLargeError(f"the study folder holds more than {limits.max_files} files")
            size = file.stat().st_size
            total += size
            if size > limits.max_file_bytes or total > limits.max_total_bytes:
                raise InputTooLargeError(f"{name}: the study is larger than the limits ({limits.max_file_bytes} "
                                         f"bytes a file, {limits.max_total_bytes} in all)")
            with file.open("rb") as fh:
                yield name, _read_header(fh, name), file
        return
    if not zipfile.is_zipfile(path):
        raise UnsupportedFormatError(f"{path.name} is neither a folder nor a zip of a DICOM study")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise CorruptFileError(f"{path.name} is a damaged zip file: {exc}") from exc
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        if len(members) > limits.max_files:
            raise InputTooLargeError(f"{path.name} holds {len(members)} files; at most {limits.max_files} are read")
        declared = sum(m.file_size for m in members)
        if declared > limits.max_total_bytes or any(m.file_size > limits.max_file_bytes for m in members):
            raise InputTooLargeError(f"{path.name} unpacks to {declared} bytes, beyond the limits "
                                     f"({limits.max_file_bytes} bytes a file, {limits.max_total_bytes} in all)")
        for member in members:
            parts = PurePosixPath(member.filename).parts
            if any(part.startswith(".") or part in _SKIP_DIRS for part in parts):
                continue
            try:
                with archive.open(member) as fh:
                    # Never trust the declared size alone: read one byte past it to notice a lie.
                    raw = fh.read(member.file_size + 1)
            except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, NotImplementedError) as exc:
                raise CorruptFileError(f"{member.filename} in {path.name} cannot be unpacked: {exc}") from exc
            if len(raw) > member.file_size:
                raise CorruptFileError(f"{member.filename} in {path.name} is larger than its zip entry declares")
            yield member.filename, _read_header(BytesIO(raw), member.filename), (path, member.filename)


def check_decodable(instance: DicomInstance, series: DicomSeries) -> None:
    """Raise if the instance's pixel data is compressed in a way no installed decoder reads.

    Raises:
        UnsupportedTransferSyntaxError: (415) naming the transfer syntax and what to do.
    """
    from pydicom.pixels.decoders.base import get_decoder
    from pydicom.uid import UID

    uid = UID(instance.transfer_syntax)
    if not uid.is_compressed:
        return
    try:
        available = get_decoder(uid).is_available
    except NotImplementedError:
        available = False
    if not available:
        raise UnsupportedTransferSyntaxError(
            f"{series.label} is compressed as {uid.name} ({uid}), which this installation cannot decode; export "
            "the study uncompressed (Explicit VR Little Endian) or as JPEG-LS, JPEG 2000 or RLE Lossless"
        )


def read_study(path: str | Path, *, limits: StudyLimits | None = None) -> DicomStudy:
    """Read the headers of a DICOM study and group its image instances into series.

    Args:
        path: a folder (any depth, any file names) or a zip of one.
        limits: bounds on files and bytes (default :class:`StudyLimits`).

    Returns:
        The :class:`DicomStudy`: every image series by SeriesInstanceUID. Instances of non-image
        modalities (SR, PR, KO, SEG...) and non-DICOM files are counted in ``skipped``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsupportedFormatError: ``path`` is a file that is not a zip; a multi-frame (enhanced) MR
            instance, which this reader does not take yet.
        EmptyInputError: no DICOM image instance at all.
        InvalidInputError: instances of several studies (code ``multiple_studies``), or an
            instance without a SeriesInstanceUID (code ``missing_series_uid``).
        NotMRError: no MR series, or a series that mixes MR with another modality.
        CorruptFileError: a DICOM file or zip member that cannot be parsed.
        InputTooLargeError: beyond ``limits``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such study folder or zip: {path}")
    limits = limits or StudyLimits()
    series: dict[str, DicomSeries] = {}
    studies: dict[str, int] = {}
    skipped = 0
    seen_sops: set[str] = set()
    for name, header, source in _iter_instances(path, limits):
        if header is None or str(getattr(header.get("file_meta"), "MediaStorageSOPClassUID", "")) == \
                MEDIA_STORAGE_DIRECTORY:
            skipped += 1
            continue
        modality = str(header.get("Modality", "") or "")
        if modality in NON_IMAGE_MODALITIES or "Rows" not in header:
            skipped += 1
            continue
        sop_uid = str(header.get("SOPInstanceUID", ""))
        if sop_uid and sop_uid in seen_sops:
            # The same instance stored twice (a copy beside a DICOMDIR, a zip of overlapping
            # exports) is one instance; two instances at one position are caught per series.
            skipped += 1
            continue
        seen_sops.add(sop_uid)
        series_uid = str(header.get("SeriesInstanceUID", "") or "")
        if not series_uid:
            raise InvalidInputError(f"{name} has no SeriesInstanceUID; export the study again from the scanner "
                                    "or PACS", code="missing_series_uid")
        if str(header.get("SOPClassUID", "")) in MULTIFRAME_MR_STORAGE or int(header.get("NumberOfFrames", 1) or 1) > 1:
            raise UnsupportedFormatError(
                f"{name} is a multi-frame (enhanced) image; brainscan reads classic single-frame MR images: "
                "export the series as 'MR Image Storage' (one file per slice)", code="multiframe_unsupported")
        studies[str(header.get("StudyInstanceUID", ""))] = studies.get(str(header.get("StudyInstanceUID", "")), 0) + 1
        series.setdefault(series_uid, DicomSeries(series_uid)).instances.append(DicomInstance(header, name, source))
    if not series:
        raise EmptyInputError(f"{path.name} holds no DICOM image ({skipped} other file(s)); upload the study's "
                              "DICOM files (Part 10, with the 'DICM' marker), zipped or in a folder",
                              code="no_dicom_images")
    if len(studies) > 1:
        raise InvalidInputError(f"{path.name} holds images of {len(studies)} studies; upload one study at a time",
                                code="multiple_studies")
    study = DicomStudy(study_uid=next(iter(studies)), series=series, skipped=skipped)
    for one in series.values():
        modalities = sorted({str(i.header.get("Modality", "") or "?") for i in one.instances})
        if len(modalities) > 1:
            raise NotMRError(f"{one.label} mixes instances of modalities {modalities}; one series holds one modality")
    if not study.mr_series:
        found = sorted({s.modality or "?" for s in series.values()})
        raise NotMRError(f"{path.name} holds no MR series (modalities found: {found}); brainscan segments brain MR "
                         "studies (t1, t1ce, t2, flair)")
    logger.info("DICOM study read: %d image series (%d MR), %d instance(s), %d other file(s) skipped",
                len(series), len(study.mr_series), sum(len(s.instances) for s in series.values()), skipped)
    return study


__all__ = ["DicomInstance", "DicomSeries", "DicomStudy", "StudyLimits", "check_decodable", "read_study"]
