"""NIfTI reading and writing that keeps the input's grid, affine and header.

Volumes stay in the voxel order of the file they came from: a mask written with
:func:`save_like` therefore lands voxel for voxel on the input grid, and viewers (ITK-SNAP,
3D Slicer) open it aligned. Code that needs a fixed orientation (e.g. a network trained on RAS
data) goes through :func:`to_ras` and back through :func:`from_ras`, which are exact inverses.

Example:
    >>> vol = load_nifti("case/BraTS2021_00006_flair.nii.gz")
    >>> vol.shape, vol.spacing
    ((240, 240, 155), (1.0, 1.0, 1.0))
    >>> save_like(mask, vol, "mask.nii.gz")
"""

from __future__ import annotations

import gzip
import io
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

from brainscan.errors import (
    BadDimensionsError,
    CorruptFileError,
    EmptyInputError,
    InputTooLargeError,
    UnsupportedFormatError,
)

#: Default cap on voxels per volume: 512^3 covers any clinical brain MRI with room to spare.
DEFAULT_MAX_VOXELS = 512**3
_GZIP_MAGIC = b"\x1f\x8b"
_RAS = np.array([[0, 1], [1, 1], [2, 1]])


@dataclass
class Volume:
    """One 3D image as stored on disk.

    Attributes:
        data: array in the file's voxel order, shape ``(X, Y, Z)`` (or ``(X, Y, Z, C)`` for 4D).
        affine: 4x4 voxel-to-world matrix (the header's best affine).
        header: the NIfTI header, kept so that written masks carry the same geometry.
        path: where it was read from, if a file.
    """

    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header
    path: Path | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.data.shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in millimetres along the three spatial axes."""
        zooms = self.header.get_zooms()[:3]
        return tuple(float(z) for z in zooms)  # type: ignore[return-value]

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (mm^3 / 1000)."""
        return float(np.prod(self.spacing)) / 1000.0


def _sniff(raw_head: bytes, name: str) -> None:
    """Reject content that is not NIfTI-1/2 (optionally gzipped) before nibabel sees it."""
    if not raw_head:
        raise EmptyInputError(f"{name} is empty (0 bytes)")
    head = raw_head
    if raw_head[:2] == _GZIP_MAGIC:
        try:
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(raw_head, 600)
        except zlib.error as exc:
            raise CorruptFileError(f"{name} is gzip data that cannot be decompressed: {exc}") from exc
    if len(head) < 348:
        raise CorruptFileError(f"{name} is too short to hold a NIfTI header ({len(head)} bytes)")
    magic1 = head[344:348]
    magic2 = head[4:8]
    if magic1 not in (b"n+1\x00", b"ni1\x00") and magic2 not in (b"n+2\x00", b"ni2\x00"):
        raise UnsupportedFormatError(
            f"{name} is not a NIfTI file (.nii or .nii.gz); upload NIfTI volumes, not DICOM or images"
        )


def _check_size(img: nib.Nifti1Image, name: str, max_voxels: int) -> None:
    shape = img.header.get_data_shape()
    if len(shape) not in (3, 4):
        raise BadDimensionsError(f"{name} has {len(shape)} dimensions {tuple(shape)}; expected a 3D volume")
    if any(int(s) < 1 for s in shape):
        raise BadDimensionsError(f"{name} has an empty dimension {tuple(shape)}")
    voxels = int(np.prod([int(s) for s in shape[:3]]))
    if voxels > max_voxels:
        raise InputTooLargeError(
            f"{name} has {voxels} voxels per volume {tuple(shape)}, more than the limit of {max_voxels}"
        )


def _read(img: nib.Nifti1Image, name: str, dtype: np.dtype | type | None) -> np.ndarray:
    try:
        data = np.asanyarray(img.dataobj)
    except (EOFError, OSError, zlib.error, ValueError, gzip.BadGzipFile) as exc:
        raise CorruptFileError(f"{name} is truncated or damaged: {exc}") from exc
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    return np.asarray(data)


def load_nifti(
    path: str | Path, *, dtype: np.dtype | type | None = None, max_voxels: int = DEFAULT_MAX_VOXELS
) -> Volume:
    """Read a ``.nii`` or ``.nii.gz`` file.

    Args:
        path: the file. Its format is decided by content, not by extension.
        dtype: cast the data to this dtype (``None`` keeps the scaled on-disk values).
        max_voxels: refuse volumes with more voxels than this (checked from the header, before
            any data is decompressed, so a gzip bomb never expands).

    Returns:
        The :class:`Volume`, in the file's voxel order.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        EmptyInputError, UnsupportedFormatError, CorruptFileError, BadDimensionsError,
        InputTooLargeError: for the respective kind of bad file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    with path.open("rb") as fh:
        _sniff(fh.read(4096), path.name)
    try:
        img = nib.load(str(path)) if path.suffix in (".nii", ".gz") else _load_from_bytes(path.read_bytes())
    except Exception as exc:  # nibabel raises a zoo of types for bad headers
        raise CorruptFileError(f"{path.name} has an unreadable NIfTI header: {exc}") from exc
    _check_size(img, path.name, max_voxels)
    data = _read(img, path.name, dtype)
    return Volume(data=data, affine=np.asarray(img.affine, dtype=np.float64), header=img.header, path=path)


def _load_from_bytes(raw: bytes) -> nib.Nifti1Image:
    if raw[:2] == _GZIP_MAGIC:
        fileobj: io.IOBase = gzip.GzipFile(fileobj=io.BytesIO(raw))
    else:
        fileobj = io.BytesIO(raw)
    fh = nib.FileHolder(fileobj=fileobj)
    return nib.Nifti1Image.from_file_map({"header": fh, "image": fh})


def load_nifti_bytes(
    raw: bytes,
    *,
    name: str = "upload",
    dtype: np.dtype | type | None = None,
    max_voxels: int = DEFAULT_MAX_VOXELS,
) -> Volume:
    """Like :func:`load_nifti` for bytes in memory (an upload). ``name`` is used in messages only."""
    _sniff(raw[:4096], name)
    try:
        img = _load_from_bytes(raw)
    except Exception as exc:
        raise CorruptFileError(f"{name} has an unreadable NIfTI header: {exc}") from exc
    _check_size(img, name, max_voxels)
    data = _read(img, name, dtype)
    return Volume(data=data, affine=np.asarray(img.affine, dtype=np.float64), header=img.header)


def save_nifti(
    data: np.ndarray,
    path: str | Path,
    *,
    affine: np.ndarray,
    header: nib.Nifti1Header | None = None,
    dtype: np.dtype | type | None = None,
) -> Path:
    """Write ``data`` as NIfTI-1 (gzipped if ``path`` ends in ``.gz``).

    Args:
        data: array ``(X, Y, Z)`` or ``(X, Y, Z, C)``.
        path: output file.
        affine: 4x4 voxel-to-world matrix; written to both qform and sform.
        header: a header to copy geometry and units from (its data type is replaced).
        dtype: on-disk data type; defaults to ``data.dtype``.

    Returns:
        ``path`` as a :class:`Path`.
    """
    path = Path(path)
    dtype = np.dtype(dtype or data.dtype)
    hdr = header.copy() if header is not None else None
    img = nib.Nifti1Image(np.asarray(data).astype(dtype, copy=False), np.asarray(affine), header=hdr)
    img.set_data_dtype(dtype)
    # Labels and intensities are stored as they are: no scaling on write.
    img.header.set_slope_inter(1.0, 0.0)
    img.set_qform(np.asarray(affine), code=int(hdr["qform_code"]) if hdr is not None and hdr["qform_code"] > 0 else 1)
    img.set_sform(np.asarray(affine), code=int(hdr["sform_code"]) if hdr is not None and hdr["sform_code"] > 0 else 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def save_like(data: np.ndarray, reference: Volume, path: str | Path, *, dtype: np.dtype | type = np.uint8) -> Path:
    """Write ``data`` (e.g. a mask) on the grid of ``reference``: same shape, affine and header geometry.

    Raises:
        BadDimensionsError: if ``data`` does not have the reference's spatial shape.
    """
    if tuple(data.shape[:3]) != tuple(reference.shape[:3]):
        raise BadDimensionsError(
            f"array shape {tuple(data.shape)} does not match the reference grid {reference.shape[:3]}"
        )
    return save_nifti(data, path, affine=reference.affine, header=reference.header, dtype=dtype)


@dataclass(frozen=True)
class Orientation:
    """How a volume was turned into RAS+ voxel order, so that :func:`from_ras` can undo it."""

    to_ras: np.ndarray  # nibabel ornt transform, file axes -> RAS
    shape: tuple[int, ...]  # spatial shape in the file's voxel order
    affine: np.ndarray  # the file's affine


def to_ras(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, Orientation]:
    """Reorder voxel axes (flips and transposes only, no resampling) to RAS+.

    Args:
        data: ``(X, Y, Z)`` or ``(X, Y, Z, C)`` in the file's voxel order.
        affine: the file's 4x4 affine.

    Returns:
        ``(data_ras, affine_ras, orientation)``; :func:`from_ras` with ``orientation`` inverts it exactly.
    """
    current = io_orientation(affine)
    transform = ornt_transform(current, _RAS)
    data_ras = apply_orientation(data, transform)
    affine_ras = affine @ inv_ornt_aff(transform, data.shape[:3])
    return data_ras, affine_ras, Orientation(to_ras=transform, shape=tuple(data.shape[:3]), affine=affine)


def from_ras(data_ras: np.ndarray, orientation: Orientation) -> np.ndarray:
    """Invert :func:`to_ras`: put a RAS-ordered array back into the file's voxel order."""
    inverse = ornt_transform(_RAS, io_orientation(orientation.affine))
    data = apply_orientation(data_ras, inverse)
    if tuple(data.shape[:3]) != orientation.shape:
        raise BadDimensionsError(f"array of shape {data.shape} does not fit the original grid {orientation.shape}")
    return data
