"""``brainscan.io.nifti.peek_header``: the one binary NIfTI header reader (the segmenter's intake holds
what it announces to its limits). NIfTI-1 and -2, either byte order, gzipped or not, read from the
first bytes only; anything else is refused with the status its error carries."""

from __future__ import annotations

import gzip
import struct

import nibabel as nib
import numpy as np
import pytest

from brainscan.errors import CorruptFileError, EmptyInputError, UnsupportedFormatError
from brainscan.io.nifti import HeaderInfo, peek_header


def nifti_bytes(shape: tuple[int, ...], dtype: type = np.int16, *, version: int = 1, gz: bool = False,
                big_endian: bool = False) -> bytes:
    image_class = nib.Nifti2Image if version == 2 else nib.Nifti1Image
    data = np.zeros(shape, dtype=dtype)
    if big_endian:
        data = data.astype(data.dtype.newbyteorder(">"))
    image = image_class(data, np.eye(4))
    raw = image.to_bytes()
    return gzip.compress(raw) if gz else raw


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("gz", [False, True], ids=["nii", "nii.gz"])
@pytest.mark.parametrize("big_endian", [False, True], ids=["little", "big"])
def test_header_announces_shape_type_offset_and_compression(version: int, gz: bool, big_endian: bool) -> None:
    raw = nifti_bytes((7, 6, 5, 4), np.float32, version=version, gz=gz, big_endian=big_endian)
    info = peek_header(raw[:4096], "scan")
    assert isinstance(info, HeaderInfo)
    assert (info.shape, info.dtype, info.gzipped) == ((7, 6, 5, 4), "float32", gz)
    expected_offset = 352 if version == 1 else 544
    assert info.vox_offset == expected_offset and info.data_bytes == 7 * 6 * 5 * 4 * 4
    assert info.file_bytes == expected_offset + info.data_bytes
    if not gz:
        assert len(raw) == info.file_bytes <= info.max_stored_bytes


def test_only_one_header_is_inflated_from_a_bomb() -> None:
    head = nifti_bytes((2, 2, 2))[:352]
    bomb = gzip.compress(head + bytes(64 << 20))  # 64 MB of zeros behind the header
    info = peek_header(bomb[:4096], "bomb")
    assert info.gzipped and info.shape == (2, 2, 2)


@pytest.mark.parametrize("raw, error, status, words", [
    (b"", EmptyInputError, 400, "empty"),
    (b"\x89PNG\r\n\x1a\n" + bytes(400), UnsupportedFormatError, 415, "not a NIfTI"),
    (struct.pack("<i", 348) + bytes(100), CorruptFileError, 422, "too short"),
    (gzip.compress(nifti_bytes((4, 4, 4)))[:30], CorruptFileError, 422, "truncated gzip"),
    (b"\x1f\x8b" + bytes(60), CorruptFileError, 422, "cannot be decompressed"),
], ids=["empty", "png", "short", "truncated gzip", "bad gzip"])
def test_other_content_is_refused(raw: bytes, error: type, status: int, words: str) -> None:
    with pytest.raises(error, match=words) as caught:
        peek_header(raw, "upload")
    assert caught.value.http_status == status


def test_pair_header_and_complex_voxels_are_refused() -> None:
    pair = bytearray(nifti_bytes((4, 4, 4)))
    pair[344:348] = b"ni1\x00"
    with pytest.raises(UnsupportedFormatError, match=r"\.hdr/\.img pair"):
        peek_header(bytes(pair), "pair.nii")
    with pytest.raises(UnsupportedFormatError, match="data type 32") as caught:
        peek_header(nifti_bytes((4, 4, 4), np.complex64), "complex.nii")
    assert caught.value.code == "unsupported_dtype"
