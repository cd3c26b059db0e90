"""DICOM studies through the gateway, against the REAL segmenter (API + Celery worker + Redis).

The stack is the one tests/gateway/test_segmentations.py starts (internal token, Redis password,
a tiny seeded U-Net). The studies are tests/dicom/studies.py's: the phantom study (a skull-stripped
four-series MR study in a PACS export's layout, coarse grid: tests structure) and, slow, the real
BraTS2021_00006 case acquired as a clinical study (t1ce axial 3 mm, t1 sagittal, t2 with its own
field of view and a patient movement, flair oblique). A good study gives a job with a DICOM SEG
that references the t1ce series and a NIfTI mask on the t1ce grid; malformed studies are refused
at upload (4xx, each with its own code) and no job is created.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest

from brainscan.cli.main import main
from tests.dicom.studies import (
    PATIENT_ID,
    PATIENT_NAME,
    StudyFiles,
    brats_source,
    copy_study,
    edit_instances,
    phantom_source,
    small_protocol,
    write_study,
    zip_folder,
)
from tests.dicom.test_seg import dciodvfy_errors, needs_dciodvfy
from tests.gateway.test_segmentations import (
    TEST_SEGMENTATION_LIMIT,
    SegmentationStack,
    nifti_from_bytes,
    segmentation_stack,
    serve_gateway,
    wait_for_job,
)
from tests.paths import BRATS_SAMPLE, needs_brats_sample
from tests.redis_server import needs_redis
from tests.servers import RunningServer

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), needs_redis]


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[SegmentationStack]:
    with segmentation_stack(tmp_path_factory.mktemp("dicom-segmentation")) as running:
        yield running


@pytest.fixture(scope="module")
def gateway(stack, tmp_path_factory) -> Iterator[RunningServer]:
    with serve_gateway(stack, tmp_path_factory.mktemp("gateway-logs")) as server:
        yield server


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> StudyFiles:
    return write_study(tmp_path_factory.mktemp("phantom-study"), phantom_source(), small_protocol())


@pytest.fixture
def client(gateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=60, trust_env=False) as session:
        yield session


def _zip_bytes(study: StudyFiles, tmp_path: Path) -> bytes:
    return zip_folder(study.folder, tmp_path / "study.zip").read_bytes()


def _job_count(stack: SegmentationStack) -> int:
    return sum(1 for p in stack.jobs_dir.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if stack.jobs_dir.is_dir() else 0


def check_dicom_job(client: httpx.Client, job: dict, study: StudyFiles, stack: SegmentationStack) -> pydicom.Dataset:
    """The job's SEG references the t1ce series, its mask lies on the t1ce grid, no PHI in its record or logs."""
    assert job["status"] == "succeeded", f"{job}\n{stack.worker_log_tail()}"
    result = job["result"]
    assert set(result["files"]) == {"mask.nii.gz", "seg.dcm", "transforms.json"}
    seg = client.get(result["seg_url"])
    assert seg.status_code == 200 and seg.headers["content-type"] == "application/dicom"
    dataset = pydicom.dcmread(io.BytesIO(seg.content))
    assert dataset.Modality == "SEG"
    referenced = {item.SeriesInstanceUID for item in dataset.ReferencedSeriesSequence}
    assert referenced == {study.series_uids["t1ce"]}
    mask = nifti_from_bytes(client.get(result["mask_url"]).content)
    np.testing.assert_allclose(mask.affine, study.grids["t1ce"], atol=1e-3)
    assert job["input"]["shape"] == list(mask.shape) and job["input"]["source"] == "dicom"
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2, 4}
    transforms = client.get(result["transforms_url"]).json()
    assert transforms["reference"] == "t1ce" and {t["modality"] for t in transforms["transforms"]} >= {"t1", "t2"}
    t1ce = nifti_from_bytes(client.get(job["links"]["inputs"]["t1ce"]).content)
    assert t1ce.shape == mask.shape  # the viewer shows the mask on the t1ce volume
    record = (stack.jobs_dir / job["id"] / "job.json").read_text()
    for secret in (PATIENT_NAME, PATIENT_ID, PATIENT_NAME.split("^")[0]):
        assert secret not in record and secret not in stack.worker_log_tail(10**7)
    return dataset


def test_a_dicom_study_gives_a_seg_on_the_t1ce_series(stack, client, study, tmp_path) -> None:
    created = client.post("/api/v1/segmentations", files={"dicom": ("study.zip", _zip_bytes(study, tmp_path),
                                                                    "application/zip")})
    assert created.status_code == 202, created.text
    assert created.json()["input"]["series"]["t1ce"]["series_instance_uid"] == study.series_uids["t1ce"]
    job = wait_for_job(client, created.headers["location"], stack, timeout_s=240)
    check_dicom_job(client, job, study, stack)
    if needs_dciodvfy.args[0]:
        pytest.skip(needs_dciodvfy.kwargs["reason"])
    path = tmp_path / "seg.dcm"
    path.write_bytes(client.get(job["result"]["seg_url"]).content)
    assert dciodvfy_errors(path) == []


@pytest.mark.parametrize(("damage", "status", "code"), [
    (lambda s: s.files["t1ce"][4].unlink(), 422, "missing_slices"),
    (lambda s: [edit_instances(paths, Modality="CT") for paths in s.files.values()], 422, "not_mr"),
    (lambda s: edit_instances(s.files["t2"][3:], ImagePositionPatient=["0", "0", "0"]), 422, None),
])
def test_a_malformed_study_is_refused_at_upload(stack, client, study, tmp_path, damage, status, code) -> None:
    broken = copy_study(study, tmp_path / "damaged")
    damage(broken)
    before = _job_count(stack)
    answer = client.post("/api/v1/segmentations", files={"dicom": ("study.zip", _zip_bytes(broken, tmp_path),
                                                                   "application/zip")})
    body = answer.json()
    assert answer.status_code == status, body
    assert set(body) >= {"error", "detail", "request_id"}
    assert code is None or body["error"] == code
    assert PATIENT_NAME not in answer.text
    assert _job_count(stack) == before  # refused before queueing


def test_dicom_mixed_with_nifti_fields_is_422(stack, client, study, tmp_path) -> None:
    files = {"dicom": ("study.zip", _zip_bytes(study, tmp_path), "application/zip"),
             "t1": ("t1.nii.gz", stack.case_files["t1"].read_bytes(), "application/gzip")}
    answer = client.post("/api/v1/segmentations", files=files)
    assert answer.status_code == 422 and answer.json()["error"] == "ambiguous_upload"


def test_an_ambiguous_study_names_its_series_and_the_mapping_resolves_it(stack, client, study, tmp_path) -> None:
    broken = copy_study(study, tmp_path / "damaged")
    edit_instances(broken.files["t1ce"], SeriesDescription="AX T1 SE", ProtocolName="AX T1 SE", ContrastBolusAgent="")
    raw = _zip_bytes(broken, tmp_path)
    answer = client.post("/api/v1/segmentations", files={"dicom": ("study.zip", raw, "application/zip")})
    body = answer.json()
    assert answer.status_code == 422 and body["error"] == "series_unidentified", body
    assert {s["series_instance_uid"] for s in body["series"]} >= set(broken.series_uids.values())
    assert "series" in body["detail"]
    mapping = {uid: modality for modality, uid in broken.series_uids.items()}
    created = client.post("/api/v1/segmentations", files={"dicom": ("study.zip", raw, "application/zip")},
                          data={"series": json.dumps(mapping)})
    assert created.status_code == 202, created.text
    assert all(s["mapped"] for s in created.json()["input"]["series"].values())
    client.delete(created.headers["location"])


def test_client_cli_round_trip_of_a_study_folder(stack, gateway, study, tmp_path, capsys) -> None:
    out = tmp_path / "result"
    capsys.readouterr()
    code = main(["client", "segment", str(study.folder), "--out", str(out), "--url", gateway.url, "--json"])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    result = json.loads(stdout)
    assert sorted(p.name for p in out.iterdir()) == ["mask.nii.gz", "seg.dcm", "transforms.json"]
    assert result["job"]["status"] == "succeeded"
    referenced = pydicom.dcmread(out / "seg.dcm").ReferencedSeriesSequence[0].SeriesInstanceUID
    assert referenced == study.series_uids["t1ce"]


@pytest.mark.slow
@needs_brats_sample
def test_a_real_brats_case_acquired_as_a_clinical_study(stack, client, tmp_path_factory) -> None:
    """BraTS2021_00006 acquired as tests/dicom/studies.py's clinical protocol, zipped, through the gateway."""
    real = write_study(tmp_path_factory.mktemp("brats-study"), brats_source(BRATS_SAMPLE))
    raw = zip_folder(real.folder, tmp_path_factory.mktemp("zip") / "study.zip").read_bytes()
    assert len(raw) < TEST_SEGMENTATION_LIMIT
    created = client.post("/api/v1/segmentations", files={"dicom": ("study.zip", raw, "application/zip")})
    assert created.status_code == 202, created.text
    job = wait_for_job(client, created.headers["location"], stack, timeout_s=600)
    check_dicom_job(client, job, real, stack)
    if not needs_dciodvfy.args[0]:
        path = tmp_path_factory.mktemp("seg") / "seg.dcm"
        path.write_bytes(client.get(job["result"]["seg_url"]).content)
        assert dciodvfy_errors(path) == []
