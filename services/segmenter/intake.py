"""Upload validation for segmentation jobs: four files, a zipped case folder, or one 4D volume.

Everything here runs BEFORE a job exists, so a bad upload never reaches the queue. The upload is
checked in the order of what costs least:

1. the form: exactly one of the three shapes (``t1``/``t1ce``/``t2``/``flair`` files, or the same
   four under their BraTS 2023-2024 names ``t1n``/``t1c``/``t2w``/``t2f``; ``case`` zip; ``volume``
   4D file), no unknown field, no mix of the two namings (400), no field twice (422);
2. each NIfTI header, from at most a few KB of (decompressed) bytes, before nibabel or any
   decompression of the voxel data: NIfTI by content (415), not truncated (422), 3D (or 4D with 4
   channels for ``volume``; 2D / 5D: 422), each axis at most ``max_dim`` (422), at most
   ``max_voxels`` voxels (413), an intensity data type (415), a plausible header size. The
   decompressed size is therefore known and capped from the header alone: a gzip bomb whose
   header claims 2000^3 voxels is refused without inflating a byte of it;
3. across the case: every modality present (422 ``missing_modality`` naming it). Four volumes
   on one grid (same shape, affines within ``AFFINE_ATOL_MM``) go on as they are, the mask on
   their grid. Volumes on different grids (a converter's output: each series its own orientation,
   slices and field of view) must overlap the t1ce's world extent
   (:func:`brainscan.preprocess.align.check_overlap`, 422 ``no_overlap``); the job then records
   ``meta["alignment"]`` and the t1ce grid as its ``shape``/``spacing_mm``/``orientation``, and the
   worker aligns t1, t2 and flair to t1ce (the DICOM path's steps), the mask on the t1ce grid;
4. the voxel data, one modality at a time: finite (422 ``non_finite``), then written normalised as
   ``input_<modality>.nii.gz`` (NIfTI-1, gzip, no intensity scaling) with the upload's affine and
   header geometry, through :func:`brainscan.io.nifti.save_nifti`.

Zip members are never used as paths: only their base names are matched to modalities (BraTS
naming ``<case>_<modality>.nii[.gz]``, or BraTS 2023-2024 ``<case>-{t1n,t1c,t2w,t2f}.nii.gz``;
``seg`` and other files are ignored), and each is inflated to a staging file named after its
modality. A zip bomb is refused before it is inflated: the sizes the zip declares must fit a 3D
volume within the limits, all four together ``max_upload_bytes``, and the NIfTI header at the start
of each member must announce the size its zip header declares; inflation then stops at that size,
so a zip header that lies cannot put more into staging (:func:`_stage_zip`).

The naming of the upload decides the label convention of the job's mask, recorded as
``meta["label_convention"]``: ``"brats2023"`` (enhancing tumour 3) for 2023-2024 field or member
names, ``"brats2021"`` (enhancing tumour 4) otherwise, 4D volumes included. Stored inputs are
always ``input_<modality>.nii.gz`` with the :data:`~brainscan.labels.MODALITIES` names.

Example:
    >>> limits = IntakeLimits(max_upload_bytes=512 << 20, max_voxels=2**25)
    >>> with store.staging_dir() as staging:
    ...     intake = accept_upload(parts, staging, limits)    # raises BrainscanError subclasses
    ...     job_id = store.create(owner, model, intake.meta, files=intake.files)
"""

from __future__ import annotations

import copy
import re
import struct
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import nibabel as nib
import numpy as np

from brainscan.data.brats import AFFINE_ATOL_MM, match_case_file
from brainscan.errors import (
    BadDimensionsError,
    BrainscanError,
    CorruptFileError,
    DatasetLayoutError,
    EmptyInputError,
    InputTooLargeError,
    InvalidInputError,
    MissingModalityError,
    NonFiniteError,
    UnsupportedFormatError,
)
from brainscan.io.nifti import load_nifti, read_nifti_header, save_nifti
from brainscan.preprocess.align import REFERENCE as ALIGN_REFERENCE
from brainscan.preprocess.align import check_overlap, grid_summary, on_one_grid
from services.segmenter.jobs import STUDY_FILE
from brainscan.labels import (
    BRATS2021,
    BRATS2023,
    BRATS2023_MODALITIES,
    CONVENTION_FILE_NAMES,
    CONVENTION_NAMES,
    MODALITIES,
)

SOURCES = ("files", "zip", "4d", "dicom")
CASE_FIELD = "case"
VOLUME_FIELD = "volume"
DICOM_FIELD = "dicom"
#: the one text field: ``{SeriesInstanceUID: modality}`` as JSON, with ``dicom`` only
SERIES_FIELD = "series"

#: label convention -> {form field: modality} of the four-files upload; the BraTS 2023-2024 field
#: names make the job's mask use that convention (enhancing tumour 3)
MODALITY_FIELDS: dict[str, dict[str, str]] = {BRATS2021: {m: m for m in MODALITIES},
                                              BRATS2023: dict(BRATS2023_MODALITIES)}
UPLOAD_FIELDS = (*MODALITIES, *BRATS2023_MODALITIES, CASE_FIELD, VOLUME_FIELD, DICOM_FIELD)
#: NIfTI data types that hold intensities (complex, RGB and 128-bit types are refused)
INTENSITY_DTYPES = {2: "uint8", 4: "int16", 8: "int32", 16: "float32", 64: "float64", 256: "int8",
                    512: "uint16", 768: "uint32", 1024: "int64", 1280: "uint64"}
_GZIP_MAGIC = b"\x1f\x8b"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_COPY_CHUNK = 1 << 20
#: bytes read from the start of a file (or zip member) to decode its NIfTI header
_HEADER_PEEK = 64 * 1024
#: bytes a stored NIfTI may hold past what its header announces (trailing padding, gzip framing)
_NIFTI_SLACK = 64 * 1024
#: central-directory bytes allowed per zip entry: fixed part, name and extra fields of any real archiver
_MAX_DIRECTORY_ENTRY_BYTES = 4096
_EOCD = struct.Struct("<4s4H2LH")
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_BRATS2023_NAMES = {modality: name for name, modality in BRATS2023_MODALITIES.items()}
_PRINTABLE = re.compile(r"[^\w .()+,-]")


@dataclass(frozen=True)
class IntakeLimits:
    """Caps applied to one upload.

    Attributes:
        max_upload_bytes: largest request body; also caps each staged file, and what the four
            volumes of a case zip may unpack to, together.
        max_voxels: most voxels in one 3D volume (413 above).
        max_dim: longest axis (422 above).
        max_header_bytes: largest NIfTI header plus extensions (``vox_offset``); real files need
            a few KB, and nibabel reads extensions whole, so a lying header must not get further.
        max_zip_members: most entries in a case zip.
        max_study_files: most entries in a DICOM study zip (one file per slice).
    """

    max_upload_bytes: int
    max_voxels: int
    max_dim: int = 512
    max_header_bytes: int = 4 << 20
    max_zip_members: int = 64
    max_study_files: int = 4096

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_voxels", "max_dim", "max_header_bytes", "max_zip_members",
                     "max_study_files"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @property
    def max_volume_bytes(self) -> int:
        """Largest plausible decompressed 3D NIfTI: header, then one float64 volume at the voxel cap."""
        return self.max_header_bytes + self.max_voxels * 8


@dataclass(frozen=True)
class UploadPart:
    """One file field of the multipart form: its field name, client file name and content."""

    field: str
    filename: str
    file: IO[bytes]


@dataclass(frozen=True)
class HeaderInfo:
    """What the first bytes of a NIfTI file say, checked against the limits."""

    shape: tuple[int, ...]
    dtype: str
    vox_offset: int
    gzipped: bool

    @property
    def data_bytes(self) -> int:
        """Decompressed size of the voxel data the header announces."""
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize

    @property
    def file_bytes(self) -> int:
        """Size of the (uncompressed) file the header announces: header, extensions, voxel data."""
        return self.vox_offset + self.data_bytes

    @property
    def max_stored_bytes(self) -> int:
        """Most bytes the file can take as stored (gzip may add a little): beyond that it is not this header's."""
        framing = self.file_bytes // 256 if self.gzipped else 0
        return self.file_bytes + framing + _NIFTI_SLACK


@dataclass
class IntakeResult:
    """A validated upload.

    Attributes:
        files: ``input_<modality>.nii.gz`` -> normalised file in the staging folder.
        meta: ``{"shape", "spacing_mm", "source", "orientation", "filenames", "label_convention"}``
            for the job (``filenames`` keyed by MODALITIES name, whatever the upload's naming), and
            ``alignment`` (``{"needed": True, "reference": "t1ce", "overlap", "grids"}``) for
            modalities on different grids.
    """

    files: dict[str, Path]
    meta: dict[str, Any] = field(default_factory=dict)


def input_file_name(modality: str) -> str:
    """``input_<modality>.nii.gz``, the job file of one modality."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    return f"input_{modality}.nii.gz"


def display_name(filename: str | None, fallback: str) -> str:
    """A client file name made safe for messages and JSON (base name, printable, at most 100 chars)."""
    base = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = _PRINTABLE.sub("_", base)[:100]
    return cleaned or fallback


# -- the form -----------------------------------------------------------------------------------

_ALL_MODALITY_FIELDS = {name for fields in MODALITY_FIELDS.values() for name in fields}
_FIELD_HINT = f"four files {list(MODALITIES)} (or, BraTS 2023-2024 names, {list(BRATS2023_MODALITIES)})"


def files_convention(fields: set[str] | Sequence[str]) -> str:
    """The label convention that the modality field names of a four-files upload use.

    Raises:
        BrainscanError: (400, ``ambiguous_upload``) 2018-2021 and 2023-2024 names mixed.
    """
    used = {convention: [name for name in names if name in fields] for convention, names in MODALITY_FIELDS.items()}
    used = {convention: names for convention, names in used.items() if names}
    if len(used) > 1:
        listed = " and ".join(f"{CONVENTION_NAMES[c]} field names {names}" for c, names in used.items())
        raise BrainscanError(f"the upload mixes {listed}; name the four files either {list(MODALITIES)} or "
                             f"{list(BRATS2023_MODALITIES)}", code="ambiguous_upload")
    return next(iter(used), BRATS2021)


def select_source(parts: Sequence[UploadPart], texts: Sequence[str] = ()) -> str:
    """Decide which of the four upload shapes ``parts`` is, or raise a 400/422.

    Args:
        parts: the file fields of the form, in order.
        texts: names of non-file fields (only ``series``, with ``dicom``; others are refused).

    Returns:
        ``"files"``, ``"zip"``, ``"4d"`` or ``"dicom"``.

    Raises:
        BrainscanError: (400) an unknown or non-file field, or two NIfTI shapes at once (code
            ``ambiguous_upload``, e.g. files and a zip, or 2018-2021 and 2023-2024 field names).
        InvalidInputError: (422 ``duplicate_field``) a field sent more than once, named; (422
            ``ambiguous_upload``) ``dicom`` with NIfTI fields, or ``series`` without ``dicom``.
        EmptyInputError: (400) no field at all.
        MissingModalityError: (422) some but not all of the four modality files.
    """
    other_texts = sorted(set(texts) - {SERIES_FIELD})
    if other_texts:
        raise BrainscanError(f"form fields {other_texts[:6]} must be files; send volumes as file "
                             f"parts named {list(UPLOAD_FIELDS)}", code="invalid_upload")
    names = [part.field for part in parts]
    unknown = sorted({name for name in names if name not in UPLOAD_FIELDS})
    if unknown:
        raise BrainscanError(f"unknown upload field(s) {unknown[:6]}; use {_FIELD_HINT}, "
                             f"'{CASE_FIELD}' (a zip), '{VOLUME_FIELD}' (one 4D NIfTI) or '{DICOM_FIELD}' (a zip of a "
                             "DICOM study)", code="invalid_upload")
    repeated = sorted({name for name in names + list(texts) if (names + list(texts)).count(name) > 1})
    if repeated:
        # which of two files would count is a guess the service must not make
        raise InvalidInputError(f"field(s) {repeated} sent more than once; send each file once", code="duplicate_field")
    given = set(names)
    shapes = [source for source, present in (("files", bool(given & _ALL_MODALITY_FIELDS)),
                                             ("zip", CASE_FIELD in given), ("4d", VOLUME_FIELD in given),
                                             ("dicom", DICOM_FIELD in given)) if present]
    if "dicom" in shapes and len(shapes) > 1:
        raise InvalidInputError(f"the upload mixes a DICOM study ('{DICOM_FIELD}') with NIfTI fields "
                                f"{sorted(given - {DICOM_FIELD})[:6]}; send either the DICOM study alone or the NIfTI "
                                "volumes", code="ambiguous_upload")
    if SERIES_FIELD in texts and shapes != ["dicom"]:
        raise InvalidInputError(f"'{SERIES_FIELD}' maps the series of a DICOM study; send it with '{DICOM_FIELD}' "
                                "(a zip of the study), not with NIfTI volumes", code="ambiguous_upload")
    if not shapes:
        raise EmptyInputError(f"no volumes uploaded; send {_FIELD_HINT}, a zip as '{CASE_FIELD}', one 4D NIfTI "
                              f"as '{VOLUME_FIELD}', or a zip of a DICOM study as '{DICOM_FIELD}'")
    if len(shapes) > 1:
        raise BrainscanError(f"the upload mixes {' and '.join(shapes)}; send exactly one of: {_FIELD_HINT}, "
                             f"a zip as '{CASE_FIELD}', a 4D NIfTI as '{VOLUME_FIELD}'", code="ambiguous_upload")
    if shapes[0] == "files":
        fields = list(MODALITY_FIELDS[files_convention(given)])
        missing = [name for name in fields if name not in given]
        if missing:
            raise MissingModalityError(f"missing modality {', '.join(missing)}: a case needs all of "
                                       f"{fields} (or send them as a zip or one 4D volume)")
    return shapes[0]


def accept_upload(parts: Sequence[UploadPart], staging: Path, limits: IntakeLimits,
                  texts: Mapping[str, str] | Sequence[str] = ()) -> IntakeResult:
    """Validate an upload and write the normalised inputs into ``staging``.

    Args:
        parts: the file fields of the multipart form.
        staging: an empty private folder (e.g. ``JobStore.staging_dir()``).
        limits: the caps.
        texts: the non-file form fields, name -> value (only ``series`` is taken, with ``dicom``).

    Returns:
        the normalised files and the input description of the job.

    Raises:
        BrainscanError subclasses, each with its own status: see the module docstring.
    """
    source = select_source(parts, list(texts))
    by_field = {part.field: part for part in parts}
    if source == "files":
        convention = files_convention(set(by_field))
        field_of = {modality: name for name, modality in MODALITY_FIELDS[convention].items()}
        staged = {m: _stage_stream(by_field[field_of[m]].file, staging / f"{m}.upload", limits, field_of[m])
                  for m in MODALITIES}
        names = {m: display_name(by_field[field_of[m]].filename, field_of[m]) for m in MODALITIES}
    elif source == "zip":
        staged, names, convention = _stage_zip(by_field[CASE_FIELD], staging, limits)
    elif source == "dicom":
        from services.segmenter.dicom_intake import accept_dicom

        series = texts.get(SERIES_FIELD) if isinstance(texts, Mapping) else None
        path = _stage_bounded_zip(by_field[DICOM_FIELD], staging / STUDY_FILE, limits, DICOM_FIELD,
                                  limits.max_study_files, "a DICOM study zip")
        return accept_dicom(path, display_name(by_field[DICOM_FIELD].filename, DICOM_FIELD), series, limits)
    else:
        part = by_field[VOLUME_FIELD]
        path = _stage_stream(part.file, staging / "volume.upload", limits, VOLUME_FIELD)
        return _accept_4d(path, display_name(part.filename, VOLUME_FIELD), staging, limits)
    return _accept_modalities(staged, names, staging, limits, source, convention)


# -- staging ------------------------------------------------------------------------------------


def _stage_stream(stream: IO[bytes], dest: Path, limits: IntakeLimits, what: str, cap: int | None = None,
                  overflow: BrainscanError | None = None) -> Path:
    """Copy ``stream`` to ``dest``, never writing more than ``cap`` bytes (default ``max_upload_bytes``).

    Raises:
        ``overflow`` (default :class:`InputTooLargeError`, 413): the stream runs past ``cap``.
        EmptyInputError: (400) the stream is empty.
    """
    cap = limits.max_upload_bytes if cap is None else cap
    written = 0
    with dest.open("wb") as out:
        while chunk := stream.read(_COPY_CHUNK):
            written += len(chunk)
            if written > cap:
                raise overflow or InputTooLargeError(f"{what} is larger than the limit of {cap} bytes")
            out.write(chunk)
    if written == 0:
        raise EmptyInputError(f"{what} is empty (0 bytes)")
    return dest


def _stage_zip(part: UploadPart, staging: Path, limits: IntakeLimits
               ) -> tuple[dict[str, Path], dict[str, str], str]:
    """Copy the four modality members of a case zip to ``staging/<modality>.upload``.

    Bounded before and while unpacking: what the zip declares is checked before a byte is inflated
    (entry count and directory size from its last bytes, before :mod:`zipfile` parses the
    directory; then each chosen member's size against a 3D volume at the limits, and the four
    together against ``max_upload_bytes``). Next, the first bytes of each member must be a NIfTI
    header within the limits that announces the size the zip declares. Only then is each member
    inflated, and the copy stops at its declared size: a zip that lies about a member's size
    cannot put more than that into staging.

    Returns:
        ``(staged files, display names, label convention of the member names)``, the first two
        keyed by MODALITIES name.

    Raises:
        UnsupportedFormatError: (415) not a zip, or a member that is not NIfTI. CorruptFileError:
            (422) a damaged or encrypted zip, or a member whose header, declared size and content
            disagree. InputTooLargeError: (413) too many members, or members larger than volumes
            within the limits. MissingModalityError: (422) a modality missing or present twice.
            DatasetLayoutError: (422) files of several cases, or of both BraTS namings. The header
            checks of :func:`inspect_header` apply to each member.
    """
    _check_zip(part.file, limits, CASE_FIELD, limits.max_zip_members, "a case zip",
               f"zip the case folder ({CONVENTION_FILE_NAMES[BRATS2021]} or {CONVENTION_FILE_NAMES[BRATS2023]}) "
               "or send the four files")
    try:
        archive = zipfile.ZipFile(part.file)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:  # ValueError: e.g. a name not in UTF-8
        raise CorruptFileError(f"{CASE_FIELD} is a damaged zip file: {exc}") from exc
    except NotImplementedError as exc:
        raise UnsupportedFormatError(f"{CASE_FIELD} uses a zip feature this service cannot read ({exc}); "
                                     "zip the folder again with deflate, without encryption") from exc
    with archive:
        members = archive.infolist()
        if len(members) > limits.max_zip_members:
            raise InputTooLargeError(f"{CASE_FIELD} holds {len(members)} entries; a case zip holds at most "
                                     f"{limits.max_zip_members}")
        found: dict[str, list[zipfile.ZipInfo]] = {}
        cases: dict[str, str] = {}
        conventions: dict[str, list[str]] = {}
        for info in members:
            parts_of_name = info.filename.replace("\\", "/").split("/")
            base = parts_of_name[-1]
            if not base or base.startswith(".") or "__MACOSX" in parts_of_name:  # a folder: its name ends in "/"
                continue
            case_file = match_case_file(base)
            if case_file is None or case_file.kind == "seg":
                continue  # the segmentation and unrelated files are not inputs
            found.setdefault(case_file.kind, []).append(info)
            cases[case_file.kind] = case_file.case_id
            conventions.setdefault(case_file.label_convention, []).append(display_name(base, "?"))
        if len(conventions) > 1:
            listed = " and ".join(f"{CONVENTION_NAMES[c]} names {names[:4]}" for c, names in conventions.items())
            raise DatasetLayoutError(f"the {CASE_FIELD} zip mixes {listed}; zip one case folder whose files are "
                                     f"all named {CONVENTION_FILE_NAMES[BRATS2021]} or all "
                                     f"{CONVENTION_FILE_NAMES[BRATS2023]}")
        convention = next(iter(conventions), BRATS2021)
        missing = [m for m in MODALITIES if m not in found]
        if missing:
            seen = [display_name(i.filename, "?") for i in members if not i.filename.endswith("/")][:8]
            if conventions:
                wanted = [f"{_BRATS2023_NAMES[m]} ({m})" if convention == BRATS2023 else m for m in missing]
                expected = CONVENTION_FILE_NAMES[convention]
            else:
                wanted, expected = missing, f"{CONVENTION_FILE_NAMES[BRATS2021]} or {CONVENTION_FILE_NAMES[BRATS2023]}"
            raise MissingModalityError(f"the {CASE_FIELD} zip has no {', '.join(wanted)} volume (files must be named "
                                       f"{expected}); found {seen}")
        twice = {m: [display_name(i.filename, "?") for i in infos] for m, infos in found.items() if len(infos) > 1}
        if twice:
            raise MissingModalityError(f"{CASE_FIELD} holds several files for {sorted(twice)}: {twice}; keep one each")
        if len({cases[m] for m in MODALITIES}) > 1:
            raise DatasetLayoutError(f"{CASE_FIELD} mixes files of several cases {sorted(set(cases.values()))}; "
                                     "zip one case folder")
        chosen = {m: found[m][0] for m in MODALITIES}
        names = {m: display_name(info.filename, m) for m, info in chosen.items()}
        _check_declared_sizes(chosen, names, limits)
        for modality, info in chosen.items():
            _check_member_header(archive, info, modality, names[modality], limits)
        staged = {m: _unpack_member(archive, info, staging / f"{m}.upload", names[m], limits)
                  for m, info in chosen.items()}
    return staged, names, convention


def _check_zip(stream: IO[bytes], limits: IntakeLimits, what: str, max_members: int, kind: str, hint: str) -> None:
    """Refuse an empty stream (400), one that is not a zip (415, with ``hint``), and a zip that
    declares more than ``max_members`` entries (413, :func:`_check_directory_size`)."""
    head = stream.read(4)
    stream.seek(0)
    if not head:
        raise EmptyInputError(f"{what} is empty (0 bytes)")
    if head not in _ZIP_MAGICS:
        raise UnsupportedFormatError(f"{what} is not a zip file; {hint}")
    _check_directory_size(stream, what, max_members, kind)


def _stage_bounded_zip(part: UploadPart, dest: Path, limits: IntakeLimits, what: str, max_members: int,
                       kind: str) -> Path:
    """Copy an uploaded zip to ``dest`` (at most ``max_upload_bytes``) after the checks of :func:`_check_zip`;
    its members are inflated later, each within the limits of whoever reads them."""
    _check_zip(part.file, limits, what, max_members, kind,
               "zip the study folder (any layout inside) and upload the zip")
    return _stage_stream(part.file, dest, limits, what)


def _check_directory_size(stream: IO[bytes], what: str, max_members: int, kind: str) -> None:
    """Refuse (413) a zip whose end-of-central-directory record (zip64 too) declares more entries,
    or a larger directory, than ``max_members`` entries of ``kind`` can have; :mod:`zipfile` would
    otherwise parse them all (about 10 us an entry, and millions fit in an upload) before a count
    could be checked."""
    stream.seek(0, 2)
    size = stream.tell()
    stream.seek(max(0, size - _EOCD.size - 0xFFFF - _ZIP64_LOCATOR.size - _ZIP64_EOCD.size))
    tail = stream.read()
    stream.seek(0)
    at = tail.rfind(b"PK\x05\x06")  # the record zipfile uses: the last one, before a comment of <= 64 KB
    if at < 0 or len(tail) < at + _EOCD.size:
        return  # no record: zipfile says the zip is damaged
    entries, directory_bytes = _EOCD.unpack_from(tail, at)[4:6]
    locator = at - _ZIP64_LOCATOR.size
    record = locator - _ZIP64_EOCD.size
    if record >= 0 and tail[locator:locator + 4] == b"PK\x06\x07" and tail[record:record + 4] == b"PK\x06\x06":
        entries, directory_bytes = _ZIP64_EOCD.unpack_from(tail, record)[7:9]
    if entries > max_members or directory_bytes > max_members * _MAX_DIRECTORY_ENTRY_BYTES:
        raise InputTooLargeError(f"{what} declares {entries} entries in {directory_bytes} bytes of zip "
                                 f"directory; {kind} holds at most {max_members}")


def _check_declared_sizes(chosen: Mapping[str, zipfile.ZipInfo], names: Mapping[str, str], limits: IntakeLimits
                          ) -> None:
    """Refuse (413), from the zip directory alone, members larger than a 3D volume within the limits,
    and four that together unpack to more than ``max_upload_bytes``."""
    for modality, info in chosen.items():
        if info.file_size > limits.max_volume_bytes:
            raise InputTooLargeError(f"{CASE_FIELD} member {names[modality]} unpacks to {info.file_size} bytes, more "
                                     f"than a volume within the limits can take ({limits.max_volume_bytes})")
    total = sum(info.file_size for info in chosen.values())
    if total > limits.max_upload_bytes:
        raise InputTooLargeError(f"the four volumes in {CASE_FIELD} unpack to {total} bytes, more than the limit of "
                                 f"{limits.max_upload_bytes}; zip .nii.gz files, or send them as four files")


@contextmanager
def _open_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, name: str) -> Iterator[IO[bytes]]:
    """``archive.open(info)``, with zip failures as 415 / 422 naming the member by ``name``."""
    if info.flag_bits & 0x1:
        raise CorruptFileError(f"{CASE_FIELD} member {name} is encrypted; zip without a password")
    try:
        with archive.open(info) as member:
            yield member
    except BrainscanError:
        raise  # the caller's own verdict on the content
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as exc:  # ValueError: e.g. a negative offset
        raise CorruptFileError(f"{CASE_FIELD} member {name} is damaged: {exc}") from exc
    except NotImplementedError as exc:
        raise UnsupportedFormatError(f"{CASE_FIELD} member {name} uses an unsupported compression: "
                                     f"{exc}; use deflate") from exc


def _check_member_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo, modality: str, name: str,
                         limits: IntakeLimits) -> None:
    """Decode a member's NIfTI header from its first inflated bytes: within the limits, a 3D volume,
    and announcing the size the zip declares (422 otherwise)."""
    with _open_member(archive, info, name) as member:
        head = member.read(_HEADER_PEEK)
    header = header_from_bytes(head, name, limits, size=info.file_size)
    check_modality_shape(header, modality, name)
    if info.file_size > header.max_stored_bytes:
        raise CorruptFileError(f"{CASE_FIELD} member {name} unpacks to {info.file_size} bytes, but its NIfTI header "
                               f"announces {header.file_bytes}; the zip or the header is wrong")


def _unpack_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, dest: Path, name: str,
                   limits: IntakeLimits) -> Path:
    """Inflate a member into ``dest``, writing at most the size its zip header declares (422 past it)."""
    # zipfile stops silently at the declared size; one byte more shows a member that goes on
    probe = copy.copy(info)
    probe.file_size = info.file_size + 1
    overflow = CorruptFileError(f"{CASE_FIELD} member {name} unpacks to more than the {info.file_size} bytes "
                                "its zip header declares")
    with _open_member(archive, probe, name) as member:
        return _stage_stream(member, dest, limits, name, cap=info.file_size, overflow=overflow)


# -- headers ------------------------------------------------------------------------------------


def inspect_header(path: Path, name: str, limits: IntakeLimits) -> HeaderInfo:
    """Read what a NIfTI file's header announces, inflating at most a few KB.

    Args:
        path: the staged file (``.nii`` or ``.nii.gz``, decided by content).
        name: the file's name in messages.
        limits: the caps.

    Returns:
        the announced shape (1 to 7 axes), data type, data offset and compression.

    Raises:
        the errors of :func:`header_from_bytes`.
    """
    with path.open("rb") as handle:
        raw = handle.read(_HEADER_PEEK)
    return header_from_bytes(raw, name, limits, size=path.stat().st_size)


def header_from_bytes(raw: bytes, name: str, limits: IntakeLimits, size: int | None = None) -> HeaderInfo:
    """What the first bytes of a NIfTI file (``.nii`` or ``.nii.gz``, by content) announce, checked
    against the limits; at most one header is inflated from gzip.

    Args:
        raw: the first bytes of the file (a few KB are plenty, gzipped or not).
        name: the file's name in messages.
        limits: the caps.
        size: the whole file's size, when known: an uncompressed file shorter than its header
            announces is refused.

    Returns:
        the announced shape (1 to 7 axes), data type, data offset and compression.

    Raises:
        EmptyInputError: (400) no bytes. UnsupportedFormatError: (415) not NIfTI, a ``.hdr/.img``
            pair, or a non-intensity data type. CorruptFileError: (422) truncated or inconsistent.
        BadDimensionsError: (422) fewer than 3 or more than 4 axes, an empty or absurd axis.
        InputTooLargeError: (413) more voxels than ``limits.max_voxels``.
    """
    if not raw:
        raise EmptyInputError(f"{name} is empty (0 bytes)")
    gzipped = raw[:2] == _GZIP_MAGIC
    head = raw
    if gzipped:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            head = inflater.decompress(raw, 540)  # at most one NIfTI-2 header, whatever the ratio
        except zlib.error as exc:
            raise CorruptFileError(f"{name} is gzip data that cannot be decompressed: {exc}") from exc
        if len(head) < 348:
            raise CorruptFileError(f"{name} is a truncated gzip file: it ends before the NIfTI header does")
    info = replace(_parse_header_prefix(head, name), gzipped=gzipped)
    shape = info.shape
    if len(shape) < 3:
        raise BadDimensionsError(f"{name} is {len(shape)}D {shape}; upload 3D volumes (one per modality)")
    if len(shape) > 4:
        raise BadDimensionsError(f"{name} is {len(shape)}D {shape}; upload 3D volumes, or one 4D volume "
                                 f"(X, Y, Z, {len(MODALITIES)})")
    if min(shape) < 1:
        raise BadDimensionsError(f"{name} has an empty axis {shape}")
    if max(shape[:3]) > limits.max_dim:
        raise BadDimensionsError(f"{name} has shape {shape}; axes longer than {limits.max_dim} voxels are not "
                                 "brain MRI this service can segment")
    voxels = int(np.prod(shape[:3]))
    if voxels > limits.max_voxels:
        raise InputTooLargeError(f"{name} has {voxels} voxels {shape}, more than the limit of {limits.max_voxels}")
    if info.vox_offset > limits.max_header_bytes:
        raise CorruptFileError(f"{name} claims its voxel data starts at byte {info.vox_offset}; a NIfTI header "
                               f"with extensions is at most {limits.max_header_bytes} bytes here")
    if not gzipped and size is not None and size < info.file_bytes:
        raise CorruptFileError(f"{name} is truncated: {size} bytes, but its header announces {info.file_bytes}")
    return info


def check_modality_shape(info: HeaderInfo, modality: str, name: str) -> None:
    """Refuse (422) a modality file that is not one 3D volume (a trailing axis of 1 is allowed)."""
    if len(info.shape) == 4 and info.shape[3] != 1:
        raise BadDimensionsError(f"{modality} ({name}) is 4D {info.shape}; each modality must be a 3D volume "
                                 f"(send a 4D (X, Y, Z, {len(MODALITIES)}) stack as '{VOLUME_FIELD}')")


def _parse_header_prefix(head: bytes, name: str) -> HeaderInfo:
    """Decode sizeof_hdr, magic, dim, datatype, bitpix and vox_offset of NIfTI-1 or NIfTI-2 bytes."""
    not_nifti = UnsupportedFormatError(f"{name} is not a NIfTI file (.nii or .nii.gz); upload NIfTI volumes, "
                                       "not DICOM, images or archives")
    if len(head) < 4:
        raise not_nifti
    for order in ("<", ">"):
        size = struct.unpack(order + "i", head[:4])[0]
        if size in (348, 540):
            break
    else:
        raise not_nifti
    if len(head) < size:
        raise CorruptFileError(f"{name} is too short to hold a NIfTI header ({len(head)} of {size} bytes)")
    if size == 348:
        magic = head[344:348]
        dims = struct.unpack(order + "8h", head[40:56])
        datatype, bitpix = struct.unpack(order + "2h", head[70:74])
        vox_offset = struct.unpack(order + "f", head[108:112])[0]
        pair, single = b"ni1\x00", b"n+1\x00"
    else:
        magic = head[4:8]
        datatype, bitpix = struct.unpack(order + "2h", head[12:16])
        dims = struct.unpack(order + "8q", head[16:80])
        vox_offset = struct.unpack(order + "q", head[168:176])[0]
        pair, single = b"ni2\x00", b"n+2\x00"
    if magic == pair:
        raise UnsupportedFormatError(f"{name} is the header of a .hdr/.img pair; convert it to a single .nii file")
    if magic != single:
        raise not_nifti
    ndim = dims[0]
    if not 1 <= ndim <= 7:
        raise CorruptFileError(f"{name} has an invalid dimension count {ndim} in its header")
    if datatype not in INTENSITY_DTYPES:
        raise UnsupportedFormatError(f"{name} stores voxels as NIfTI data type {datatype} (complex, RGB or "
                                     f"unknown); upload intensities as integers or floats", code="unsupported_dtype")
    dtype = INTENSITY_DTYPES[datatype]
    if bitpix != np.dtype(dtype).itemsize * 8:
        raise CorruptFileError(f"{name} header is inconsistent: data type {dtype} with bitpix {bitpix}")
    if not np.isfinite(vox_offset) or vox_offset < 0:
        raise CorruptFileError(f"{name} header has an invalid data offset {vox_offset}")
    # nibabel reads the data at vox_offset, but never inside the header itself
    offset = max(int(vox_offset), size + 4 if size == 348 else size)
    return HeaderInfo(shape=tuple(int(d) for d in dims[1:ndim + 1]), dtype=dtype, vox_offset=offset, gzipped=False)


# -- the case -----------------------------------------------------------------------------------


def _header_geometry(path: Path, name: str, limits: IntakeLimits) -> tuple[tuple[int, ...], np.ndarray, tuple[float, ...]]:
    """Shape, affine and spacing from nibabel's header parse (after :func:`inspect_header`)."""
    header = read_nifti_header(path, max_voxels=limits.max_voxels, name=name)
    shape = tuple(int(s) for s in header.get_data_shape())
    spacing = tuple(float(z) for z in header.get_zooms()[:3])
    if not all(np.isfinite(spacing)) or min(spacing) <= 0:
        raise BadDimensionsError(f"{name} has an invalid voxel size {spacing} mm; it must be positive")
    return shape, np.asarray(header.get_best_affine(), dtype=np.float64), spacing


def _accept_modalities(staged: Mapping[str, Path], names: Mapping[str, str], staging: Path,
                       limits: IntakeLimits, source: str, convention: str) -> IntakeResult:
    geometry = {}
    for modality in MODALITIES:
        name = names[modality]
        check_modality_shape(inspect_header(staged[modality], name, limits), modality, name)
        geometry[modality] = _header_geometry(staged[modality], name, limits)
    grids = {m: (g[0][:3], g[1]) for m, g in geometry.items()}
    # not on one grid: t1, t2 and flair are aligned to t1ce by the worker, if they lie on its anatomy
    aligned = not on_one_grid(grids, AFFINE_ATOL_MM)
    overlap = check_overlap(grids, names) if aligned else None
    files = {}
    for modality in MODALITIES:
        volume = load_nifti(staged[modality], max_voxels=limits.max_voxels, name=names[modality])
        data = volume.data[..., 0] if volume.data.ndim == 4 else volume.data
        files[input_file_name(modality)] = _write_input(data, volume.affine, volume.header, modality,
                                                        names[modality], staging)
        del volume, data
        staged[modality].unlink()
    shape, affine, spacing = geometry[ALIGN_REFERENCE if aligned else "flair"]
    meta = _meta(shape[:3], spacing, affine, source, dict(names), convention)
    if aligned:  # shape, spacing_mm and orientation above are the t1ce grid's: the mask's
        meta["alignment"] = {"needed": True, "reference": ALIGN_REFERENCE, "overlap": overlap,
                             "grids": {m: grid_summary(*grids[m]) for m in MODALITIES}}
    return IntakeResult(files=files, meta=meta)


def _accept_4d(path: Path, name: str, staging: Path, limits: IntakeLimits) -> IntakeResult:
    info = inspect_header(path, name, limits)
    if len(info.shape) != 4 or info.shape[3] != len(MODALITIES):
        raise BadDimensionsError(f"{VOLUME_FIELD} ({name}) has shape {info.shape}; a 4D upload must be "
                                 f"(X, Y, Z, {len(MODALITIES)}) with channels in the order {list(MODALITIES)}")
    shape, affine, spacing = _header_geometry(path, name, limits)
    volume = load_nifti(path, max_voxels=limits.max_voxels, name=name)
    files = {}
    for channel, modality in enumerate(MODALITIES):
        files[input_file_name(modality)] = _write_input(volume.data[..., channel], volume.affine, volume.header,
                                                        modality, f"{name} channel {channel} ({modality})", staging)
    del volume
    path.unlink()
    return IntakeResult(files=files, meta=_meta(shape[:3], spacing, affine, "4d", {VOLUME_FIELD: name}, BRATS2021))


def _write_input(data: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header, modality: str, name: str,
                 staging: Path) -> Path:
    """Check one modality's voxels and write it as ``input_<modality>.nii.gz`` in ``staging``."""
    if data.dtype.kind == "f":
        finite = np.isfinite(data)
        if not finite.all():
            bad = int(data.size - np.count_nonzero(finite))
            raise NonFiniteError(f"{modality} ({name}) holds {bad} NaN or infinite voxel(s); replace them "
                                 "(e.g. with 0) before uploading")
        if data.dtype == np.float64:
            data = data.astype(np.float32)  # MRI intensities need no double precision; half the storage
    return save_nifti(data, staging / input_file_name(modality), affine=affine, header=header, dtype=data.dtype)


def _meta(shape: Sequence[int], spacing: Sequence[float], affine: np.ndarray, source: str,
          filenames: dict[str, str], convention: str) -> dict[str, Any]:
    return {
        "shape": [int(s) for s in shape],
        "spacing_mm": [round(float(s), 6) for s in spacing],
        "source": source,
        "orientation": "".join(nib.aff2axcodes(affine)),
        "filenames": filenames,
        "label_convention": convention,
    }

