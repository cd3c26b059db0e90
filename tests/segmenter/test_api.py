"""Segmenter API (services/segmenter/app.py) with the queue replaced by a recorder, and the worker's
job logic (services/segmenter/worker.JobRunner) called directly on jobs the API created: statuses of
bad uploads, ownership, the internal token and owner hashes, start-up secrets, cancel/delete, caps
while streaming, readiness, expiry, TF-free imports, results equal to the evaluation path,
cancellation and failures recorded in the job, previews oriented as radiologists read them. The real broker and worker are in test_worker_integration.py."""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import nibabel as nib
import numpy as np
import pytest
from fastapi.testclient import TestClient
from redis.exceptions import ConnectionError as RedisConnectionError

from brainscan.labels import BRATS2021, BRATS2023, BRATS2023_MODALITIES, MODALITIES
from services.segmenter.app import ServiceUnavailableError, create_app
from services.segmenter.jobs import owner_digest
from services.segmenter.previews import render_previews, tumour_centre, tumour_centre_record
from services.segmenter.settings import Settings
from services.segmenter.store import LocalJobStore
from services.segmenter.model_cache import LoadedSegmenter, ModelCache
from services.segmenter.worker import JobRunner
from tests.paths import REPO_ROOT
from tests.segmenter import (
    BRATS_BYTES,
    BRATS_SHAPE,
    SMALL_SHAPE,
    brats2023_zip,
    brats_zip,
    case_bombs,
    case_files,
    case_zip,
    make_segmenter_store,
    modality_volume,
    nifti_bytes,
    nifti_header,
    stack_4d,
)
from tests.servers import free_port

OWNER = {"X-Brainscan-Owner": "alice"}
OTHER = {"X-Brainscan-Owner": "bob"}
GOOD = case_files()
GOOD_VOLUMES = {m: modality_volume(m) for m in MODALITIES}
# a case large enough for several 16^3 patches, so a job can be cancelled between them
MEDIUM_SHAPE = (40, 36, 24)
MEDIUM = case_files(MEDIUM_SHAPE)


class RecordingQueue:
    """Stands in for the Celery queue: records what would be enqueued."""

    def __init__(self) -> None:
        self.enqueued: list[str] = []
        self.down = False

    def enqueue(self, job_id: str) -> str:
        if self.down:
            raise ServiceUnavailableError("the job queue is unreachable (test)")
        self.enqueued.append(job_id)
        return f"task-{len(self.enqueued)}"

    def ping(self) -> None:
        if self.down:
            raise ConnectionError("broker down (test)")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_segmenter_store(tmp_path_factory.mktemp("models"), patch_size=(16, 16, 16), overlap=0.5)


def settings_for(models: Path, jobs: Path, **overrides: Any) -> Settings:
    values = {"models_root": models, "jobs_dir": jobs, "max_upload_bytes": 3_000_000,
              "broker_url": f"redis://127.0.0.1:{free_port()}/0", "progress_interval_s": 0.0}
    return Settings(**{**values, **overrides})


@pytest.fixture()
def app_parts(models: Path, tmp_path: Path) -> Iterator[tuple[TestClient, RecordingQueue, LocalJobStore]]:
    queue = RecordingQueue()
    app = create_app(settings_for(models, tmp_path / "jobs"), queue=queue)
    with TestClient(app) as client:
        yield client, queue, app.state.store


@pytest.fixture()
def client(app_parts: tuple[TestClient, RecordingQueue, LocalJobStore]) -> TestClient:
    return app_parts[0]


def upload(fields: dict[str, bytes]) -> dict[str, tuple[str, bytes]]:
    return {name: (f"{name}.nii.gz", data) for name, data in fields.items()}


def submit(client: TestClient, fields: dict[str, bytes] = GOOD, headers: dict[str, str] = OWNER,
           **params: str) -> Any:
    return client.post("/v1/jobs", files=upload(fields), headers=headers, params=params)


def job_folders(store: LocalJobStore) -> list[str]:
    return [p.name for p in store.root.iterdir() if not p.name.startswith(".")] if store.root.is_dir() else []


# -- TensorFlow stays out -----------------------------------------------------------------------

def test_api_process_never_imports_tensorflow(models: Path, tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from fastapi.testclient import TestClient\n"
        "import services.segmenter.app as api, services.segmenter.worker\n"
        "with TestClient(api.create_app()) as client:\n"
        "    assert client.get('/v1/models').status_code == 200\n"
        "loaded = sorted(m for m in ('tensorflow', 'keras') if m in sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    env = {**os.environ, "BRAINSCAN_MODELS": str(models), "SEGMENTER_JOBS_DIR": str(tmp_path / "jobs"),
           "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


# -- submission ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, source", [(GOOD, "files"), ({"case": brats_zip(GOOD)}, "zip"),
                                            ({"volume": stack_4d(GOOD)}, "4d")], ids=["files", "zip", "4d"])
def test_submit_stores_inputs_and_enqueues_by_id(app_parts: tuple[TestClient, RecordingQueue, LocalJobStore],
                                                 fields: dict[str, bytes], source: str) -> None:
    client, queue, store = app_parts
    response = submit(client, fields)
    assert response.status_code == 202, response.text
    body = response.json()
    assert response.headers["location"] == f"/v1/jobs/{body['id']}"
    assert (body["status"], body["stage"], body["progress"], body["result"]) == ("queued", "queued", 0.0, None)
    assert body["input"]["shape"] == list(SMALL_SHAPE) and body["input"]["source"] == source
    assert body["model"] == {"name": "unet3d", "arch": "unet3d", "version": "test-1", "demo": True}
    assert queue.enqueued == [body["id"]]
    assert store.get(body["id"])["task_id"] == "task-1"
    assert client.get(body["links"]["self"], headers=OWNER).json()["id"] == body["id"]
    for modality in MODALITIES:
        download = client.get(body["links"]["inputs"][modality], headers=OWNER)
        assert download.status_code == 200 and download.headers["content-type"] == "application/gzip"
        stored = nib.Nifti1Image.from_bytes(gzip.decompress(download.content))
        original = nib.Nifti1Image.from_bytes(gzip.decompress(GOOD[modality]))
        np.testing.assert_array_equal(np.asanyarray(stored.dataobj), np.asanyarray(original.dataobj))
        np.testing.assert_allclose(stored.affine, original.affine, atol=1e-5)


BAD = {
    "not nifti": ({**GOOD, "t1": b"\x89PNG\r\n\x1a\n" + bytes(500)}, 415, "unsupported_format"),
    # another grid is aligned by the worker, but a flair at the world origin lies nowhere near the others
    "volumes apart": ({**GOOD, "flair": nifti_bytes(modality_volume("flair"), np.eye(4))}, 422, "no_overlap"),
    "missing modality": ({m: GOOD[m] for m in MODALITIES[:3]}, 422, "missing_modality"),
    "files and zip": ({**GOOD, "case": brats_zip(GOOD)}, 400, "ambiguous_upload"),
    "NaN": ({**GOOD, "t2": nifti_bytes(np.full(SMALL_SHAPE, np.nan, np.float32))}, 422, "non_finite"),
    "truncated": ({**GOOD, "t1ce": GOOD["t1ce"][:300]}, 422, "corrupt_file"),
    "2D": ({**GOOD, "t1": nifti_bytes(np.ones((20, 18), np.int16))}, 422, "bad_dimensions"),
}


@pytest.mark.parametrize("fields, status, code", BAD.values(), ids=BAD.keys())
def test_bad_uploads_get_json_errors_and_never_reach_the_queue(
        app_parts: tuple[TestClient, RecordingQueue, LocalJobStore], fields: dict[str, bytes], status: int,
        code: str) -> None:
    client, queue, store = app_parts
    response = submit(client, fields)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code and body["detail"] and body["request_id"] == response.headers["x-request-id"]
    assert queue.enqueued == [] and job_folders(store) == []
    assert f'segmenter_uploads_rejected_total{{error="{code}"}} 1.0' in client.get("/metrics").text


# -- attacks (issue 15): each is refused safely and the service goes on answering ---------------

#: the segmenter's default upload limit, under which the zip bombs arrive whole
DEFAULT_UPLOAD_BYTES = Settings.model_fields["max_upload_bytes"].default
needs_proc_io = pytest.mark.skipif(not Path("/proc/self/io").is_file(),
                                   reason="counting the bytes written needs Linux's /proc/self/io")


def bytes_written() -> int:
    """Bytes this process has passed to write() so far; under TestClient the API runs in it."""
    counters = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(counters["wchar"])


ZIP_ATTACKS = {
    "4 GiB of zeros in 4.2 MB": (lambda: case_bombs(), 413, "too_large"),
    "NIfTI headers, then 1 GiB past the size the zip declares": (
        lambda: case_bombs(nifti_header(BRATS_SHAPE), declared=BRATS_BYTES), 422, "corrupt_file"),
}


@needs_proc_io
@pytest.mark.parametrize("make_zip, status, code", ZIP_ATTACKS.values(), ids=ZIP_ATTACKS.keys())
def test_zip_bomb_is_refused_in_time_with_little_written(models: Path, tmp_path: Path, make_zip: Any, status: int,
                                                         code: str) -> None:
    archive = make_zip()
    queue = RecordingQueue()
    app = create_app(settings_for(models, tmp_path / "jobs", max_upload_bytes=DEFAULT_UPLOAD_BYTES), queue=queue)
    with TestClient(app) as client:
        before, started = bytes_written(), time.perf_counter()
        response = client.post("/v1/jobs", files={"case": ("case.zip", archive, "application/zip")}, headers=OWNER)
        elapsed, written = time.perf_counter() - started, bytes_written() - before
        assert response.status_code == status, response.text
        assert response.json()["error"] == code and "BraTS2021_00001_" in response.json()["detail"]
        assert elapsed < 2.0, elapsed
        assert written < 64_000_000, written  # the upload itself (spooled by the form parser) included
        assert list((tmp_path / "jobs" / ".staging").iterdir()) == []
        assert queue.enqueued == [] and job_folders(app.state.store) == []
        assert submit(client).status_code == 202  # still serving


@pytest.mark.parametrize("fields", [
    [(m, GOOD[m]) for m in MODALITIES] + [("t1", GOOD["t1"])],
    [("case", brats_zip(GOOD)), ("case", brats_zip(GOOD))],
], ids=["t1 twice", "case twice"])
def test_duplicate_upload_field_is_a_422_naming_it(app_parts: tuple[TestClient, RecordingQueue, LocalJobStore],
                                                   fields: list[tuple[str, bytes]]) -> None:
    client, queue, store = app_parts
    twice = fields[-1][0]
    response = client.post("/v1/jobs", files=[(name, (f"{name}.bin", data)) for name, data in fields], headers=OWNER)
    assert response.status_code == 422, response.text
    assert response.json()["error"] == "duplicate_field" and f"['{twice}']" in response.json()["detail"]
    assert queue.enqueued == [] and job_folders(store) == []


def _short_voxels(data: np.ndarray) -> bytes:
    """A complete gzip stream of a NIfTI whose voxel data stops 500 bytes early."""
    return gzip.compress(nifti_bytes(data, gz=False)[:-500])


TRUNCATED_VOXELS = {
    "files": {**upload(GOOD), "t1": ("scan_of_alice_t1.nii.gz", _short_voxels(GOOD_VOLUMES["t1"]))},
    "zip": {"case": ("case.zip", case_zip({**{f"c/scan_of_alice_{m}.nii.gz": GOOD[m] for m in MODALITIES},
                                           "c/scan_of_alice_t1.nii.gz": _short_voxels(GOOD_VOLUMES["t1"])}))},
    "4d": {"volume": ("scan_of_alice.nii.gz", _short_voxels(np.stack([GOOD_VOLUMES[m] for m in MODALITIES], -1)))},
}


@pytest.mark.parametrize("files", TRUNCATED_VOXELS.values(), ids=TRUNCATED_VOXELS.keys())
def test_error_details_name_the_upload_never_a_server_path(
        app_parts: tuple[TestClient, RecordingQueue, LocalJobStore], tmp_path: Path,
        files: dict[str, tuple[str, bytes]]) -> None:
    client, _, _ = app_parts
    response = client.post("/v1/jobs", files=files, headers=OWNER)
    assert (response.status_code, response.json()["error"]) == (422, "corrupt_file")
    detail = response.json()["detail"]
    assert "scan_of_alice" in detail and "truncated" in detail
    for server_side in (str(tmp_path), ".staging", ".upload", "/"):
        assert server_side not in detail, detail


def test_body_must_be_multipart(client: TestClient) -> None:
    response = client.post("/v1/jobs", json={"t1": "x"}, headers=OWNER)
    assert (response.status_code, response.json()["error"]) == (415, "unsupported_media_type")


def test_declared_body_over_the_cap_is_refused_before_reading(client: TestClient) -> None:
    big = {**GOOD, "t1": bytes(3_200_000)}
    response = submit(client, big)
    assert (response.status_code, response.json()["error"]) == (413, "too_large")


def test_streamed_body_over_the_cap_is_refused_while_reading(
        app_parts: tuple[TestClient, RecordingQueue, LocalJobStore]) -> None:
    client, queue, store = app_parts
    boundary = "segmenterboundary"
    sent = [0]

    def chunks() -> Iterator[bytes]:
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"t1\"; filename=\"t1.nii\"\r\n"
               "Content-Type: application/octet-stream\r\n\r\n").encode()
        for _ in range(100):  # 100 x 64 KB = 6.4 MB, twice the cap, never announced
            sent[0] += 1
            yield bytes(65536)
        yield f"\r\n--{boundary}--\r\n".encode()

    response = client.post("/v1/jobs", content=chunks(), headers={
        **OWNER, "content-type": f"multipart/form-data; boundary={boundary}"})
    assert (response.status_code, response.json()["error"]) == (413, "too_large")
    assert queue.enqueued == [] and job_folders(store) == []


@pytest.mark.parametrize("headers", [{}, {"X-Brainscan-Owner": ""}, {"X-Brainscan-Owner": "has space"}],
                         ids=["absent", "empty", "malformed"])
def test_owner_header_is_required(client: TestClient, headers: dict[str, str]) -> None:
    response = submit(client, headers=headers)
    assert (response.status_code, response.json()["error"]) == (400, "missing_owner")


def test_unknown_model_is_404_and_an_absent_default_is_503(client: TestClient, tmp_path: Path) -> None:
    response = submit(client, model="resnet9000")
    assert (response.status_code, response.json()["error"]) == (404, "unknown_model")
    empty_store = tmp_path / "empty-models"
    with TestClient(create_app(settings_for(empty_store, tmp_path / "jobs2"), queue=RecordingQueue())) as bare:
        response = submit(bare)
        assert (response.status_code, response.json()["error"]) == (503, "model_unavailable")
        ready = bare.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["models"] != "ok"
        for answer in (response, ready):
            assert "<models>" in answer.text and str(tmp_path) not in answer.text  # no server path


# -- reading, ownership, cancel, delete ---------------------------------------------------------

def test_jobs_are_visible_to_their_owner_only(client: TestClient) -> None:
    job = submit(client).json()
    for method, path in (("GET", job["links"]["self"]), ("GET", job["links"]["inputs"]["t1"]),
                         ("DELETE", job["links"]["self"])):
        response = client.request(method, path, headers=OTHER)
        assert (response.status_code, response.json()["error"]) == (404, "not_found")
    assert client.get(job["links"]["self"], headers=OWNER).json()["status"] == "queued"


@pytest.mark.parametrize("name", ["job.json", ".lock", "..%2Fjob.json", "mask.nii.gz", "preview_axial.png",
                                  "input_seg.nii.gz"])
def test_only_existing_job_files_are_served(client: TestClient, name: str) -> None:
    job = submit(client).json()
    response = client.get(f"{job['links']['self']}/files/{name}", headers=OWNER)
    assert response.status_code == 404


def test_delete_cancels_a_queued_job_then_deletes_it(app_parts: tuple[TestClient, RecordingQueue, LocalJobStore]
                                                     ) -> None:
    client, _, store = app_parts
    job = submit(client).json()
    cancelled = client.delete(job["links"]["self"], headers=OWNER)
    assert cancelled.status_code == 200
    assert (cancelled.json()["status"], cancelled.json()["finished_at"] is not None) == ("cancelled", True)
    assert client.delete(job["links"]["self"], headers=OWNER).status_code == 204
    assert client.get(job["links"]["self"], headers=OWNER).status_code == 404
    assert job_folders(store) == []


def test_unknown_job_ids_are_404(client: TestClient) -> None:
    for job_id in ("A" * 22, "..", "x" * 200):
        assert client.get(f"/v1/jobs/{job_id}", headers=OWNER).status_code == 404


# -- broker, readiness, models, metrics, expiry -------------------------------------------------

def test_unreachable_broker_gives_503_quickly_and_leaves_no_job(models: Path, tmp_path: Path) -> None:
    settings = settings_for(models, tmp_path / "jobs", broker_timeout_s=0.5)  # nothing listens on that port
    app = create_app(settings)
    with TestClient(app) as client:
        started = time.monotonic()
        response = submit(client)
        assert (response.status_code, response.json()["error"]) == (503, "service_unavailable")
        assert time.monotonic() - started < 20
        assert job_folders(app.state.store) == []
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["broker"].startswith("broker unreachable")


def test_ready_models_and_metrics(client: TestClient) -> None:
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"] == {"store": "ok", "broker": "ok", "models": "ok"}
    listed = client.get("/v1/models").json()
    assert listed["default"] == "unet3d"
    assert [(m["name"], m["version"], m["versions"]) for m in listed["models"]] == [("unet3d", "test-1", ["test-1"])]
    assert listed["models"][0]["label_map"] == {"0": 0, "1": 1, "2": 2, "3": 4}
    submit(client)
    text = client.get("/metrics").text
    assert 'segmenter_jobs_submitted_total{model="unet3d",source="files"} 1.0' in text
    assert client.get("/healthz").json() == {"status": "ok"}


def test_expired_jobs_are_swept_in_the_background(models: Path, tmp_path: Path) -> None:
    settings = settings_for(models, tmp_path / "jobs", job_ttl_s=0.5, expire_interval_s=0.2)
    with TestClient(create_app(settings, queue=RecordingQueue())) as client:
        job = submit(client).json()
        deadline = time.monotonic() + 10
        while client.get(job["links"]["self"], headers=OWNER).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.get(job["links"]["self"], headers=OWNER).status_code == 404
        assert 'segmenter_jobs_expired_total 1.0' in client.get("/metrics").text


# -- the trust boundary: internal token, owner hashes, Redis password ---------------------------

TOKEN = "segmenter-test-token-0123456789"
AUTH = {"X-Brainscan-Internal-Token": TOKEN}
REDIS_PASSWORD = "p@ss/word:1-long-enough"


@pytest.fixture()
def guarded(models: Path, tmp_path: Path) -> Iterator[TestClient]:
    """The API with an internal token, as deployed."""
    app = create_app(settings_for(models, tmp_path / "jobs", internal_token=TOKEN), queue=RecordingQueue())
    with TestClient(app) as client:
        yield client


def test_the_owner_header_alone_opens_nothing(guarded: TestClient) -> None:
    refused = submit(guarded)
    assert refused.status_code == 401 and refused.json()["error"] == "unauthorized"
    created = submit(guarded, headers={**OWNER, **AUTH})
    assert created.status_code == 202, created.text
    url = created.headers["location"]
    for headers in (OWNER, {**OWNER, "X-Brainscan-Internal-Token": TOKEN + "x"},
                    {**OWNER, "Authorization": "Bearer " + TOKEN[:-1]}, {**OWNER, "Authorization": TOKEN}):
        assert guarded.get(url, headers=headers).status_code == 401, headers
        assert guarded.delete(url, headers=headers).status_code == 401, headers
    assert guarded.get(url, headers={**OWNER, "Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert guarded.get(url, headers={**OTHER, **AUTH}).status_code == 404
    assert guarded.get("/metrics").status_code == 401 and guarded.get("/metrics", headers=AUTH).status_code == 200
    assert guarded.get("/healthz").status_code == 200 and guarded.get("/readyz").status_code == 200


def test_the_owner_header_needs_an_authenticated_request() -> None:
    """Defence in depth: even a route the guard let through unauthenticated would not honour the header."""
    from starlette.requests import Request

    from services.segmenter.app import NotInternalCallerError, get_owner

    request = Request({"type": "http", "headers": [], "state": {}})
    with pytest.raises(NotInternalCallerError, match="X-Brainscan-Internal-Token"):
        get_owner(request, "alice")
    request.state.internal_caller = True
    assert get_owner(request, "alice") == "alice"


@pytest.mark.parametrize(("secrets", "variable"), [
    ({}, "BRAINSCAN_INTERNAL_TOKEN"),
    ({"internal_token": TOKEN}, "BRAINSCAN_REDIS_PASSWORD"),
    ({"redis_password": REDIS_PASSWORD}, "BRAINSCAN_INTERNAL_TOKEN"),
])
def test_production_mode_refuses_to_start_without_a_secret(models: Path, tmp_path: Path, secrets: dict[str, str],
                                                             variable: str) -> None:
    from serving.internal_auth import MissingSecretError

    settings = settings_for(models, tmp_path / "jobs", environment="production", **secrets)
    with pytest.raises(MissingSecretError, match=f"{variable} is not set") as refused:
        create_app(settings, queue=RecordingQueue())
    assert f"{variable} to a long random value" in str(refused.value)
    assert "BRAINSCAN_ENV=development" in str(refused.value)


@pytest.mark.parametrize("redis_auth", [{"redis_password": REDIS_PASSWORD},
                                        {"broker_url": "redis://:its-own-password-123@127.0.0.1:1/0"}])
def test_production_mode_starts_with_both_secrets(models: Path, tmp_path: Path, redis_auth: dict[str, str]) -> None:
    settings = settings_for(models, tmp_path / "jobs", environment="production", internal_token=TOKEN, **redis_auth)
    with TestClient(create_app(settings, queue=RecordingQueue())) as client:
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers=AUTH).status_code == 200


def test_the_redis_password_is_only_in_the_urls_the_clients_use() -> None:
    import redis

    from services.segmenter.celery_app import celery_config

    settings = Settings(broker_url="redis://redis:6379/0", redis_password=REDIS_PASSWORD, internal_token=TOKEN)
    assert settings.broker_url == settings.backend_url == "redis://redis:6379/0"
    assert REDIS_PASSWORD not in repr(settings) and TOKEN not in repr(settings)
    url = settings.authenticated_broker_url
    assert url == settings.authenticated_backend_url == "redis://:p%40ss%2Fword%3A1-long-enough@redis:6379/0"
    assert redis.ConnectionPool.from_url(url).connection_kwargs["password"] == REDIS_PASSWORD
    config = celery_config(settings)
    assert (config["broker_url"], config["result_backend"]) == (url, url)
    own = Settings(broker_url="redis://:own-password@redis:6379/0", redis_password=REDIS_PASSWORD)
    assert own.authenticated_broker_url == "redis://:own-password@redis:6379/0"  # a URL's own password wins
    message = f"Error connecting to {url}; password {REDIS_PASSWORD}, token {TOKEN}"
    redacted = settings.redact(message)
    assert REDIS_PASSWORD not in redacted and "p%40ss" not in redacted and TOKEN not in redacted
    assert "redis://:***@redis:6379/0" in redacted


def test_settings_errors_never_show_a_password() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as refused:
        Settings(broker_url="amqp://user:hunter2-secret@rabbit:5672//")
    assert "hunter2-secret" not in str(refused.value) and "Redis URL" in str(refused.value)


def test_jobs_written_before_owner_hashing_are_hashed_at_start_up(models: Path, tmp_path: Path) -> None:
    store = LocalJobStore(tmp_path / "jobs")
    job_id = store.create("session:legacy-cookie-value", {"name": "unet3d", "arch": "unet3d", "version": "test-1",
                                                          "demo": True},
                          {"shape": list(SMALL_SHAPE), "spacing_mm": [1.0, 1.0, 1.0], "source": "files"})
    record_path = store.root / job_id / "job.json"
    record = json.loads(record_path.read_text())
    del record["owner_hash"]
    record["owner"] = "session:legacy-cookie-value"  # what job.json held before this change
    record_path.write_text(json.dumps(record))
    app = create_app(settings_for(models, store.root, internal_token=TOKEN), queue=RecordingQueue())
    with TestClient(app) as client:
        assert "legacy-cookie-value" not in record_path.read_text()
        owner = {"X-Brainscan-Owner": "session:legacy-cookie-value", **AUTH}
        assert client.get(f"/v1/jobs/{job_id}", headers=owner).status_code == 200
        assert client.get(f"/v1/jobs/{job_id}", headers={**OTHER, **AUTH}).status_code == 404


# -- the worker's job logic, called directly ----------------------------------------------------

@pytest.fixture()
def runner(app_parts: tuple[TestClient, RecordingQueue, LocalJobStore], models: Path) -> JobRunner:
    store = app_parts[2]
    settings = settings_for(models, store.root, progress_interval_s=0.0)
    return JobRunner(settings, store, ModelCache(settings))


def test_runner_segments_a_job_like_the_evaluation_path(app_parts: tuple[TestClient, RecordingQueue, LocalJobStore],
                                                        runner: JobRunner) -> None:
    from brainscan.data.brats import BratsCase, load_case
    from brainscan.inference.segmenter import segment_case
    from brainscan.metrics.segmentation import volumes_ml

    client, _, store = app_parts
    job = submit(client, MEDIUM).json()
    reports: list[dict[str, Any]] = []
    assert runner.run(job["id"], report=reports.append) == {"job_id": job["id"], "status": "succeeded"}
    body = client.get(job["links"]["self"], headers=OWNER).json()
    assert (body["status"], body["stage"], body["progress"], body["error"], body["attempts"]) == (
        "succeeded", "done", 1.0, None, 1)
    assert set(body["timings"]) == {"queue_s", "preprocess_s", "inference_s", "write_s", "total_s"}
    assert [h["stage"] for h in store.get(job["id"])["history"]] == [
        "queued", "preprocessing", "inference", "writing results", "done"]
    patches = [r["stage_detail"] for r in reports]
    assert len(patches) >= 2 and patches[-1].startswith(f"patch {patches[-1].split()[-1]} of")
    assert all(0.05 <= r["progress"] <= 0.95 for r in reports)

    mask_response = client.get(body["result"]["mask_url"], headers=OWNER)
    assert mask_response.status_code == 200
    mask_img = nib.Nifti1Image.from_bytes(gzip.decompress(mask_response.content))
    mask = np.asanyarray(mask_img.dataobj)
    flair = nib.Nifti1Image.from_bytes(gzip.decompress(MEDIUM["flair"]))
    assert mask.shape == MEDIUM_SHAPE and mask.dtype == np.uint8
    np.testing.assert_allclose(mask_img.affine, flair.affine, atol=1e-5)
    assert set(np.unique(mask).tolist()) <= {0, 1, 2, 4}
    # the service path and the evaluation path give the same mask and volumes
    paths = {m: store.path_for(job["id"], f"input_{m}.nii.gz") for m in MODALITIES}
    case = load_case(BratsCase("case", paths["flair"].parent, paths), with_seg=False)
    bundle = runner.models.get("unet3d", "test-1").bundle
    np.testing.assert_array_equal(mask, segment_case(bundle, case))
    expected = volumes_ml(mask, case.reference.spacing)
    assert body["result"]["volumes_ml"] == {k: pytest.approx(v, abs=1e-3) for k, v in expected.items()}
    assert body["result"]["labels"] == {"1": "NCR", "2": "ED", "4": "ET"}
    for url in body["result"]["previews"].values():
        png = client.get(url, headers=OWNER)
        assert png.headers["content-type"] == "image/png" and png.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_runner_skips_a_cancelled_job(app_parts: tuple[TestClient, RecordingQueue, LocalJobStore],
                                      runner: JobRunner) -> None:
    client, _, store = app_parts
    job = submit(client).json()
    client.delete(job["links"]["self"], headers=OWNER)
    assert runner.run(job["id"])["skipped"] is True
    assert store.get(job["id"])["status"] == "cancelled" and store.get(job["id"])["attempts"] == 0


def test_runner_stops_between_patches_when_cancelled(app_parts: tuple[TestClient, RecordingQueue, LocalJobStore],
                                                     runner: JobRunner) -> None:
    client, _, store = app_parts
    job = submit(client, MEDIUM).json()
    seen: list[str] = []

    def cancel_on_first_patch(meta: dict[str, Any]) -> None:
        seen.append(meta["stage_detail"])
        if len(seen) == 1:
            assert client.delete(job["links"]["self"], headers=OWNER).json()["status"] == "cancelled"

    assert runner.run(job["id"], report=cancel_on_first_patch)["status"] == "cancelled"
    record = store.get(job["id"])
    total = int(seen[0].split()[-1])
    assert len(seen) == 1 and total > 1  # it stopped after the first of several patches
    assert (record["status"], record["result"]) == ("cancelled", None)
    assert not store.path_for(job["id"], "mask.nii.gz").exists()


def test_runner_records_a_bad_input_as_a_failed_job(app_parts: tuple[TestClient, RecordingQueue, LocalJobStore],
                                                    runner: JobRunner) -> None:
    client, _, store = app_parts
    job = submit(client).json()
    store.path_for(job["id"], "input_t2.nii.gz").write_bytes(b"damaged on disk")
    assert runner.run(job["id"])["status"] == "failed"
    body = client.get(job["links"]["self"], headers=OWNER).json()
    assert body["status"] == "failed" and body["error"]["error"] == "unsupported_format"
    assert "input_t2" in body["error"]["detail"]


@pytest.mark.parametrize("damage, code", [
    (lambda path: path.write_bytes(_short_voxels(GOOD_VOLUMES["t2"])), "corrupt_file"),
    (lambda path: (path.unlink(), path.mkdir()), "internal_error"),
], ids=["voxels cut short", "input replaced by a folder"])
def test_failed_job_details_never_show_server_paths(app_parts: tuple[TestClient, RecordingQueue, LocalJobStore],
                                                    runner: JobRunner, tmp_path: Path, damage: Any, code: str) -> None:
    client, _, store = app_parts
    job = submit(client).json()
    damage(store.path_for(job["id"], "input_t2.nii.gz"))
    with contextlib.suppress(Exception):  # an internal error is recorded, then re-raised for Celery
        runner.run(job["id"])
    error = client.get(job["links"]["self"], headers=OWNER).json()["error"]
    assert error["error"] == code and "input_t2" in error["detail"]
    assert str(tmp_path) not in error["detail"], error["detail"]


def test_runner_restarts_a_redelivered_job_from_scratch(app_parts: tuple[TestClient, RecordingQueue, LocalJobStore],
                                                        runner: JobRunner) -> None:
    client, _, store = app_parts
    job = submit(client).json()
    store.transition(job["id"], "running", stage="inference", attempts=1, progress=0.4)  # its worker died here
    store.path_for(job["id"], "mask.nii.gz").write_bytes(b"half a mask")
    assert runner.run(job["id"])["status"] == "succeeded"
    record = store.get(job["id"])
    assert record["attempts"] == 2
    assert [h["status"] for h in record["history"]].count("running") >= 2
    assert nib.load(store.path_for(job["id"], "mask.nii.gz")).shape == SMALL_SHAPE


def test_runner_gives_up_after_max_attempts(app_parts: tuple[TestClient, RecordingQueue, LocalJobStore],
                                            runner: JobRunner) -> None:
    client, _, store = app_parts
    job = submit(client).json()
    store.transition(job["id"], "running", attempts=runner.settings.max_attempts)
    assert runner.run(job["id"])["status"] == "failed"
    assert store.get(job["id"])["error"]["error"] == "worker_lost"


class FlakyModels:
    """A model cache whose broker connection drops (a transient error)."""

    def get(self, arch: str, version: str) -> Any:
        raise RedisConnectionError("connection reset by peer")


@pytest.mark.parametrize("can_retry, status", [(True, "queued"), (False, "failed")], ids=["retry", "last try"])
def test_transient_errors_are_retried_then_fail(app_parts: tuple[TestClient, RecordingQueue, LocalJobStore],
                                                models: Path, can_retry: bool, status: str) -> None:
    client, _, store = app_parts
    job = submit(client).json()
    flaky = JobRunner(settings_for(models, store.root), store, FlakyModels())  # type: ignore[arg-type]
    if can_retry:
        with pytest.raises(RedisConnectionError):
            flaky.run(job["id"], can_retry=True)
    else:
        assert flaky.run(job["id"], can_retry=False)["status"] == "failed"
    record = store.get(job["id"])
    assert record["status"] == status
    if status == "failed":
        assert record["error"]["error"] == "transient_error"


class FixedMaskModels:
    """A model cache whose model is never called: the test replaces ``segment_case`` by a fixed mask."""

    def get(self, arch: str, version: str) -> LoadedSegmenter:
        return LoadedSegmenter(bundle=None, predict_fn=lambda batch: batch)


def _fixed_mask() -> np.ndarray:
    mask = np.zeros(SMALL_SHAPE, np.uint8)
    mask[6:12, 6:12, 4:8] = 2
    mask[8:11, 8:11, 5:7] = 1
    mask[9, 9, 5:7] = 4
    return mask


GOOD_2023 = {name: GOOD[modality] for name, modality in BRATS2023_MODALITIES.items()}
MASK_CONVENTIONS = {
    # upload -> (label convention of the job, enhancing tumour in the written mask, result labels)
    "2021 names": (GOOD, BRATS2021, 4, {"1": "NCR", "2": "ED", "4": "ET"}),
    "2023 names": (GOOD_2023, BRATS2023, 3, {"1": "NCR", "2": "ED", "3": "ET"}),
    "2023 zip": ({"case": brats2023_zip(GOOD)}, BRATS2023, 3, {"1": "NCR", "2": "ED", "3": "ET"}),
    "4d": ({"volume": stack_4d(GOOD)}, BRATS2021, 4, {"1": "NCR", "2": "ED", "4": "ET"}),
}


@pytest.mark.parametrize("fields, convention, enhancing, labels", MASK_CONVENTIONS.values(),
                         ids=MASK_CONVENTIONS.keys())
def test_runner_writes_the_mask_in_the_labels_of_the_upload(
        app_parts: tuple[TestClient, RecordingQueue, LocalJobStore], models: Path, monkeypatch: pytest.MonkeyPatch,
        fields: dict[str, bytes], convention: str, enhancing: int, labels: dict[str, str]) -> None:
    import brainscan.inference.segmenter as segment
    from brainscan.metrics.segmentation import volumes_ml

    mask = _fixed_mask()
    monkeypatch.setattr(segment, "segment_case", lambda bundle, case, **kwargs: mask.copy())
    client, _, store = app_parts
    job = submit(client, fields).json()
    assert job["input"]["label_convention"] == convention
    runner = JobRunner(settings_for(models, store.root), store, FixedMaskModels())  # type: ignore[arg-type]
    assert runner.run(job["id"])["status"] == "succeeded"
    body = client.get(job["links"]["self"], headers=OWNER).json()
    assert body["result"]["labels"] == labels
    written = nib.Nifti1Image.from_bytes(gzip.decompress(client.get(body["result"]["mask_url"], headers=OWNER).content))
    expected = np.where(mask == 4, enhancing, mask)
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), expected)
    # volumes are the tumour's, whatever the numbering of the file
    spacing = [float(z) for z in written.header.get_zooms()[:3]]
    assert body["result"]["volumes_ml"] == {k: pytest.approx(v, abs=1e-3) for k, v in volumes_ml(mask, spacing).items()}


# -- previews -----------------------------------------------------------------------------------

def _decode(png: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]  # RGB


def _ras_phantom() -> tuple[np.ndarray, np.ndarray]:
    """RAS volume (X=30 L->R, Y=40 P->A, Z=20 I->S): a bright block at anterior-right-superior, a tumour centre."""
    flair = np.full((30, 40, 20), 50.0, np.float32)
    flair[22:28, 30:38, 14:18] = 400.0  # right (high x), anterior (high y), superior (high z)
    mask = np.zeros(flair.shape, np.uint8)
    mask[13:17, 18:22, 8:12] = 2
    return flair, mask


def _bright_quadrant(image: np.ndarray) -> tuple[str, str]:
    grey = image.mean(axis=2)
    rows, cols = np.nonzero(grey > 200)
    vertical = "top" if rows.mean() < grey.shape[0] / 2 else "bottom"
    horizontal = "left" if cols.mean() < grey.shape[1] / 2 else "right"
    return vertical, horizontal


def test_previews_follow_radiological_orientation_whatever_the_file_order() -> None:
    flair, mask = _ras_phantom()
    ras = np.diag([1.0, 1.0, 1.0, 1.0])
    # the same anatomy stored LPS (x and y flipped) and with the axes permuted (z, x, y)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    permuted = np.array([[0, 1.0, 0, 0], [0, 0, 1.0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1]])
    layouts = {
        "ras": (flair, mask, ras),
        "lps": (flair[::-1, ::-1], mask[::-1, ::-1], lps),
        "zxy": (flair.transpose(2, 0, 1), mask.transpose(2, 0, 1), permuted),
    }
    rendered = {name: render_previews(f, m, affine, (1.0, 1.0, 1.0)) for name, (f, m, affine) in layouts.items()}
    for name in ("lps", "zxy"):
        assert rendered[name] == rendered["ras"], name
    # the planes cut through the tumour centre, where the bright block is not; cut through it instead
    block_mask = np.zeros_like(mask)
    block_mask[24, 33, 15] = 1
    images = {plane: _decode(png) for plane, png in render_previews(flair, block_mask, ras, (1, 1, 1)).items()}
    assert images["axial"].shape[:2] == (40, 30)
    assert _bright_quadrant(images["axial"]) == ("top", "left")      # anterior up, patient right on the left
    assert _bright_quadrant(images["coronal"]) == ("top", "left")    # superior up, patient right on the left
    assert _bright_quadrant(images["sagittal"]) == ("top", "left")   # superior up, anterior on the left


def test_previews_make_pixels_square_and_colour_the_labels() -> None:
    flair, mask = _ras_phantom()
    images = {p: _decode(png) for p, png in render_previews(flair, mask, np.eye(4), (1.0, 1.0, 2.0)).items()}
    assert images["coronal"].shape[:2] == (40, 30)  # 20 slices of 2 mm shown as 40 rows
    centre = images["axial"][40 - 20, 30 - 15]
    assert centre[1] > centre[0] and centre[1] > centre[2]  # edema (label 2) is drawn green


@pytest.mark.parametrize("mask, expected", [
    (np.zeros((10, 12, 8), np.uint8), (5, 6, 4)),
    (np.pad(np.ones((3, 3, 3), np.uint8), ((1, 6), (3, 6), (0, 5))), (2, 4, 1)),
], ids=["empty: volume centre", "tumour: centre of mass"])
def test_tumour_centre(mask: np.ndarray, expected: tuple[int, int, int]) -> None:
    assert tumour_centre(mask) == expected


def test_tumour_centre_is_ndimage_centre_of_mass() -> None:
    from scipy import ndimage

    rng = np.random.default_rng(5)
    for _ in range(50):
        mask = np.zeros((30, 40, 25), np.uint8)
        low = rng.integers(0, 20, 3)
        high = low + rng.integers(1, 10, 3)
        mask[low[0]:high[0], low[1]:high[1], low[2]:high[2]] = rng.choice([1, 2, 4])
        mask[rng.random(mask.shape) > 0.98] = 2
        centre = ndimage.center_of_mass(mask > 0)
        assert tumour_centre(np.asfortranarray(mask)) == tuple(
            int(min(max(round(c), 0), s - 1)) for c, s in zip(centre, mask.shape))


def test_tumour_centre_record_gives_voxel_and_world_position() -> None:
    mask = np.zeros((10, 12, 8), np.uint8)
    assert tumour_centre_record(mask, np.eye(4)) is None  # nothing segmented: no centre
    mask[6:9, 2:5, 1:4] = 2
    affine = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 239], [0, 0, 2.5, -40], [0, 0, 0, 1]])  # BraTS-like LPS, 2.5 mm slices
    record = tumour_centre_record(mask, affine)
    assert record == {"voxel": [7, 3, 2], "mm": [-7.0, 236.0, -35.0]}
    json.dumps(record)  # plain JSON for the job record


def test_previews_cut_through_the_given_centre_in_the_files_voxel_order() -> None:
    rng = np.random.default_rng(3)
    flair = rng.random((20, 24, 16)).astype(np.float32)
    mask = np.zeros((20, 24, 16), np.uint8)
    mask[3:7, 15:20, 2:6] = 2
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])  # x and y flipped on the way to RAS+
    default = render_previews(flair, mask, lps, (1.0, 1.0, 1.0))
    record = tumour_centre_record(mask, lps)
    assert render_previews(flair, mask, lps, (1.0, 1.0, 1.0), centre=record["voxel"]) == default
    elsewhere = render_previews(flair, mask, lps, (1.0, 1.0, 1.0), centre=(15, 5, 12))
    assert all(elsewhere[plane] != default[plane] for plane in default)


def test_job_record_is_plain_json(app_parts: tuple[TestClient, RecordingQueue, LocalJobStore]) -> None:
    client, _, store = app_parts
    job = submit(client).json()
    record = json.loads((store.root / job["id"] / "job.json").read_text())
    assert record["task_id"] == "task-1"
    assert "owner" not in record and record["owner_hash"] == owner_digest("alice")  # never the owner id itself


# -- the Celery task shell and configuration ----------------------------------------------------

def test_celery_task_called_directly_runs_the_job(app_parts: tuple[TestClient, RecordingQueue, LocalJobStore],
                                                  runner: JobRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.segmenter import worker

    client, _, store = app_parts
    monkeypatch.setattr(worker, "_runner", runner)
    job = submit(client).json()
    assert worker.segment(job["id"]) == {"job_id": job["id"], "status": "succeeded"}
    assert client.get(job["links"]["self"], headers=OWNER).json()["result"]["mask_url"].endswith("mask.nii.gz")


def test_hard_time_limit_is_recorded_as_a_failed_job(app_parts: tuple[TestClient, RecordingQueue, LocalJobStore],
                                                     runner: JobRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    from celery.exceptions import TimeLimitExceeded

    from services.segmenter import worker

    client, _, store = app_parts
    monkeypatch.setattr(worker, "_runner", runner)
    job = submit(client).json()
    store.transition(job["id"], "running", stage="inference")
    worker.segment.on_failure(TimeLimitExceeded(3600), "task-1", (job["id"],), {}, None)
    record = store.get(job["id"])
    assert (record["status"], record["error"]["error"]) == ("failed", "time_limit")


def test_celery_configuration_follows_the_delivery_guarantees(models: Path, tmp_path: Path) -> None:
    from services.segmenter.celery_app import celery_config

    config = celery_config(settings_for(models, tmp_path, time_limit_s=600, visibility_timeout_s=900,
                                        unacked_restore_interval_s=2, worker_concurrency=3))
    assert (config["task_acks_late"], config["task_reject_on_worker_lost"], config["worker_prefetch_multiplier"]) == (
        True, True, 1)
    assert config["broker_transport_options"]["visibility_timeout"] == 900
    assert config["broker_transport_options"]["unacked_restore_interval"] == 2
    assert config["broker_transport_options"]["unacked_restore_throttle"] == 1
    assert (config["task_time_limit"], config["task_soft_time_limit"]) == (600, 540)
    assert config["worker_concurrency"] == 3
    assert config["task_routes"]["segmenter.segment"]["queue"] == "segmentation"
    assert [queue.name for queue in config["task_queues"]] == ["segmentation"]


@pytest.mark.parametrize("overrides, message", [
    ({"time_limit_s": 3600, "visibility_timeout_s": 3000}, "visibility_timeout_s"),
    ({"time_limit_s": 100, "soft_time_limit_s": 200}, "soft_time_limit_s"),
    ({"broker_url": "amqp://localhost"}, "Redis URL"),
    ({"log_level": "LOUD"}, "log_level"),
])
def test_settings_refuse_inconsistent_values(overrides: dict[str, Any], message: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        Settings(**overrides)


def test_settings_read_the_shared_environment_names(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WORKER_CONCURRENCY", "2")
    monkeypatch.setenv("BRAINSCAN_MODELS", str(tmp_path / "store"))
    monkeypatch.setenv("SEGMENTER_MAX_UPLOAD_BYTES", "1234")
    settings = Settings()
    assert (settings.worker_concurrency, settings.models_root, settings.max_upload_bytes) == (
        2, tmp_path / "store", 1234)
    assert settings.backend_url == settings.broker_url == "redis://127.0.0.1:6379/0"
