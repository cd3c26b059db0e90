"""NIfTI header checks of a segmentation upload, from a few KB of (decompressed) bytes.

The header is decoded by :func:`brainscan.io.nifti.peek_header` (the one binary NIfTI header
reader); here what it announces is held to the upload's limits (:class:`IntakeLimits`): 3D (or 4D),
each axis at most ``max_dim``, at most ``max_voxels`` voxels, a plausible header size, and a file
not shorter than announced. The decompressed size is therefore known and capped from the header
alone, before nibabel or any inflation of the voxel data.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from brainscan.errors import BadDimensionsError, CorruptFileError, InputTooLargeError
from brainscan.io.nifti import HeaderInfo, peek_header
from brainscan.labels import MODALITIES
from services.segmenter.upload import VOLUME_FIELD, IntakeLimits

#: bytes read from the start of a file (or zip member) to decode its NIfTI header
HEADER_PEEK = 64 * 1024


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
        raw = handle.read(HEADER_PEEK)
    return header_from_bytes(raw, name, limits, size=path.stat().st_size)


def header_from_bytes(raw: bytes, name: str, limits: IntakeLimits, size: int | None = None) -> HeaderInfo:
    """What the first bytes of a NIfTI file (``.nii`` or ``.nii.gz``, by content) announce
    (:func:`brainscan.io.nifti.peek_header`), checked against the limits; at most one header is
    inflated from gzip.

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
    info = peek_header(raw, name)
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
    if not info.gzipped and size is not None and size < info.file_bytes:
        raise CorruptFileError(f"{name} is truncated: {size} bytes, but its header announces {info.file_bytes}")
    return info


def check_modality_shape(info: HeaderInfo, modality: str, name: str) -> None:
    """Refuse (422) a modality file that is not one 3D volume (a trailing axis of 1 is allowed)."""
    if len(info.shape) == 4 and info.shape[3] != 1:
        raise BadDimensionsError(f"{modality} ({name}) is 4D {info.shape}; each modality must be a 3D volume "
                                 f"(send a 4D (X, Y, Z, {len(MODALITIES)}) stack as '{VOLUME_FIELD}')")
