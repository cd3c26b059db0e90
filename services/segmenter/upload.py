"""The vocabulary of a segmentation upload: its form fields, its caps, its parts and the validated result.

Shared by :mod:`services.segmenter.intake` (the upload orchestration), :mod:`~services.segmenter.headers`
(NIfTI header checks), :mod:`~services.segmenter.archive` (bounded staging and zips) and
:mod:`~services.segmenter.dicom_intake`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from brainscan.labels import BRATS2021, BRATS2023, BRATS2023_MODALITIES, MODALITIES

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
