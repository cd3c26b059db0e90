"""Upload validation of the segmenter (services/segmenter/intake.py): every bad input gets its own
error class and status before anything is queued, zip members never become paths, bombs are refused
from their headers, and good uploads are stored normalised on their own grid (4D channel order too)."""

from __future__ import annotations

import gzip
import io
import struct
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainscan.errors import (
    BadDimensionsError,
    BrainscanError,
    CorruptFileError,
    DatasetLayoutError,
    EmptyInputError,
    InputTooLargeError,
    MissingModalityError,
    NonFiniteError,
    UnsupportedFormatError,
    VolumeMismatchError,
)
from brainscan.labels import BRATS2021, BRATS2023, BRATS2023_MODALITIES, MODALITIES
from services.segmenter import intake
from services.segmenter.intake import IntakeLimits, UploadPart, accept_upload, inspect_header, select_source
from services.segmenter.settings import DEFAULT_MAX_DIM, DEFAULT_MAX_VOXELS, Settings
from tests.segmenter import (
    BRATS_BYTES,
    BRATS_SHAPE,
    GIB,
    LPS_AFFINE,
    SMALL_SHAPE,
    BOMB_MEMBERS,
    bomb_zip,
    case_bombs,
    nifti_header,
    brats2023_zip,
    brats_zip,
    case_files,
    case_zip,
    modality_volume,
    nifti_bytes,
    stack_4d,
)

LIMITS = IntakeLimits(max_upload_bytes=20_000_000, max_voxels=2**22, max_dim=512)
GOOD = case_files()


def parts_of(fields: dict[str, bytes]) -> list[UploadPart]:
    return [UploadPart(field=name, filename=f"{name}.nii.gz", file=io.BytesIO(data)) for name, data in fields.items()]


def accept(fields: dict[str, bytes], tmp_path: Path, limits: IntakeLimits = LIMITS) -> intake.IntakeResult:
    staging = tmp_path / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    return accept_upload(parts_of(fields), staging, limits)


def header_only(shape: tuple[int, ...], *, dtype: object = np.float32, vox_offset: float = 352.0,
                magic: bytes = b"n+1", datatype: int | None = None, bitpix: int | None = None,
                payload: int = 0) -> bytes:
    """Gzipped NIfTI-1 header (plus ``payload`` zero bytes) claiming whatever the arguments say."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header["vox_offset"] = vox_offset
    header["magic"] = magic
    if datatype is not None:
        header["datatype"], header["bitpix"] = datatype, bitpix
    return gzip.compress(header.binaryblock + b"\x00" * 4 + bytes(payload), compresslevel=1)


def with_volume(modality: str, data: bytes) -> dict[str, bytes]:
    return {**GOOD, modality: data}


def float_volume(value: float, where: tuple[int, int, int] = (3, 4, 5)) -> bytes:
    data = modality_volume("flair").astype(np.float32)
    data[where] = value
    return nifti_bytes(data)


def shifted_affine(mm: float) -> np.ndarray:
    affine = LPS_AFFINE.copy()
    affine[0, 3] += mm
    return affine


# -- bad uploads: (fields, error class, status, code, words the message must name) --------------

BAD_UPLOADS = {
    "png as t1": (with_volume("t1", b"\x89PNG\r\n\x1a\n" + bytes(600)), UnsupportedFormatError, 415,
                  "unsupported_format", ["t1"]),
    "text as flair": (with_volume("flair", b"hello, this is not a volume" * 40), UnsupportedFormatError, 415,
                      "unsupported_format", ["flair"]),
    "zip as t2": (with_volume("t2", case_zip({"a.txt": b"x" * 500})), UnsupportedFormatError, 415,
                  "unsupported_format", ["t2"]),
    "empty t1ce": (with_volume("t1ce", b""), EmptyInputError, 400, "empty_input", ["t1ce"]),
    "truncated nii.gz": (with_volume("t1", GOOD["t1"][: len(GOOD["t1"]) // 2]), CorruptFileError, 422,
                         "corrupt_file", ["t1"]),
    "truncated gzip header": (with_volume("t1", GOOD["t1"][:20]), CorruptFileError, 422, "corrupt_file", ["t1"]),
    "truncated plain nii": (with_volume("t2", nifti_bytes(modality_volume("t2"), gz=False)[:-500]),
                            CorruptFileError, 422, "corrupt_file", ["truncated"]),
    "2D flair": (with_volume("flair", nifti_bytes(np.ones((20, 18), np.int16))), BadDimensionsError, 422,
                 "bad_dimensions", ["2D"]),
    "5D t1": (with_volume("t1", nifti_bytes(np.ones((6, 6, 6, 1, 2), np.int16))), BadDimensionsError, 422,
              "bad_dimensions", ["5D"]),
    "4D t1 in files": (with_volume("t1", nifti_bytes(np.ones((*SMALL_SHAPE, 4), np.int16))), BadDimensionsError,
                       422, "bad_dimensions", ["4D", "volume"]),
    "axis over 512": (with_volume("t1", header_only((600, 10, 10))), BadDimensionsError, 422, "bad_dimensions",
                      ["600"]),
    "too many voxels": (with_volume("t1", header_only((256, 256, 256))), InputTooLargeError, 413, "too_large",
                        ["voxels"]),
    # volumes on different grids are aligned by the worker (tests/segmenter/test_nifti_alignment.py),
    # but not volumes that lie apart in world space: nothing to align them with
    "volumes apart": (with_volume("t2", nifti_bytes(modality_volume("t2"), shifted_affine(300.0))),
                      VolumeMismatchError, 422, "no_overlap", ["t2", "covers 0%", "t1ce"]),
    "NaN voxel": (with_volume("flair", float_volume(np.nan)), NonFiniteError, 422, "non_finite", ["flair"]),
    "inf voxel": (with_volume("t1ce", float_volume(np.inf)), NonFiniteError, 422, "non_finite", ["t1ce"]),
    # checked on threads: the first bad modality in MODALITIES order is named, as a loop would
    "two bad volumes": ({**GOOD, "t2": float_volume(np.nan), "t1ce": float_volume(np.inf)}, NonFiniteError, 422,
                        "non_finite", ["t1ce"]),
    "RGB voxels": (with_volume("t1", header_only(SMALL_SHAPE, datatype=128, bitpix=24)), UnsupportedFormatError,
                   415, "unsupported_dtype", ["t1"]),
    "complex voxels": (with_volume("t1", nifti_bytes(np.ones(SMALL_SHAPE, np.complex64))), UnsupportedFormatError,
                       415, "unsupported_dtype", ["t1"]),
    "hdr/img pair": (with_volume("t1", header_only(SMALL_SHAPE, magic=b"ni1")), UnsupportedFormatError, 415,
                     "unsupported_format", [".hdr/.img"]),
    "huge header extension": (with_volume("t1", header_only(SMALL_SHAPE, vox_offset=2e9)), CorruptFileError, 422,
                              "corrupt_file", ["2000000000"]),
    "missing flair": ({m: GOOD[m] for m in MODALITIES if m != "flair"}, MissingModalityError, 422,
                      "missing_modality", ["flair"]),
    "files and zip": ({**GOOD, "case": brats_zip(GOOD)}, BrainscanError, 400, "ambiguous_upload", ["zip"]),
    "zip and 4d": ({"case": brats_zip(GOOD), "volume": stack_4d(GOOD)}, BrainscanError, 400, "ambiguous_upload",
                   ["zip", "4d"]),
    "unknown field": ({**GOOD, "seg": GOOD["t1"]}, BrainscanError, 400, "invalid_upload", ["seg"]),
    "nothing": ({}, EmptyInputError, 400, "empty_input", ["t1"]),
}


@pytest.mark.parametrize("fields, error, status, code, words", BAD_UPLOADS.values(), ids=BAD_UPLOADS.keys())
def test_bad_uploads_are_refused_with_their_own_error(tmp_path: Path, fields: dict[str, bytes], error: type,
                                                      status: int, code: str, words: list[str]) -> None:
    with pytest.raises(error) as caught:
        accept(fields, tmp_path)
    assert (caught.value.http_status, caught.value.code) == (status, code)
    for word in words:
        assert word in caught.value.message, caught.value.message


@pytest.mark.parametrize("fields, twice", [
    ([*MODALITIES, "t1"], "t1"),
    (["case", "case"], "case"),
    (["volume", "volume"], "volume"),
    ([*BRATS2023_MODALITIES, "t2w"], "t2w"),
], ids=["t1 twice", "case twice", "volume twice", "t2w twice"])
def test_repeated_field_is_a_422_naming_it(fields: list[str], twice: str) -> None:
    parts = [UploadPart(name, f"{name}.nii.gz", io.BytesIO(GOOD["t1"])) for name in fields]
    with pytest.raises(BrainscanError, match="more than once") as caught:
        select_source(parts)
    assert (caught.value.http_status, caught.value.code) == (422, "duplicate_field")
    assert f"['{twice}']" in caught.value.message


def test_text_fields_are_refused() -> None:
    with pytest.raises(BrainscanError, match="must be files") as caught:
        select_source(parts_of(GOOD), texts=["note"])
    assert caught.value.http_status == 400


def test_upload_larger_than_the_cap_is_refused(tmp_path: Path) -> None:
    small = IntakeLimits(max_upload_bytes=1000, max_voxels=2**22)
    with pytest.raises(InputTooLargeError) as caught:
        accept(GOOD, tmp_path, small)
    assert caught.value.http_status == 413


# -- decompression bombs ------------------------------------------------------------------------

@pytest.mark.parametrize("shape, error", [((2000, 2000, 2000), BadDimensionsError),
                                          ((400, 400, 400), InputTooLargeError)],
                         ids=["claims 2000^3", "claims 400^3"])
def test_gzip_bomb_is_refused_from_its_header_without_inflating(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                shape: tuple[int, ...], error: type) -> None:
    bomb = header_only(shape, payload=32 << 20)  # 32 MB of zeros, ~32 KB compressed
    assert len(bomb) < 200_000

    def must_not_decode(*args: object, **kwargs: object) -> None:
        raise AssertionError("voxel data was decoded before the header was checked")

    monkeypatch.setattr(intake, "load_nifti", must_not_decode)
    monkeypatch.setattr(intake, "read_nifti_header", must_not_decode)
    limits = IntakeLimits(max_upload_bytes=20_000_000, max_voxels=2**25)
    with pytest.raises(error):
        accept(with_volume("t1", bomb), tmp_path, limits)


def test_header_inspection_reads_the_announced_geometry(tmp_path: Path) -> None:
    path = tmp_path / "flair.upload"
    path.write_bytes(GOOD["flair"])
    info = inspect_header(path, "flair", LIMITS)
    assert (info.shape, info.dtype, info.gzipped) == (SMALL_SHAPE, "int16", True)
    assert info.data_bytes == int(np.prod(SMALL_SHAPE)) * 2


# -- zips ---------------------------------------------------------------------------------------

def test_zip_member_names_are_never_used_as_paths(tmp_path: Path) -> None:
    members = {
        "../../evil/BraTS_x_t1.nii.gz": GOOD["t1"],
        "/abs/path/BraTS_x_t1ce.nii.gz": GOOD["t1ce"],
        "a\\..\\..\\BraTS_x_t2.nii.gz": GOOD["t2"],
        "case/./../BraTS_x_flair.nii.gz": GOOD["flair"],
        "../../escape.txt": b"should never be written",
        "../BraTS_x_seg.nii.gz": GOOD["t1"],
        "__MACOSX/case/._BraTS_x_t1.nii.gz": b"resource fork",
        "case/inner.zip": case_zip({"BraTS_y_t1.nii.gz": GOOD["t1"]}),
        "case/": b"",
    }
    work = tmp_path / "deep" / "work"
    work.mkdir(parents=True)
    result = accept({"case": case_zip(members)}, work)
    assert sorted(p.name for p in (work / "staging").iterdir()) == sorted(result.files[n].name for n in result.files)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "deep", "deep/work", "deep/work/staging", *sorted(f"deep/work/staging/input_{m}.nii.gz" for m in MODALITIES)]
    assert result.meta["source"] == "zip"
    assert result.meta["filenames"]["t1"] == "BraTS_x_t1.nii.gz"
    for modality in MODALITIES:
        stored = nib.load(result.files[f"input_{modality}.nii.gz"])
        np.testing.assert_array_equal(np.asanyarray(stored.dataobj), modality_volume(modality))


def patched(archive: bytes, signature: bytes, offset: int, value: bytes) -> bytes:
    """``archive`` with ``value`` written ``offset`` bytes after each zip record starting with ``signature``."""
    raw = bytearray(archive)
    start = 0
    while (start := raw.find(signature, start)) >= 0:
        raw[start + offset:start + offset + len(value)] = value
        start += 4
    return bytes(raw)


ONE_CASE = brats_zip(GOOD, case_id="BraTS_x", folder="c/")
#: the central directory's offset, as its end record states it
DIRECTORY_AT = struct.unpack_from("<L", ONE_CASE, ONE_CASE.rfind(b"PK\x05\x06") + 16)[0]

BAD_ZIPS = {
    "not a zip": (GOOD["t1"], UnsupportedFormatError, 415, ["zip"]),
    "damaged zip": (b"PK\x03\x04" + bytes(range(256)) * 4, CorruptFileError, 422, ["damaged"]),
    "missing t2": (case_zip({f"c/BraTS_x_{m}.nii.gz": GOOD[m] for m in MODALITIES if m != "t2"}),
                   MissingModalityError, 422, ["t2"]),
    "t1 twice": (case_zip({**{f"c/BraTS_x_{m}.nii.gz": GOOD[m] for m in MODALITIES}, "d/BraTS_x_t1.nii": GOOD["t1"]}),
                 MissingModalityError, 422, ["t1"]),
    "two cases": (case_zip({f"c/BraTS_{'y' if m == 't2' else 'x'}_{m}.nii.gz": GOOD[m] for m in MODALITIES}),
                  DatasetLayoutError, 422, ["several cases"]),
    "too many members": (case_zip({f"f{i}.txt": b"x" for i in range(70)}), InputTooLargeError, 413, ["70"]),
    # zipfile raises other errors than BadZipFile for these; none may become a 500
    "needs zip version 17.0": (patched(ONE_CASE, b"PK\x01\x02", 6, struct.pack("<H", 170)), UnsupportedFormatError,
                               415, ["zip feature"]),
    "name flagged UTF-8 but not": (patched(patched(ONE_CASE, b"PK\x01\x02", 8, struct.pack("<H", 0x800)),
                                           b"c/BraTS_x", 2, b"\xae"), CorruptFileError, 422, ["damaged"]),
    "members before the zip's start": (patched(ONE_CASE, b"PK\x05\x06", 16, struct.pack("<L", DIRECTORY_AT + 4096)),
                                       CorruptFileError, 422, ["damaged"]),
    "entry without a name": (case_zip({"": b"x", **{f"c/BraTS_x_{m}.nii.gz": GOOD[m] for m in MODALITIES[1:]}}),
                             MissingModalityError, 422, ["t1"]),
}


@pytest.mark.parametrize("archive, error, status, words", BAD_ZIPS.values(), ids=BAD_ZIPS.keys())
def test_bad_zips_are_refused(tmp_path: Path, archive: bytes, error: type, status: int, words: list[str]) -> None:
    with pytest.raises(error) as caught:
        accept({"case": archive}, tmp_path)
    assert caught.value.http_status == status
    for word in words:
        assert word in caught.value.message


def test_zip_member_larger_than_any_allowed_volume_is_refused_before_extraction(tmp_path: Path) -> None:
    tight = IntakeLimits(max_upload_bytes=20_000_000, max_voxels=1000, max_header_bytes=4096)
    # 8 MB of zeros deflates to a few KB: the declared size gives it away
    archive = case_zip({**{f"c/BraTS_x_{m}.nii.gz": GOOD[m] for m in MODALITIES[1:]},
                        "c/BraTS_x_t1.nii": bytes(8 << 20)})
    assert len(archive) < 100_000
    with pytest.raises(InputTooLargeError, match="unpacks to"):
        accept({"case": archive}, tmp_path, tight)


# -- zip bombs: refused from what the zip and each member's NIfTI header declare ------------------

#: the segmenter's own limits (services/segmenter/settings.py defaults): 512 MiB, 2**25 voxels
SERVICE_LIMITS = IntakeLimits(max_upload_bytes=Settings.model_fields["max_upload_bytes"].default,
                              max_voxels=DEFAULT_MAX_VOXELS, max_dim=DEFAULT_MAX_DIM)
PLAIN = case_files(gz=False)
#: a float32 volume of 512 x 512 x 256: 2**26 voxels, twice the service's limit
HUGE_HEADER = nifti_header((512, 512, 256), np.float32)
HUGE_BYTES = len(HUGE_HEADER) + 512 * 512 * 256 * 4


def one_bomb(prefix: bytes, size: int, declared: int) -> bytes:
    """A good case zip (uncompressed members) whose t1 member is ``prefix`` then zeros up to ``size``."""
    members = {name: (PLAIN[m], len(PLAIN[m])) for m, name in BOMB_MEMBERS.items()}
    members[BOMB_MEMBERS["t1"]] = (prefix, size)
    return bomb_zip(members, {BOMB_MEMBERS["t1"]: declared})


ZIP_BOMBS = {
    # the attack as found: 4.2 MB that inflate to 4 GiB; the sizes its directory declares give it away
    "four 1 GiB members of zeros": (lambda: case_bombs(), InputTooLargeError, 413, ["unpacks to 1073741824 bytes"]),
    # lying zip headers: zipfile would inflate no more than they declare, and what it does is not NIfTI
    "zeros declared as 4 KB": (lambda: case_bombs(declared=4096), UnsupportedFormatError, 415, ["not a NIfTI"]),
    "NIfTI headers, zip declares less than they announce": (
        lambda: case_bombs(nifti_header(BRATS_SHAPE), declared=4096), CorruptFileError, 422,
        ["truncated", "4096 bytes", f"announces {BRATS_BYTES}"]),
    "NIfTI headers, zip declares more than they announce": (
        lambda: case_bombs(nifti_header(BRATS_SHAPE), declared=100 << 20), CorruptFileError, 422,
        [f"announces {BRATS_BYTES}", "zip or the header is wrong"]),
    # all sizes agree, but the deflate data goes on for 1 GiB: the copy stops at the declared size
    "NIfTI headers, data past the declared size": (
        lambda: case_bombs(nifti_header(BRATS_SHAPE), declared=BRATS_BYTES), CorruptFileError, 422, ["member"]),
    "NIfTI header over the voxel limit": (
        lambda: one_bomb(HUGE_HEADER, GIB, HUGE_BYTES), InputTooLargeError, 413, ["67108864 voxels"]),
    "four members that fit alone, not together": (
        lambda: case_bombs(size=150 << 20), InputTooLargeError, 413, ["four volumes", f"{4 * (150 << 20)} bytes"]),
}


@pytest.mark.parametrize("make_zip, error, status, words", ZIP_BOMBS.values(), ids=ZIP_BOMBS.keys())
def test_zip_bomb_is_refused_fast_with_little_written(tmp_path: Path, make_zip, error: type, status: int,
                                                      words: list[str]) -> None:
    archive = make_zip()
    assert len(archive) < 5_000_000
    started = time.perf_counter()
    with pytest.raises(error) as caught:
        accept({"case": archive}, tmp_path, SERVICE_LIMITS)
    elapsed = time.perf_counter() - started
    written = sum(path.stat().st_size for path in (tmp_path / "staging").iterdir())
    assert caught.value.http_status == status
    for word in words:
        assert word in caught.value.message, caught.value.message
    assert "BraTS2021_00001_" in caught.value.message or "four volumes" in caught.value.message
    assert written <= BRATS_BYTES < 64_000_000, written
    assert elapsed < 2.0, elapsed


@pytest.mark.parametrize("entries", [60_000, 70_000], ids=["zip", "zip64"])
def test_zip_declaring_many_entries_is_refused_before_its_directory_is_parsed(tmp_path: Path, entries: int) -> None:
    archive = case_zip({f"f{i}": b"" for i in range(entries)})  # zipfile needs ~10 us an entry to parse it
    with pytest.raises(InputTooLargeError) as caught:
        accept({"case": archive}, tmp_path)
    assert f"declares {entries} entries" in caught.value.message  # 70,000 only in the zip64 record


def test_zip_of_uncompressed_volumes_is_accepted(tmp_path: Path) -> None:
    result = accept({"case": brats_zip(PLAIN)}, tmp_path)
    for modality in MODALITIES:
        stored = nib.load(result.files[f"input_{modality}.nii.gz"])
        np.testing.assert_array_equal(np.asanyarray(stored.dataobj), modality_volume(modality))


def test_encrypted_zip_member_is_refused(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for modality in MODALITIES:
            info = zipfile.ZipInfo(f"c/BraTS_x_{modality}.nii.gz")
            archive.writestr(info, GOOD[modality])
    raw = bytearray(buffer.getvalue())
    # set the "encrypted" flag bit in every local and central header
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = 0
        while (start := raw.find(signature, start)) >= 0:
            raw[start + offset] |= 0x1
            start += 4
    with pytest.raises(CorruptFileError, match="encrypted"):
        accept({"case": bytes(raw)}, tmp_path)


# -- good uploads -------------------------------------------------------------------------------

def test_four_files_are_stored_normalised_on_their_grid(tmp_path: Path) -> None:
    plain = case_files(gz=False)
    result = accept(plain, tmp_path)
    assert sorted(result.files) == sorted(f"input_{m}.nii.gz" for m in MODALITIES)
    assert result.meta["shape"] == list(SMALL_SHAPE)
    assert result.meta["spacing_mm"] == [1.0, 1.2, 1.5]
    assert (result.meta["source"], result.meta["orientation"]) == ("files", "LPS")
    for modality in MODALITIES:
        path = result.files[f"input_{modality}.nii.gz"]
        assert path.read_bytes()[:2] == b"\x1f\x8b"
        stored = nib.load(path)
        np.testing.assert_allclose(stored.affine, LPS_AFFINE, atol=1e-5)
        assert stored.get_data_dtype() == np.int16
        np.testing.assert_array_equal(np.asanyarray(stored.dataobj), modality_volume(modality))


def test_trailing_singleton_axis_is_a_3d_volume(tmp_path: Path) -> None:
    volume = modality_volume("t1")[..., None]
    result = accept(with_volume("t1", nifti_bytes(volume)), tmp_path)
    assert nib.load(result.files["input_t1.nii.gz"]).shape == SMALL_SHAPE


def test_4d_channels_map_to_modalities_in_order(tmp_path: Path) -> None:
    result = accept({"volume": stack_4d(GOOD)}, tmp_path)
    assert result.meta["source"] == "4d"
    assert result.meta["shape"] == list(SMALL_SHAPE)
    for modality in MODALITIES:
        stored = nib.load(result.files[f"input_{modality}.nii.gz"])
        assert stored.shape == SMALL_SHAPE
        np.testing.assert_allclose(stored.affine, LPS_AFFINE, atol=1e-5)
        np.testing.assert_array_equal(np.asanyarray(stored.dataobj), modality_volume(modality))


@pytest.mark.parametrize("volume, words", [
    (nifti_bytes(np.ones((*SMALL_SHAPE, 3), np.int16)), ["(20, 18, 12, 3)"]),
    (GOOD["flair"], ["(20, 18, 12)"]),
], ids=["3 channels", "3D as volume"])
def test_4d_upload_needs_four_channels(tmp_path: Path, volume: bytes, words: list[str]) -> None:
    with pytest.raises(BadDimensionsError) as caught:
        accept({"volume": volume}, tmp_path)
    for word in words:
        assert word in caught.value.message


def test_the_three_upload_shapes_store_identical_inputs(tmp_path: Path) -> None:
    stored = {}
    for label, fields in {"files": GOOD, "zip": {"case": brats_zip(GOOD)}, "4d": {"volume": stack_4d(GOOD)}}.items():
        result = accept(fields, tmp_path / label)
        stored[label] = {name: np.asanyarray(nib.load(path).dataobj) for name, path in result.files.items()}
    for name in stored["files"]:
        np.testing.assert_array_equal(stored["zip"][name], stored["files"][name])
        np.testing.assert_array_equal(stored["4d"][name], stored["files"][name])


@pytest.mark.parametrize("image_class, endianness", [(nib.Nifti2Image, "<"), (nib.Nifti1Image, ">")],
                         ids=["NIfTI-2", "big-endian NIfTI-1"])
def test_other_nifti_flavours_are_read(tmp_path: Path, image_class: type, endianness: str) -> None:
    def encode(modality: str) -> bytes:
        header = image_class.header_class(endianness=endianness)
        image = image_class(modality_volume(modality), LPS_AFFINE, header=header)
        return gzip.compress(image.to_bytes())

    result = accept({m: encode(m) for m in MODALITIES}, tmp_path)
    for modality in MODALITIES:
        stored = nib.load(result.files[f"input_{modality}.nii.gz"])
        np.testing.assert_array_equal(np.asanyarray(stored.dataobj), modality_volume(modality))
        np.testing.assert_allclose(stored.affine, LPS_AFFINE, atol=1e-5)


# -- BraTS 2023-2024 names ----------------------------------------------------------------------

#: MODALITIES name -> BraTS 2023-2024 name (the form field and the file suffix)
NAME_2023 = {modality: name for name, modality in BRATS2023_MODALITIES.items()}
GOOD_2023 = {NAME_2023[m]: data for m, data in GOOD.items()}

CONVENTIONS = {
    # upload -> (source, label convention of the job's mask)
    "2021 files": (GOOD, "files", BRATS2021),
    "2023 files": (GOOD_2023, "files", BRATS2023),
    "2021 zip": ({"case": brats_zip(GOOD)}, "zip", BRATS2021),
    "2023 zip": ({"case": brats2023_zip(GOOD)}, "zip", BRATS2023),
    "2023 zip with seg": ({"case": case_zip({"c/BraTS-GLI-00000-000-seg.nii.gz": GOOD["t1"],
                                             **{f"c/BraTS-GLI-00000-000-{NAME_2023[m]}.nii.gz": GOOD[m]
                                                for m in MODALITIES}})}, "zip", BRATS2023),
    "4d": ({"volume": stack_4d(GOOD)}, "4d", BRATS2021),
}


@pytest.mark.parametrize("fields, source, convention", CONVENTIONS.values(), ids=CONVENTIONS.keys())
def test_upload_naming_decides_the_label_convention(tmp_path: Path, fields: dict[str, bytes], source: str,
                                                    convention: str) -> None:
    result = accept(fields, tmp_path)
    assert (result.meta["source"], result.meta["label_convention"]) == (source, convention)
    # whatever the naming, the inputs are stored under the MODALITIES names, each with its own volume
    assert sorted(result.files) == sorted(f"input_{m}.nii.gz" for m in MODALITIES)
    for modality in MODALITIES:
        stored = nib.load(result.files[f"input_{modality}.nii.gz"])
        np.testing.assert_array_equal(np.asanyarray(stored.dataobj), modality_volume(modality))


def test_2023_names_are_kept_for_display(tmp_path: Path) -> None:
    files = accept(GOOD_2023, tmp_path / "files").meta["filenames"]
    assert files == {m: f"{NAME_2023[m]}.nii.gz" for m in MODALITIES}
    zipped = accept({"case": brats2023_zip(GOOD)}, tmp_path / "zip").meta["filenames"]
    assert zipped == {m: f"BraTS-GLI-00000-000-{NAME_2023[m]}.nii.gz" for m in MODALITIES}


BAD_2023_UPLOADS = {
    "mixed field names": ({**{m: GOOD[m] for m in ("t1", "t1ce")}, "t2w": GOOD["t2"], "t2f": GOOD["flair"]},
                          BrainscanError, 400, "ambiguous_upload", ["BraTS 2018-2021 field names ['t1', 't1ce']",
                                                                    "BraTS 2023-2024 field names ['t2w', 't2f']"]),
    "t1 and t1n": ({**GOOD, "t1n": GOOD["t1"]}, BrainscanError, 400, "ambiguous_upload", ["t1n"]),
    "missing t2f": ({k: v for k, v in GOOD_2023.items() if k != "t2f"}, MissingModalityError, 422,
                    "missing_modality", ["t2f", "['t1n', 't1c', 't2w', 't2f']"]),
    "unknown field": ({**GOOD_2023, "t1gd": GOOD["t1ce"]}, BrainscanError, 400, "invalid_upload", ["t1gd", "t1n"]),
    "zip mixing namings": ({"case": case_zip({"c/BraTS-GLI-00000-000-t1n.nii.gz": GOOD["t1"],
                                              "c/BraTS-GLI-00000-000-t1c.nii.gz": GOOD["t1ce"],
                                              "c/BraTS-GLI-00000-000_t2.nii.gz": GOOD["t2"],
                                              "c/BraTS-GLI-00000-000-t2f.nii.gz": GOOD["flair"]})},
                           DatasetLayoutError, 422, "dataset_layout", ["mixes", "_t2.nii.gz", "-t1n.nii.gz"]),
    "2023 zip missing t1c": ({"case": brats2023_zip({m: GOOD[m] for m in MODALITIES if m != "t1ce"})},
                             MissingModalityError, 422, "missing_modality", ["t1c (t1ce)", "<case>-{t1n,t1c"]),
    "2023 zip of two cases": ({"case": case_zip({f"c/BraTS-GLI-0000{int(m == 't2')}-000-{NAME_2023[m]}.nii.gz": GOOD[m]
                                                 for m in MODALITIES})},
                              DatasetLayoutError, 422, "dataset_layout", ["several cases"]),
}


@pytest.mark.parametrize("fields, error, status, code, words", BAD_2023_UPLOADS.values(), ids=BAD_2023_UPLOADS.keys())
def test_bad_2023_uploads_are_refused(tmp_path: Path, fields: dict[str, bytes], error: type, status: int, code: str,
                                      words: list[str]) -> None:
    with pytest.raises(error) as caught:
        accept(fields, tmp_path)
    assert (caught.value.http_status, caught.value.code) == (status, code)
    for word in words:
        assert word in caught.value.message, caught.value.message
