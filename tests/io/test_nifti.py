"""Tests of brainscan.io.nifti: round trips, orientation, and refusal of bad or hostile files."""

from __future__ import annotations

import gzip
import io
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainscan.errors import (
    BadDimensionsError,
    CorruptFileError,
    EmptyInputError,
    InputTooLargeError,
    UnsupportedFormatError,
)
from brainscan.io import nifti
from brainscan.io.nifti import from_ras, load_nifti, load_nifti_bytes, read_nifti_header, save_like, save_nifti, to_ras


def _rotation(axis: int, degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def _affine(linear: np.ndarray, origin=(10.0, -20.0, 5.5)) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = linear
    out[:3, 3] = origin
    return out


AFFINES = {
    "ras_identity": np.eye(4),
    "brats_lps": np.array([[-1.0, 0, 0, 0], [0, -1, 0, 239], [0, 0, 1, 0], [0, 0, 0, 1]]),
    "anisotropic_flipped": _affine(np.diag([0.9, -1.2, 3.0])),
    "permuted_axes": _affine(np.array([[0, 0, 2.0], [-1.0, 0, 0], [0, 1.5, 0]])),
    "oblique": _affine(_rotation(0, 25) @ _rotation(2, -40) @ np.diag([1.0, 1.0, 2.5])),
}


def _bytes(img: nib.Nifti1Image, gz: bool) -> bytes:
    raw = img.to_bytes()
    return gzip.compress(raw) if gz else raw


@pytest.mark.parametrize("affine_name", list(AFFINES))
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8])
def test_save_load_round_trip(tmp_path: Path, affine_name: str, suffix: str, dtype: type) -> None:
    rng = np.random.default_rng(0)
    data = (rng.random((7, 6, 5)) * 100).astype(dtype)
    affine = AFFINES[affine_name]
    path = save_nifti(data, tmp_path / f"vol{suffix}", affine=affine)
    vol = load_nifti(path)
    assert vol.data.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_allclose(vol.affine, affine, atol=1e-5)
    expected_spacing = np.linalg.norm(affine[:3, :3], axis=0)
    np.testing.assert_allclose(vol.spacing, expected_spacing, rtol=1e-5)
    assert vol.voxel_volume_ml == pytest.approx(np.prod(expected_spacing) / 1000, rel=1e-5)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == suffix.endswith(".gz")
    # written by ISA-L, read back by any gzip reader: the standard library's, and nibabel's own loader
    if suffix == ".nii.gz":
        assert nib.Nifti1Image.from_bytes(gzip.decompress(path.read_bytes())).get_fdata().shape == data.shape
        np.testing.assert_array_equal(np.asanyarray(nib.load(str(path)).dataobj), data)


@pytest.mark.parametrize(
    ("data", "dtype", "expected_disk_dtype"),
    [
        (np.arange(60, dtype=np.int64).reshape(3, 4, 5), None, np.int64),  # nibabel refuses int64 by default
        (np.ones((3, 4, 5), dtype=bool), None, np.uint8),  # NIfTI has no bool
        (np.linspace(0, 3, 60).reshape(3, 4, 5), np.dtype(np.uint8), np.uint8),
        (np.linspace(0, 3, 60).reshape(3, 4, 5), np.float32, np.float32),
    ],
)
def test_save_nifti_dtypes(tmp_path: Path, data: np.ndarray, dtype, expected_disk_dtype) -> None:
    path = save_nifti(data, tmp_path / "v.nii.gz", affine=np.eye(4), dtype=dtype)
    assert nib.load(str(path)).get_data_dtype() == np.dtype(expected_disk_dtype)
    np.testing.assert_array_equal(load_nifti(path).data, data.astype(expected_disk_dtype))


def test_save_like_keeps_reference_grid(tmp_path: Path) -> None:
    affine = AFFINES["oblique"]
    ref = load_nifti(save_nifti(np.zeros((6, 5, 4), np.float32), tmp_path / "ref.nii.gz", affine=affine))
    mask = (np.arange(120).reshape(6, 5, 4) % 3).astype(np.uint8)
    out = load_nifti(save_like(mask, ref, tmp_path / "mask.nii.gz"))
    np.testing.assert_array_equal(out.data, mask)
    np.testing.assert_allclose(out.affine, ref.affine, atol=1e-6)
    assert out.data.dtype == np.uint8
    with pytest.raises(BadDimensionsError, match="reference grid"):
        save_like(mask[:-1], ref, tmp_path / "bad.nii.gz")


@pytest.mark.parametrize("affine_name", list(AFFINES))
@pytest.mark.parametrize("channels", [None, 3])
def test_to_ras_and_back_is_exact(affine_name: str, channels: int | None) -> None:
    shape = (5, 4, 3) + ((channels,) if channels else ())
    data = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    affine = AFFINES[affine_name]
    data_ras, affine_ras, orientation = to_ras(data, affine)
    assert nib.aff2axcodes(affine_ras) == ("R", "A", "S")
    # The same world point must hold the same value before and after reordering.
    for index in [(0, 0, 0), (4, 3, 2), (1, 2, 0)]:
        world = affine @ np.array([*index, 1.0])
        ras_index = np.rint(np.linalg.solve(affine_ras, world)[:3]).astype(int)
        np.testing.assert_array_equal(data_ras[tuple(ras_index)], data[index])
    back = from_ras(data_ras, orientation)
    assert back.shape == data.shape
    np.testing.assert_array_equal(back, data)


def test_from_ras_refuses_other_grid() -> None:
    _, _, orientation = to_ras(np.zeros((5, 4, 3)), AFFINES["permuted_axes"])
    with pytest.raises(BadDimensionsError, match="original grid"):
        from_ras(np.zeros((5, 4, 3)), orientation)


def _image(shape: tuple[int, ...], dtype=np.int16) -> nib.Nifti1Image:
    return nib.Nifti1Image(np.ones(shape, dtype=dtype), np.eye(4), dtype=dtype)


# Random data, so that the gzipped form is long enough to cut inside the voxel data.
GOOD_NII = nib.Nifti1Image(
    np.random.default_rng(0).integers(0, 1000, (8, 8, 8), dtype=np.int16), np.eye(4), dtype=np.int16
).to_bytes()


@pytest.mark.parametrize(
    ("raw", "error", "message"),
    [
        (b"", EmptyInputError, "empty"),
        (b"hello world", UnsupportedFormatError, "not a NIfTI"),
        (b"\x89PNG\r\n\x1a\n" + bytes(600), UnsupportedFormatError, "not a NIfTI"),
        (b"\xff\xd8\xff\xe0" + bytes(2000), UnsupportedFormatError, "not a NIfTI"),  # JPEG
        (gzip.compress(b"a gzipped text file, not an image" * 40), UnsupportedFormatError, "not a NIfTI"),
        (b"\x1f\x8b\x08\x00garbage-after-gzip-magic" + bytes(400), CorruptFileError, "gzip"),
        (GOOD_NII[:200], CorruptFileError, "too short"),
        (gzip.compress(GOOD_NII)[:60], CorruptFileError, "too short"),
        (GOOD_NII[: len(GOOD_NII) - 300], CorruptFileError, "truncated"),
        (gzip.compress(GOOD_NII, mtime=0)[:-40], CorruptFileError, "truncated"),
        (_image((16, 16)).to_bytes(), BadDimensionsError, "2 dimensions"),
        (_image((4, 4, 4, 2, 2)).to_bytes(), BadDimensionsError, "5 dimensions"),
    ],
    ids=[
        "zero_bytes", "text", "png", "jpeg", "gzipped_text", "broken_gzip", "truncated_header",
        "truncated_gz_header", "truncated_data", "truncated_gz_data", "2d_image", "5d_image",
    ],
)
def test_load_nifti_bytes_refuses_bad_content(raw: bytes, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        load_nifti_bytes(raw, name="upload.nii")


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_file_on_disk_is_corrupt(tmp_path: Path, gz: bool) -> None:
    raw = _bytes(_image((20, 20, 20), dtype=np.float32), gz)
    path = tmp_path / ("cut.nii.gz" if gz else "cut.nii")
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CorruptFileError):
        load_nifti(path)


@pytest.mark.parametrize(
    ("shape", "max_voxels", "error"),
    [
        ((8, 8, 8), 8**3 - 1, InputTooLargeError),
        ((8, 8, 8), 8**3, None),
        ((4, 4, 4, 4), 64, None),  # the limit is per volume: a 4-modality stack is not 4x too large
        ((4, 4, 4, nifti.MAX_FRAMES + 1), 10**6, InputTooLargeError),
    ],
)
def test_max_voxels(shape: tuple[int, ...], max_voxels: int, error: type | None) -> None:
    raw = _image(shape).to_bytes()
    if error is None:
        assert load_nifti_bytes(raw, max_voxels=max_voxels).shape == shape
    else:
        with pytest.raises(error, match="limit|at most"):
            load_nifti_bytes(raw, max_voxels=max_voxels)


def _bomb(shape: tuple[int, ...], payload_bytes: int = 1 << 20) -> bytes:
    """A small .nii.gz whose header claims ``shape`` (uint8) but that holds only ``payload_bytes``."""
    header = nib.Nifti1Header()
    header.set_data_dtype(np.uint8)
    header.set_data_shape(shape)
    header["vox_offset"] = 352
    stream = io.BytesIO()
    with gzip.GzipFile(fileobj=stream, mode="wb") as gz:
        gz.write(header.binaryblock + b"\x00" * 4)
        gz.write(bytes(payload_bytes))
    return stream.getvalue()


@pytest.mark.parametrize("shape", [(2000, 2000, 2000), (200, 200, 200, 30000)])
@pytest.mark.parametrize("from_file", [False, True])
def test_gzip_bomb_refused_before_decompressing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...], from_file: bool
) -> None:
    raw = _bomb(shape)
    assert len(raw) < 10_000  # tiny on the wire, 8 GB (or more) if it were expanded

    def _must_not_decode(*args, **kwargs):
        raise AssertionError("voxel data was decoded before the size check")

    monkeypatch.setattr(nifti, "_read", _must_not_decode)
    with pytest.raises(InputTooLargeError):
        if from_file:
            path = tmp_path / "bomb.nii.gz"
            path.write_bytes(raw)
            load_nifti(path)
        else:
            load_nifti_bytes(raw, name="bomb.nii.gz")


@pytest.mark.parametrize("name", ["scan.NII.GZ", "upload.gz", "no_extension", "scan.nii"])
@pytest.mark.parametrize("gz", [False, True])
def test_format_is_decided_by_content(tmp_path: Path, name: str, gz: bool) -> None:
    data = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    path = tmp_path / name
    path.write_bytes(_bytes(nib.Nifti1Image(data, np.eye(4), dtype=np.int16), gz))
    np.testing.assert_array_equal(load_nifti(path).data, data)


@pytest.mark.parametrize("gz", [False, True])
def test_nifti2_bytes(gz: bool) -> None:
    data = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    raw = _bytes(nib.Nifti2Image(data, AFFINES["anisotropic_flipped"]), gz)
    vol = load_nifti_bytes(raw)
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_allclose(vol.spacing, (0.9, 1.2, 3.0), rtol=1e-6)


def test_load_options_and_missing_file(tmp_path: Path) -> None:
    path = save_nifti(np.full((3, 4, 5), 7, np.int16), tmp_path / "v.nii.gz", affine=AFFINES["brats_lps"])
    assert load_nifti(path, dtype=np.float32).data.dtype == np.float32
    header = read_nifti_header(path)
    assert header.get_data_shape() == (3, 4, 5)
    assert header.get_data_dtype() == np.int16
    with pytest.raises(InputTooLargeError):
        read_nifti_header(path, max_voxels=10)
    with pytest.raises(FileNotFoundError):
        load_nifti(tmp_path / "absent.nii.gz")


def test_gzip_output_is_deterministic_and_a_damaged_checksum_is_refused(tmp_path: Path) -> None:
    data = (np.random.default_rng(3).random((20, 18, 16)) * 1000).astype(np.int16)
    first = save_nifti(data, tmp_path / "a.nii.gz", affine=np.eye(4)).read_bytes()
    second = save_nifti(data, tmp_path / "b.nii.gz", affine=np.eye(4)).read_bytes()
    assert first == second  # no time stamp or name in the header: the same mask, the same bytes (and hash)
    damaged = bytearray(first)
    damaged[-8] ^= 0xFF  # the gzip trailer's CRC-32 of the voxel data
    with pytest.raises(CorruptFileError, match="truncated or damaged"):
        load_nifti_bytes(bytes(damaged), name="upload.nii.gz")
    (tmp_path / "damaged.nii.gz").write_bytes(bytes(damaged))
    with pytest.raises(CorruptFileError, match="damaged.nii.gz"):
        load_nifti(tmp_path / "damaged.nii.gz")
