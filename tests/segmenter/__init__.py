"""Tests of services/segmenter, and the small NIfTI / zip / model-store builders they share."""

from __future__ import annotations

import functools
import gzip
import io
import struct
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from brainscan.labels import BRATS2023_MODALITIES, MODALITIES

#: an oblique-free LPS grid with anisotropic voxels, like many clinical series
LPS_AFFINE = np.array([[-1.0, 0, 0, 90.0], [0, -1.2, 0, 110.0], [0, 0, 1.5, -60.0], [0, 0, 0, 1]])
SMALL_SHAPE = (20, 18, 12)


def nifti_bytes(data: np.ndarray, affine: np.ndarray = LPS_AFFINE, *, gz: bool = True,
                dtype: np.dtype | type | None = None) -> bytes:
    """``data`` as the bytes of a ``.nii.gz`` (or ``.nii``) file."""
    array = np.asarray(data)
    img = nib.Nifti1Image(array.astype(dtype or array.dtype), affine)
    img.header.set_xyzt_units("mm")
    raw = img.to_bytes()
    return gzip.compress(raw, compresslevel=1) if gz else raw


def modality_volume(modality: str, shape: Sequence[int] = SMALL_SHAPE, seed: int = 0) -> np.ndarray:
    """A brain-like int16 volume: zero background, a noisy ellipsoid whose level depends on the modality."""
    rng = np.random.default_rng([seed, MODALITIES.index(modality)])
    grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    inside = sum(g**2 for g in grid) < 0.8
    level = 100 * (MODALITIES.index(modality) + 1)
    return np.where(inside, level + rng.normal(0, 10, shape), 0).astype(np.int16)


def case_files(shape: Sequence[int] = SMALL_SHAPE, affine: np.ndarray = LPS_AFFINE, *, gz: bool = True,
               seed: int = 0) -> dict[str, bytes]:
    """modality -> NIfTI bytes of one consistent case."""
    return {m: nifti_bytes(modality_volume(m, shape, seed), affine, gz=gz) for m in MODALITIES}


def case_zip(members: Mapping[str, bytes], *, compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    """A zip holding ``members`` (name -> bytes), names used verbatim (``../`` included)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=compression) as archive:
        for name, data in members.items():
            archive.writestr(zipfile.ZipInfo(name), data, compress_type=compression)
    return buffer.getvalue()


@functools.lru_cache(maxsize=8)
def zeros_deflated(prefix: bytes, size: int, block: int = 1 << 20) -> bytes:
    """Raw deflate data of ``prefix`` followed by zeros up to ``size`` bytes, for a zip bomb.

    Built in milliseconds whatever ``size``: after a full flush deflate starts afresh, so every
    block of zeros compresses to the same bytes (about 1 KB a MiB), which are repeated.
    """
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    repeats, rest = divmod(size - len(prefix), block)
    head = compressor.compress(prefix) + compressor.flush(zlib.Z_FULL_FLUSH)
    one_block = compressor.compress(bytes(block)) + compressor.flush(zlib.Z_FULL_FLUSH)
    return head + one_block * repeats + compressor.compress(bytes(rest)) + compressor.flush()


@functools.lru_cache(maxsize=8)
def zeros_crc32(prefix: bytes, size: int) -> int:
    """CRC-32 of ``prefix`` followed by zeros up to ``size`` bytes."""
    crc = zlib.crc32(prefix)
    for start in range(len(prefix), size, 64 << 20):
        crc = zlib.crc32(bytes(min(64 << 20, size - start)), crc)
    return crc


def bomb_zip(members: Mapping[str, tuple[bytes, int]], declared_sizes: Mapping[str, int] | None = None) -> bytes:
    """A deflated zip whose member ``name`` inflates to ``prefix`` plus zeros, ``size`` bytes in all
    (``size == len(prefix)``: just ``prefix``, an ordinary member).

    Args:
        members: ``name -> (prefix, size)``.
        declared_sizes: sizes the zip headers declare instead of the true ones (a lying header),
            with the CRC-32 of that many bytes; the deflate data still holds ``size`` bytes.
    """
    declared_sizes = declared_sizes or {}
    local, central = io.BytesIO(), io.BytesIO()
    for name, (prefix, size) in members.items():
        data = zeros_deflated(prefix, size)
        declared = declared_sizes.get(name, size)
        crc = zeros_crc32(prefix, declared)
        encoded = name.encode()
        offset = local.tell()
        # local header: version 2.0, no flags, deflate, DOS date 1980-01-01, CRC, sizes, name, no extra
        local.write(struct.pack("<4s2B4HL2L2H", b"PK\x03\x04", 20, 0, 0, 8, 0, 0x21, crc, len(data), declared,
                                len(encoded), 0) + encoded + data)
        central.write(struct.pack("<4s4B4HL2L5H2L", b"PK\x01\x02", 20, 3, 20, 0, 0, 8, 0, 0x21, crc, len(data),
                                  declared, len(encoded), 0, 0, 0, 0, 0o644 << 16, offset) + encoded)
    directory = central.getvalue()
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members), len(directory), local.tell(), 0)
    return local.getvalue() + directory + end


GIB = 1 << 30
BRATS_SHAPE = (240, 240, 155)
#: modality -> member name of the zip bombs: an uncompressed BraTS case folder
BOMB_MEMBERS = {m: f"BraTS2021_00001/BraTS2021_00001_{m}.nii" for m in MODALITIES}


def nifti_header(shape: Sequence[int], dtype: type = np.int16) -> bytes:
    """An uncompressed NIfTI-1 header announcing ``shape`` voxels of ``dtype`` from byte 352."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header["vox_offset"] = 352
    return header.binaryblock + bytes(4)


#: what a header announcing a BraTS volume of int16 says the file holds: 17,856,352 bytes
BRATS_BYTES = len(nifti_header(BRATS_SHAPE)) + int(np.prod(BRATS_SHAPE)) * 2


def case_bombs(prefix: bytes = b"", size: int = GIB, declared: int | None = None) -> bytes:
    """A case zip of the four :data:`BOMB_MEMBERS`, each ``prefix`` then zeros up to ``size``
    (by default 4 GiB of zeros in 4.2 MB), its zip headers declaring ``declared`` bytes if given."""
    return bomb_zip(dict.fromkeys(BOMB_MEMBERS.values(), (prefix, size)),
                    None if declared is None else dict.fromkeys(BOMB_MEMBERS.values(), declared))


def brats_zip(files: Mapping[str, bytes], case_id: str = "BraTS2021_00001", folder: str = "BraTS2021_00001/") -> bytes:
    """A zipped BraTS case folder: ``<folder><case>_<modality>.nii.gz`` per modality."""
    return case_zip({f"{folder}{case_id}_{m}.nii.gz": data for m, data in files.items()})


def brats2023_zip(files: Mapping[str, bytes], case_id: str = "BraTS-GLI-00000-000",
                  folder: str = "BraTS-GLI-00000-000/") -> bytes:
    """A zipped BraTS 2023-2024 case folder: ``<folder><case>-{t1n,t1c,t2w,t2f}.nii.gz`` (``files`` keyed
    by MODALITIES name)."""
    suffix = {modality: name for name, modality in BRATS2023_MODALITIES.items()}
    return case_zip({f"{folder}{case_id}-{suffix[m]}.nii.gz": data for m, data in files.items()})


def stack_4d(files: Mapping[str, bytes], affine: np.ndarray = LPS_AFFINE) -> bytes:
    """One 4D ``.nii.gz`` with the modalities of ``files`` stacked in MODALITIES order."""
    volumes = [np.asanyarray(nib.Nifti1Image.from_bytes(gzip.decompress(files[m])).dataobj) for m in MODALITIES]
    return nifti_bytes(np.stack(volumes, axis=-1), affine)


def make_segmenter_store(root: Path, *, patch_size: Sequence[int] = (64, 64, 64), overlap: float = 0.25,
                         version: str = "test-1") -> Path:
    """A model store with one tiny seeded ``unet3d`` segmentation bundle, promoted; returns ``root``."""
    from brainscan.models.store import ModelStore
    from tests.evaluation import make_segmenter_bundle

    # Made-up validation figures (the bundle is untrained): the page must show what a manifest says.
    make_segmenter_bundle(root / "segmentation" / "unet3d" / version, patch_size=patch_size, overlap=overlap,
                          version=version, metrics={"dice": {"WT": 0.875, "TC": 0.5, "ET": 0.25, "mean": 0.54},
                                                    "validation_cases": 4})
    ModelStore(root).promote("segmentation", "unet3d", version)
    return root
