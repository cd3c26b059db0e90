"""Each way a DICOM study can be unusable has its own clear error (code, HTTP status and message).

Every test damages a private copy of the phantom study (see conftest.py) the way real exports go
wrong: a slice lost in transfer, a repeated acquisition stored in one series, a compressed export,
a CT series in the upload...
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from brainscan.dicom import identify_series, read_study, series_volume
from brainscan.errors import (
    CorruptFileError,
    EmptyInputError,
    InconsistentSeriesError,
    InvalidInputError,
    NotMRError,
    SeriesIdentificationError,
    UnsupportedFormatError,
    UnsupportedTransferSyntaxError,
)
from tests.dicom.studies import StudyFiles, uid, zip_folder


def _edit(path: Path, **attributes: object) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.save_as(path)


def _t1ce(study: StudyFiles):
    return identify_series(read_study(study.folder))["t1ce"]


def _normal(path: Path) -> np.ndarray:
    iop = np.asarray(pydicom.dcmread(path).ImageOrientationPatient, dtype=float)
    return np.cross(iop[:3], iop[3:])


def _shift(path: Path, mm: np.ndarray) -> None:
    ds = pydicom.dcmread(path)
    ds.ImagePositionPatient = [f"{v:.6f}" for v in np.asarray(ds.ImagePositionPatient, dtype=float) + mm]
    ds.save_as(path)


def test_missing_slice(study_copy: StudyFiles) -> None:
    study_copy.files["t1ce"][10].unlink()
    with pytest.raises(InconsistentSeriesError, match=r"series 2 'AX T1 SE POST GD' lacks 1 slice\(s\): a gap of "
                                                      r"10\.00 mm .* slices are 5\.00 mm apart") as info:
        series_volume(_t1ce(study_copy))
    assert (info.value.code, info.value.http_status) == ("missing_slices", 422)


def test_headers_alone_reveal_geometry_problems_before_any_pixel_is_decoded(study_copy: StudyFiles) -> None:
    from brainscan.dicom import check_study

    summary = check_study(study_copy.folder)
    assert {m: s["series_instance_uid"] for m, s in summary.items()} == study_copy.series_uids
    study_copy.files["flair"][10].unlink()
    with pytest.raises(InconsistentSeriesError, match="series 5 't2_tirm_tra_dark-fluid' lacks 1 slice"):
        check_study(study_copy.folder)


def test_several_missing_slices_are_counted(study_copy: StudyFiles) -> None:
    for index in (4, 5, 20):
        study_copy.files["t1ce"][index].unlink()
    with pytest.raises(InconsistentSeriesError, match=r"lacks 3 slice\(s\)"):
        series_volume(_t1ce(study_copy))


def test_duplicate_slice(study_copy: StudyFiles) -> None:
    source = study_copy.files["t1ce"][7]
    copy = source.with_name("REPEATED")
    shutil.copy(source, copy)
    _edit(copy, SOPInstanceUID=uid("repeat"), InstanceNumber=900)
    with pytest.raises(InconsistentSeriesError, match=r"holds 1 slice\(s\) at a position another slice already has "
                                                      r"\(first at [-\d.]+ mm along the normal: instance numbers 8 "
                                                      r"and 900\)") as info:
        series_volume(_t1ce(study_copy))
    assert info.value.code == "duplicate_slices"


def test_the_same_instance_stored_twice_is_read_once(study_copy: StudyFiles) -> None:
    source = study_copy.files["t1ce"][7]
    shutil.copy(source, source.parent.parent / "COPY_OF_ONE_FILE")
    study = read_study(study_copy.folder)
    assert len(study.series[study_copy.series_uids["t1ce"]].instances) == len(study_copy.files["t1ce"])
    assert study.skipped == 2  # the copy and README.txt


def test_uneven_spacing(study_copy: StudyFiles) -> None:
    normal = _normal(study_copy.files["t1ce"][0])
    for path in study_copy.files["t1ce"][12:]:
        _shift(path, normal * 1.3)
    with pytest.raises(InconsistentSeriesError, match=r"unevenly spaced slices \(steps from 5\.00 to 6\.30 mm, "
                                                      r"median 5\.00 mm\)") as info:
        series_volume(_t1ce(study_copy))
    assert info.value.code == "uneven_spacing"


def test_slices_shifted_within_their_plane(study_copy: StudyFiles) -> None:
    _shift(study_copy.files["t1ce"][6], np.array([2.0, 0.0, 0.0]))
    with pytest.raises(InconsistentSeriesError, match=r"shifted within their planes by up to 2\.00 mm") as info:
        series_volume(_t1ce(study_copy))
    assert info.value.code == "misaligned_slices"


def test_mixed_sizes(study_copy: StudyFiles) -> None:
    path = study_copy.files["t1ce"][3]
    ds = pydicom.dcmread(path)
    cropped = ds.pixel_array[:-4, :]
    ds.Rows = cropped.shape[0]
    ds.PixelData = np.ascontiguousarray(cropped).tobytes()
    ds.save_as(path)
    with pytest.raises(InconsistentSeriesError, match=r"mixes slices of different sizes \(rows, columns\) \(1 of "
                                                      r"\d+ differ") as info:
        series_volume(_t1ce(study_copy))
    assert info.value.code == "mixed_geometry"


def test_mixed_orientations(study_copy: StudyFiles) -> None:
    angle = np.radians(5.0)
    _edit(study_copy.files["t1ce"][3],
          ImageOrientationPatient=[1, 0, 0, 0, f"{np.cos(angle):.8f}", f"{np.sin(angle):.8f}"])
    with pytest.raises(InconsistentSeriesError, match="mixes slices of different orientations") as info:
        series_volume(_t1ce(study_copy))
    assert info.value.code == "mixed_geometry"


def test_mixed_pixel_spacings(study_copy: StudyFiles) -> None:
    _edit(study_copy.files["t1ce"][3], PixelSpacing=["1.0", "1.0"])
    with pytest.raises(InconsistentSeriesError, match="mixes slices of different pixel spacings"):
        series_volume(_t1ce(study_copy))


def test_slice_without_position(study_copy: StudyFiles) -> None:
    ds = pydicom.dcmread(study_copy.files["t1ce"][3])
    del ds.ImagePositionPatient
    ds.save_as(study_copy.files["t1ce"][3])
    with pytest.raises(InconsistentSeriesError, match="slice 4 lacks a valid ImagePositionPatient") as info:
        series_volume(_t1ce(study_copy))
    assert info.value.code == "missing_geometry"


def test_too_few_slices(study_copy: StudyFiles) -> None:
    for path in study_copy.files["t1ce"][2:]:
        path.unlink()
    with pytest.raises(InconsistentSeriesError, match=r"has 2 slice\(s\); a volume needs at least 3") as info:
        series_volume(_t1ce(study_copy))
    assert info.value.code == "too_few_slices"


def test_a_ct_series_is_ignored_when_guessing_and_refused_when_mapped(study_copy: StudyFiles) -> None:
    for path in study_copy.files["t2"]:
        _edit(path, Modality="CT")
    study = read_study(study_copy.folder)
    with pytest.raises(SeriesIdentificationError, match=r"no series looks like t2.*series 4 'AX T2 TSE' \[CT, "
                                                        r"\d+ images, .*\] \(ignored: CT modality, not MR\)"):
        identify_series(study)
    with pytest.raises(NotMRError, match=r"gives t2 to series 4 'AX T2 TSE', a CT series") as info:
        identify_series(study, {study_copy.series_uids["t2"]: "t2"})
    assert (info.value.code, info.value.http_status) == ("not_mr", 422)


def test_an_upload_without_mr(study_copy: StudyFiles) -> None:
    for paths in study_copy.files.values():
        for path in paths:
            _edit(path, Modality="CT")
    with pytest.raises(NotMRError, match=r"holds no MR series \(modalities found: \['CT'\]\)"):
        read_study(study_copy.folder)


def test_a_series_mixing_modalities(study_copy: StudyFiles) -> None:
    _edit(study_copy.files["flair"][0], Modality="CT")
    with pytest.raises(NotMRError, match=r"series 5 't2_tirm_tra_dark-fluid' mixes instances of modalities "
                                         r"\['CT', 'MR'\]"):
        read_study(study_copy.folder)


def _encapsulate(paths: list[Path], transfer_syntax: str, frame: bytes) -> None:
    from pydicom.encaps import encapsulate

    for path in paths:
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR = "OB"
        ds.save_as(path)


def test_a_transfer_syntax_nothing_decodes(study_copy: StudyFiles) -> None:
    from pydicom.uid import MPEG4HP41

    _encapsulate(study_copy.files["t1ce"], MPEG4HP41, b"\x00\x00\x01\xb3" + b"\x00" * 60)
    with pytest.raises(UnsupportedTransferSyntaxError, match=r"series 2 'AX T1 SE POST GD' is compressed as MPEG-4 "
                                                             r"AVC/H\.264 .*export the study uncompressed") as info:
        series_volume(_t1ce(study_copy))
    assert (info.value.code, info.value.http_status) == ("unsupported_transfer_syntax", 415)


def _decoder_available(transfer_syntax: str) -> bool:
    from pydicom.pixels.decoders.base import get_decoder

    return get_decoder(transfer_syntax).is_available


@pytest.mark.skipif(_decoder_available("1.2.840.10008.1.2.4.70"),
                    reason="a JPEG Lossless decoder (pylibjpeg-libjpeg or GDCM) is installed here")
def test_jpeg_lossless_without_a_decoder(study_copy: StudyFiles) -> None:
    """JPEG Lossless, the most common compressed MR export, needs a plugin pydicom does not bring."""
    from pydicom.uid import JPEGLosslessSV1

    _encapsulate(study_copy.files["t1ce"], JPEGLosslessSV1, b"\xff\xd8" + b"\x00" * 62 + b"\xff\xd9")
    with pytest.raises(UnsupportedTransferSyntaxError, match="is compressed as JPEG Lossless"):
        series_volume(_t1ce(study_copy))


def test_rle_compressed_series_decode_to_the_same_voxels(phantom_study: StudyFiles, study_copy: StudyFiles) -> None:
    from pydicom.uid import RLELossless

    for path in study_copy.files["t1ce"]:
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)
        ds.save_as(path)
    compressed = series_volume(_t1ce(study_copy))
    original = series_volume(_t1ce(phantom_study))
    np.testing.assert_array_equal(compressed.data, original.data)
    np.testing.assert_allclose(compressed.affine, original.affine)


def test_damaged_compressed_pixel_data(study_copy: StudyFiles) -> None:
    from pydicom.uid import RLELossless

    _encapsulate(study_copy.files["t1ce"][:1], RLELossless, b"\x05\x00\x00\x00" + b"\x00" * 60)
    with pytest.raises(CorruptFileError, match=r"series 2 'AX T1 SE POST GD' slice \d+ has pixel data that cannot be "
                                               r"decoded"):
        series_volume(_t1ce(study_copy))


def test_multiframe_images_are_refused_clearly(study_copy: StudyFiles) -> None:
    _edit(study_copy.files["t1"][0], NumberOfFrames=2)
    with pytest.raises(UnsupportedFormatError, match=r"multi-frame \(enhanced\) image.*export the series as 'MR "
                                                     r"Image Storage'") as info:
        read_study(study_copy.folder)
    assert info.value.code == "multiframe_unsupported"


def test_several_studies_in_one_upload(study_copy: StudyFiles) -> None:
    for path in study_copy.files["t2"]:
        _edit(path, StudyInstanceUID=uid("another study"))
    with pytest.raises(InvalidInputError, match="holds images of 2 studies; upload one study at a time") as info:
        read_study(study_copy.folder)
    assert info.value.code == "multiple_studies"


def test_a_folder_without_dicom(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not DICOM\n")
    (tmp_path / "scan.nii.gz").write_bytes(b"\x1f\x8b" + b"\x00" * 400)
    with pytest.raises(EmptyInputError, match=r"holds no DICOM image \(2 other file\(s\)\)") as info:
        read_study(tmp_path)
    assert info.value.code == "no_dicom_images"


def test_a_file_that_is_not_a_zip(tmp_path: Path) -> None:
    path = tmp_path / "study.zip"
    path.write_bytes(b"PK but not really a zip" * 10)
    with pytest.raises(UnsupportedFormatError, match="neither a folder nor a zip of a DICOM study"):
        read_study(path)


def test_a_zip_that_declares_too_much(phantom_study: StudyFiles, tmp_path: Path) -> None:
    from brainscan.dicom import StudyLimits
    from brainscan.errors import InputTooLargeError

    archive = zip_folder(phantom_study.folder, tmp_path / "study.zip")
    with pytest.raises(InputTooLargeError, match="beyond the limits"):
        read_study(archive, limits=StudyLimits(max_total_bytes=100_000))
    with pytest.raises(InputTooLargeError, match="at most 10 are read"):
        read_study(archive, limits=StudyLimits(max_files=10))
