"""DICOM uploads (the ``dicom`` field and the ``series`` mapping) are checked before a job exists.

Each test uploads a zip of the phantom study (tests/dicom/studies.py: a skull-stripped four-series
MR study in a PACS export's folder layout, coarse grid), or a copy damaged the way real exports go
wrong, through :func:`services.segmenter.intake.accept_upload`, as the API does.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pydicom
import pytest

from services.segmenter import jobs
from services.segmenter.intake import IntakeLimits, UploadPart, accept_upload
from tests.dicom.studies import (
    StudyFiles,
    copy_study,
    edit_instances,
    phantom_source,
    small_protocol,
    write_study,
    zip_folder,
)

LIMITS = IntakeLimits(max_upload_bytes=20_000_000, max_voxels=2**22, max_dim=512)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> StudyFiles:
    return write_study(tmp_path_factory.mktemp("study"), phantom_source(), small_protocol())


@pytest.fixture()
def damaged(study: StudyFiles, tmp_path: Path) -> StudyFiles:
    return copy_study(study, tmp_path / "damaged")


def upload(tmp_path: Path, fields: dict[str, bytes], texts: dict[str, str] | None = None,
           limits: IntakeLimits = LIMITS):
    staging = tmp_path / "staging"
    staging.mkdir(exist_ok=True)
    parts = [UploadPart(field=name, filename=f"{name}.zip", file=io.BytesIO(data)) for name, data in fields.items()]
    return accept_upload(parts, staging, limits, texts or {})


def study_zip(study: StudyFiles, tmp_path: Path) -> bytes:
    return zip_folder(study.folder, tmp_path / f"{study.folder.name}.zip").read_bytes()


def test_a_study_zip_is_kept_as_is_with_the_series_chosen(study: StudyFiles, tmp_path: Path) -> None:
    raw = study_zip(study, tmp_path)
    result = upload(tmp_path, {"dicom": raw})
    assert list(result.files) == [jobs.STUDY_FILE] and result.files[jobs.STUDY_FILE].read_bytes() == raw
    meta = result.meta
    assert (meta["source"], meta["reference"], meta["label_convention"]) == ("dicom", "t1ce", "brats2021")
    assert {m: s["series_instance_uid"] for m, s in meta["series"].items()} == study.series_uids
    assert meta["series"]["t1ce"]["description"] == "AX T1 SE POST GD" and not meta["series"]["t1ce"]["mapped"]
    assert "PatientName" not in json.dumps(meta) and "SYNTHETIC" not in json.dumps(meta)


def test_job_file_names_are_the_librarys() -> None:
    from brainscan.dicom import case

    assert (jobs.SEG_FILE, jobs.TRANSFORMS_FILE, jobs.MASK_FILE) == (case.SEG_FILE, case.TRANSFORMS_FILE,
                                                                     case.MASK_FILE)


@pytest.mark.parametrize(("fields", "texts", "code"), [
    ({"dicom": b"PK", "t1": b"x"}, None, "ambiguous_upload"),
    ({"dicom": b"PK", "case": b"x"}, None, "ambiguous_upload"),
    ({"case": b"PK"}, {"series": "{}"}, "ambiguous_upload"),
])
def test_dicom_with_nifti_fields_is_422(tmp_path: Path, fields, texts, code) -> None:
    with pytest.raises(Exception) as info:
        upload(tmp_path, fields, texts)
    assert (info.value.code, info.value.http_status) == (code, 422)


def test_a_missing_sequence_names_the_series_and_the_mapping_fixes_it(damaged: StudyFiles, tmp_path: Path) -> None:
    # a t1ce series whose headers say nothing of contrast: two series look like t1
    edit_instances(damaged.files["t1ce"], SeriesDescription="AX T1 SE", ProtocolName="AX T1 SE", ContrastBolusAgent="")
    raw = study_zip(damaged, tmp_path)
    with pytest.raises(Exception) as info:
        upload(tmp_path, {"dicom": raw})
    assert (info.value.code, info.value.http_status) == ("series_unidentified", 422)
    body = info.value.to_dict()
    assert {s["series_instance_uid"] for s in body["series"]} >= set(damaged.series_uids.values())
    assert "series" in info.value.message
    mapping = {uid: modality for modality, uid in damaged.series_uids.items()}
    result = upload(tmp_path, {"dicom": raw}, {"series": json.dumps(mapping)})
    assert {m: s["series_instance_uid"] for m, s in result.meta["series"].items()} == damaged.series_uids
    assert all(s["mapped"] for s in result.meta["series"].values())


def _drop_slice(study: StudyFiles) -> None:
    study.files["t1ce"][5].unlink()


def _make_ct(study: StudyFiles) -> None:
    for paths in study.files.values():
        edit_instances(paths, Modality="CT")


def _compress(study: StudyFiles) -> None:
    from pydicom.encaps import encapsulate
    from pydicom.uid import MPEG4HP41

    for path in study.files["t1ce"]:
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = MPEG4HP41
        ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 60])
        ds["PixelData"].VR = "OB"
        ds.save_as(path)


@pytest.mark.parametrize(("damage", "code", "status"), [
    (_drop_slice, "missing_slices", 422),
    (_make_ct, "not_mr", 422),
    (_compress, "unsupported_transfer_syntax", 415),
])
def test_a_malformed_study_is_refused_with_its_own_error(damaged: StudyFiles, tmp_path: Path, damage, code,
                                                         status) -> None:
    damage(damaged)
    with pytest.raises(Exception) as info:
        upload(tmp_path, {"dicom": study_zip(damaged, tmp_path)})
    assert (info.value.code, info.value.http_status) == (code, status)
    assert "SYNTHETIC" not in info.value.message


@pytest.mark.parametrize(("raw", "texts", "code", "status"), [
    (b"", None, "empty_input", 400),
    (b"DICM not a zip", None, "unsupported_format", 415),
    (None, {"series": "{not json"}, "bad_series_mapping", 422),
    (None, {"series": '{"1.2.3": "t3"}'}, "bad_series_mapping", 422),
])
def test_bad_zips_and_mappings(study: StudyFiles, tmp_path: Path, raw, texts, code, status) -> None:
    raw = study_zip(study, tmp_path) if raw is None else raw
    with pytest.raises(Exception) as info:
        upload(tmp_path, {"dicom": raw}, texts)
    assert (info.value.code, info.value.http_status) == (code, status)


def test_a_zip_declaring_more_files_than_a_study_holds_is_413(study: StudyFiles, tmp_path: Path) -> None:
    limits = IntakeLimits(max_upload_bytes=20_000_000, max_voxels=2**22, max_study_files=10)
    with pytest.raises(Exception) as info:
        upload(tmp_path, {"dicom": study_zip(study, tmp_path)}, limits=limits)
    assert (info.value.code, info.value.http_status) == ("too_large", 413)
    assert "a DICOM study zip holds at most 10" in info.value.message


def test_a_series_beyond_the_voxel_limit_is_413(study: StudyFiles, tmp_path: Path) -> None:
    limits = IntakeLimits(max_upload_bytes=20_000_000, max_voxels=1000)
    with pytest.raises(Exception) as info:
        upload(tmp_path, {"dicom": study_zip(study, tmp_path)}, limits=limits)
    assert (info.value.code, info.value.http_status) == ("too_large", 413)
