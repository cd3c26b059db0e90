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
4. the voxel data, two modalities at a time (:data:`INTAKE_THREADS`; gzip decoding and encoding
   release the GIL): finite (422 ``non_finite``, naming the first bad modality in MODALITIES order),
   then written normalised as ``input_<modality>.nii.gz`` (NIfTI-1, gzip, no intensity scaling) with
   the upload's affine and header geometry, through :func:`brainscan.io.nifti.save_nifti`.

Zip members are never used as paths: only their base names are matched to modalities (BraTS
naming ``<case>_<modality>.nii[.gz]``, or BraTS 2023-2024 ``<case>-{t1n,t1c,t2w,t2f}.nii.gz``;
``seg`` and other files are ignored), and each is inflated to a staging file named after its
modality. A zip bomb is refused before it is inflated: the sizes the zip declares must fit a 3D
volume within the limits, all four together ``max_upload_bytes``, and the NIfTI header at the start
of each member must announce the size its zip header declares; inflation then stops at that size,
so a zip header that lies cannot put more into staging (:func:`services.segmenter.archive.stage_zip`).

The naming of the upload decides the label convention of the job's mask, recorded as
``meta["label_convention"]``: ``"brats2023"`` (enhancing tumour 3) for 2023-2024 field or member
names, ``"brats2021"`` (enhancing tumour 4) otherwise, 4D volumes included. Stored inputs are
always ``input_<modality>.nii.gz`` with the :data:`~brainscan.labels.MODALITIES` names.

Layout: the form's vocabulary and caps are :mod:`services.segmenter.upload`; header checks
:mod:`~services.segmenter.headers` (over :func:`brainscan.io.nifti.peek_header`); bounded staging and
zips :mod:`~services.segmenter.archive`; this module decides the upload's shape and writes the inputs.

Example:
    >>> limits = IntakeLimits(max_upload_bytes=512 << 20, max_voxels=2**25)
    >>> with store.staging_dir() as staging:
    ...     intake = accept_upload(parts, staging, limits)    # raises BrainscanError subclasses
    ...     job_id = store.create(owner, model, intake.meta, files=intake.files)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from brainscan.data.brats import AFFINE_ATOL_MM
from brainscan.errors import (
    BadDimensionsError,
    BrainscanError,
    EmptyInputError,
    InvalidInputError,
    MissingModalityError,
    NonFiniteError,
)
from brainscan.io.nifti import HeaderInfo, load_nifti, read_nifti_header, save_nifti
from brainscan.io.parallel import in_threads
from brainscan.labels import BRATS2021, BRATS2023_MODALITIES, CONVENTION_NAMES, MODALITIES
from brainscan.preprocess.align import REFERENCE as ALIGN_REFERENCE
from brainscan.preprocess.align import check_overlap, grid_summary, on_one_grid
from services.segmenter.archive import stage_bounded_zip, stage_stream, stage_zip
from services.segmenter.headers import check_modality_shape, header_from_bytes, inspect_header
from services.segmenter.jobs import STUDY_FILE
from services.segmenter.upload import (
    CASE_FIELD,
    DICOM_FIELD,
    MODALITY_FIELDS,
    SERIES_FIELD,
    SOURCES,
    UPLOAD_FIELDS,
    VOLUME_FIELD,
    IntakeLimits,
    IntakeResult,
    UploadPart,
    display_name,
    input_file_name,
)

#: what this module offered before it was split into upload, headers and archive (callers import them here)
__all__ = ["CASE_FIELD", "DICOM_FIELD", "MODALITY_FIELDS", "SERIES_FIELD", "SOURCES", "UPLOAD_FIELDS", "VOLUME_FIELD",
           "HeaderInfo", "IntakeLimits", "IntakeResult", "UploadPart", "accept_upload", "check_modality_shape",
           "display_name", "files_convention", "header_from_bytes", "inspect_header", "input_file_name",
           "select_source"]


#: modalities decoded, checked and re-encoded at once during intake: two volumes in memory at most
INTAKE_THREADS = 2

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
        staged = {m: stage_stream(by_field[field_of[m]].file, staging / f"{m}.upload", limits, field_of[m])
                  for m in MODALITIES}
        names = {m: display_name(by_field[field_of[m]].filename, field_of[m]) for m in MODALITIES}
    elif source == "zip":
        staged, names, convention = stage_zip(by_field[CASE_FIELD], staging, limits)
    elif source == "dicom":
        from services.segmenter.dicom_intake import accept_dicom

        series = texts.get(SERIES_FIELD) if isinstance(texts, Mapping) else None
        path = stage_bounded_zip(by_field[DICOM_FIELD], staging / STUDY_FILE, limits, DICOM_FIELD,
                                  limits.max_study_files, "a DICOM study zip")
        return accept_dicom(path, display_name(by_field[DICOM_FIELD].filename, DICOM_FIELD), series, limits)
    else:
        part = by_field[VOLUME_FIELD]
        path = stage_stream(part.file, staging / "volume.upload", limits, VOLUME_FIELD)
        return _accept_4d(path, display_name(part.filename, VOLUME_FIELD), staging, limits)
    return _accept_modalities(staged, names, staging, limits, source, convention)


def _header_geometry(path: Path, name: str, limits: IntakeLimits
                     ) -> tuple[tuple[int, ...], np.ndarray, tuple[float, ...]]:
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

    def normalise(modality: str) -> Path:
        volume = load_nifti(staged[modality], max_voxels=limits.max_voxels, name=names[modality])
        data = volume.data[..., 0] if volume.data.ndim == 4 else volume.data
        written = _write_input(data, volume.affine, volume.header, modality, names[modality], staging)
        staged[modality].unlink()
        return written

    # INTAKE_THREADS modalities at a time; a bad one raises after the others are done, the first in order
    written = in_threads(normalise, list(MODALITIES), max_workers=INTAKE_THREADS)
    files = {input_file_name(m): path for m, path in zip(MODALITIES, written)}
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
