"""Studies pulled from a PACS through the gateway: REAL Orthanc, segmenter API, Celery worker and Redis.

The stack is tests/gateway/test_segmentations.py's (internal token, Redis password, a tiny seeded
U-Net), with ``SEGMENTER_DICOMWEB_SERVERS`` naming three PACS: ``orthanc`` (a real Orthanc with
DICOMweb, tests/orthanc_server.py), ``refusing`` (a second real Orthanc whose Lua rule drops every
SEG it is sent, as a PACS that keeps no segmentations does: it answers STOW-RS with success and
stores nothing) and ``down`` (a closed port). The study is tests/dicom/studies.py's phantom study
(a skull-stripped four-series brain MR study, coarse grid), stored in both Orthancs with their
REST ``POST /instances``. A request may only name a configured PACS: anything else is a 422 and
the service contacts nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest

from brainscan.cli.main import main
from tests.dicom.studies import StudyFiles, phantom_source, small_protocol, write_study
from tests.gateway.test_dicom_segmentations import _job_count, check_dicom_job
from tests.gateway.test_segmentations import SegmentationStack, segmentation_stack, serve_gateway, wait_for_job
from tests.orthanc_server import OrthancServer, needs_orthanc, orthanc_server
from tests.redis_server import needs_redis
from tests.servers import RunningServer, free_port

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), needs_redis, needs_orthanc]

REFUSE_SEG = "function ReceivedInstanceFilter(dicom, origin, info)\n  return dicom.Modality ~= 'SEG'\nend\n"


@pytest.fixture(scope="module")
def refusing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    folder = tmp_path_factory.mktemp("refusing")
    (folder / "refuse_seg.lua").write_text(REFUSE_SEG)
    with orthanc_server(folder, lua_scripts=[folder / "refuse_seg.lua"]) as server:
        yield server


@pytest.fixture(scope="module")
def servers(orthanc: OrthancServer, refusing: OrthancServer) -> dict[str, str]:
    return {"orthanc": orthanc.dicomweb_url, "refusing": refusing.dicomweb_url,
            "down": f"http://127.0.0.1:{free_port()}/dicom-web"}


@pytest.fixture(scope="module")
def stack(servers: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[SegmentationStack]:
    env = {"SEGMENTER_DICOMWEB_SERVERS": json.dumps(servers), "SEGMENTER_DICOMWEB_TIMEOUT_S": "20"}
    with segmentation_stack(tmp_path_factory.mktemp("pacs-segmentation"), env=env) as running:
        yield running


@pytest.fixture(scope="module")
def gateway(stack: SegmentationStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with serve_gateway(stack, tmp_path_factory.mktemp("gateway-logs")) as server:
        yield server


@pytest.fixture(scope="module")
def study(orthanc: OrthancServer, refusing: OrthancServer,
          tmp_path_factory: pytest.TempPathFactory) -> StudyFiles:
    written = write_study(tmp_path_factory.mktemp("pacs-study"), phantom_source(), small_protocol())
    for server in (orthanc, refusing):
        server.upload(path for paths in written.files.values() for path in paths)
    return written


@pytest.fixture
def client(gateway: RunningServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=60, trust_env=False) as session:
        yield session


def test_client_segment_pulls_from_orthanc_and_the_seg_appears_there(stack, gateway, orthanc,
                                                                    study: StudyFiles, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """`brainscan client segment --pacs URL --study UID`: the URL is exactly the configured one."""
    out = tmp_path / "result"
    capsys.readouterr()
    code = main(["client", "segment", "--pacs", orthanc.dicomweb_url, "--study", study.study.study_uid,
                 "--out", str(out), "--url", gateway.url, "--json", "--timeout", "240"])
    stdout = capsys.readouterr().out
    assert code == 0, f"{stdout}\n{stack.worker_log_tail()}"
    job = json.loads(stdout)["job"]
    assert job["input"]["pacs"]["server"] == "orthanc" and job["input"]["source"] == "dicom"
    assert job["input"]["series"]["t1ce"]["series_instance_uid"] == study.series_uids["t1ce"]
    pushed = job["result"]["pacs"]
    assert pushed["status"] == "stored" and pushed["study_uid"] == study.study.study_uid, pushed
    assert sorted(p.name for p in out.iterdir()) == ["mask.nii.gz", "seg.dcm", "transforms.json"]
    seg = pydicom.dcmread(out / "seg.dcm")
    assert seg.SOPInstanceUID == pushed["sop_instance_uid"] and seg.StudyInstanceUID == study.study.study_uid
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == study.series_uids["t1ce"]
    in_pacs = orthanc.series_modalities(study.study.study_uid)
    assert in_pacs == {**{uid: "MR" for uid in study.series_uids.values()}, seg.SeriesInstanceUID: "SEG"}


def test_a_failed_push_keeps_the_seg_and_the_job_says_so(stack, client, refusing, study: StudyFiles) -> None:
    created = client.post("/api/v1/segmentations",
                          files={"pacs": (None, "refusing"), "study_uid": (None, study.study.study_uid)})
    assert created.status_code == 202, created.text
    assert created.json()["input"]["pacs"]["instances"] == sum(len(p) for p in study.files.values())
    job = wait_for_job(client, created.headers["location"], stack, timeout_s=240)
    check_dicom_job(client, job, study, stack)  # succeeded, SEG on the t1ce series downloadable, no PHI
    pushed = job["result"]["pacs"]
    assert (pushed["status"], pushed["error"], pushed["server"]) == ("failed", "pacs_store_failed", "refusing")
    assert "does not list" in pushed["detail"] and "still a file of this job" in pushed["detail"]
    assert set(refusing.series_modalities(study.study.study_uid).values()) == {"MR"}


def test_client_segment_exits_7_with_the_seg_saved_when_the_push_fails(stack, gateway, study: StudyFiles,
                                                                       tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "result"
    capsys.readouterr()
    code = main(["client", "segment", "--pacs", "refusing", "--study", study.study.study_uid, "--out", str(out),
                 "--url", gateway.url, "--timeout", "240"])
    captured = capsys.readouterr()
    assert code == 7, f"{captured.out}\n{captured.err}\n{stack.worker_log_tail()}"
    assert "the SEG was not stored in PACS refusing" in captured.err
    assert pydicom.dcmread(out / "seg.dcm").Modality == "SEG" and (out / "mask.nii.gz").is_file()


@pytest.mark.parametrize("pacs", ["http://169.254.169.254/latest/meta-data", "nowhere", "orthanc/../admin"])
def test_an_unknown_pacs_is_422_listing_the_configured_names(stack, client, servers, study: StudyFiles,
                                                             pacs: str) -> None:
    before = _job_count(stack)
    answer = client.post("/api/v1/segmentations", files={"pacs": (None, pacs),
                                                         "study_uid": (None, study.study.study_uid)})
    body = answer.json()
    assert answer.status_code == 422 and body["error"] == "unknown_pacs", body
    assert body["servers"] == ["down", "orthanc", "refusing"]
    assert not any(url in answer.text for url in servers.values())  # names only, never the addresses
    assert _job_count(stack) == before


@pytest.mark.parametrize(("fields", "status", "code"), [
    ({"pacs": "orthanc"}, 422, "missing_study_uid"),
    ({"pacs": "orthanc", "study_uid": "1.2/../../tools"}, 422, "invalid_uid"),
    ({"pacs": "orthanc", "study_uid": "1.2.3.999"}, 404, "study_not_found"),
    ({"pacs": "down", "study_uid": "{study}"}, 503, "pacs_unreachable"),
    ({"pacs": "orthanc", "study_uid": "{study}", "case": b"PK\x03\x04"}, 422, "ambiguous_upload"),
    ({"pacs": "orthanc", "study_uid": "{study}", "series": "{not json"}, 422, None),
])
def test_pacs_requests_are_checked_before_queueing(stack, client, study: StudyFiles, fields: dict, status: int,
                                                   code: str | None) -> None:
    before = _job_count(stack)
    parts = {name: ("case.zip", value, "application/zip") if isinstance(value, bytes)
             else (None, value.replace("{study}", study.study.study_uid)) for name, value in fields.items()}
    answer = client.post("/api/v1/segmentations", files=parts)
    body = answer.json()
    assert answer.status_code == status, body
    assert set(body) >= {"error", "detail", "request_id"}
    assert code is None or body["error"] == code, body
    assert _job_count(stack) == before
