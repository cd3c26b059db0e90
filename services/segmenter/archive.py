"""Bounded staging of uploaded files and zips (a case folder, or a DICOM study).

Nothing here trusts what a client sends: a stream is copied at most up to its cap; a zip is refused
before :mod:`zipfile` parses it when its last bytes declare too many entries; the members of a case
zip are chosen by base name only (never used as paths), their declared sizes are checked against
volumes within the limits, their NIfTI headers against those sizes, and each is inflated up to its
declared size and no further (:func:`stage_zip`).
"""

from __future__ import annotations

import copy
import struct
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from brainscan.data.brats import match_case_file
from brainscan.errors import (
    BrainscanError,
    CorruptFileError,
    DatasetLayoutError,
    EmptyInputError,
    InputTooLargeError,
    MissingModalityError,
    UnsupportedFormatError,
)
from brainscan.labels import (
    BRATS2021,
    BRATS2023,
    BRATS2023_MODALITIES,
    CONVENTION_FILE_NAMES,
    CONVENTION_NAMES,
    MODALITIES,
)
from services.segmenter.headers import HEADER_PEEK, check_modality_shape, header_from_bytes
from services.segmenter.upload import CASE_FIELD, IntakeLimits, UploadPart, display_name

_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_COPY_CHUNK = 1 << 20
#: central-directory bytes allowed per zip entry: fixed part, name and extra fields of any real archiver
_MAX_DIRECTORY_ENTRY_BYTES = 4096
_EOCD = struct.Struct("<4s4H2LH")
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_BRATS2023_NAMES = {modality: name for name, modality in BRATS2023_MODALITIES.items()}


def stage_stream(stream: IO[bytes], dest: Path, limits: IntakeLimits, what: str, cap: int | None = None,
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


def stage_zip(part: UploadPart, staging: Path, limits: IntakeLimits
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


def stage_bounded_zip(part: UploadPart, dest: Path, limits: IntakeLimits, what: str, max_members: int,
                       kind: str) -> Path:
    """Copy an uploaded zip to ``dest`` (at most ``max_upload_bytes``) after the checks of :func:`_check_zip`;
    its members are inflated later, each within the limits of whoever reads them."""
    _check_zip(part.file, limits, what, max_members, kind,
               "zip the study folder (any layout inside) and upload the zip")
    return stage_stream(part.file, dest, limits, what)


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
        head = member.read(HEADER_PEEK)
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
        return stage_stream(member, dest, limits, name, cap=info.file_size, overflow=overflow)
