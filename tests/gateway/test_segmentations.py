"""Gateway segmentation routes, against the REAL segmenter (API + Celery worker + Redis, subprocesses).

Covered: a phantom case through the gateway to a mask with the input's grid and affine; only
gateway URLs in bodies and headers; ownership (another browser session or API key sees 404 for the
job and its files, a client-sent X-Brainscan-Owner is ignored); the segmenter's 4xx passed through;
the streaming upload limit; cancel/delete; models and readiness; the trust boundary behind the
gateway (the segmenter API answers 401 without the internal token, also to a forged owner header;
job records hold only a hash of the owner; Redis refuses clients without its password; no secret
in logs or answers); and, without a segmenter, 503s, the session cookie, URL rewriting, OpenAPI
and metrics. Nothing is mocked: the segmentation bundle
is a tiny untrained (seeded) U-Net from tests.evaluation.make_segmenter_bundle.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
from fastapi.testclient import TestClient

from brainscan.labels import MODALITIES
from gateway.app import create_app
from gateway.ownership import OWNER_HEADER, SESSION_COOKIE, BrowserSessionMiddleware, key_owner
from gateway.segmentations import rewrite_job_urls
from gateway.settings import GatewaySettings
from services.segmenter.jobs import owner_digest
from tests.paths import BRATS_SAMPLE, needs_brats_sample
from tests.redis_server import RedisServer, needs_redis, redis_server
from tests.servers import INTERNAL_HEADERS, INTERNAL_TOKEN, REPO_ROOT, RunningServer, free_port, serve_uvicorn

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
REQUEST_ID = "gw-seg-0001"
PHANTOM_SHAPE = (48, 48, 32)
FINAL = ("succeeded", "failed", "cancelled")
API_KEYS = ("key-one", "key-two")
# The real gateway's segmentation limit in these tests: above the real BraTS case (~9.4 MB as .nii.gz).
TEST_SEGMENTATION_LIMIT = 16 * 1024 * 1024


def gateway_settings(segmenter_url: str, **overrides) -> GatewaySettings:
    base = {"classifier_url": f"http://127.0.0.1:{free_port()}", "segmenter_url": segmenter_url, "log_level": "WARNING",
            "internal_token": INTERNAL_TOKEN}
    return GatewaySettings(**{**base, **overrides})


# ---------------------------------------------------------------- the real segmentation stack


@dataclass
class SegmentationStack:
    """A running segmenter (API + worker + Redis) and a phantom case to send it."""

    segmenter: RunningServer
    worker: subprocess.Popen
    worker_log: Path
    case_files: dict[str, Path]
    redis: RedisServer
    jobs_dir: Path
    models: Path

    @property
    def url(self) -> str:
        return self.segmenter.url

    def reference(self) -> nib.Nifti1Image:
        """The phantom's flair volume: the grid and affine every output must have."""
        return nib.load(self.case_files["flair"])

    def upload(self, **replace: tuple[str, bytes, str]) -> dict[str, tuple[str, bytes, str]]:
        """The multipart ``files=`` of the case; ``replace`` swaps parts (e.g. ``t1=("t1.txt", b"...", ...)``)."""
        files = {m: (path.name, path.read_bytes(), "application/gzip") for m, path in self.case_files.items()}
        return {**files, **replace}

    def worker_log_tail(self, chars: int = 3000) -> str:
        try:
            return self.worker_log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@contextlib.contextmanager
def celery_worker(env: dict[str, str], log_dir: Path) -> Iterator[tuple[subprocess.Popen, Path]]:
    """The production worker command, as tests/segmenter/test_worker_integration.py runs it
    (``celery -A services.segmenter.worker worker -Q segmentation -c 1 -P prefork``), in a
    subprocess stopped with SIGTERM afterwards. Jobs sent before it is up wait in the queue."""
    log_path = log_dir / "worker.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2", **env}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), full_env.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "celery", "-A", "services.segmenter.worker", "worker", "-Q", "segmentation",
               "-c", "1", "-P", "prefork", "--loglevel", "WARNING", "--without-gossip", "--without-mingle"]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)
        try:
            yield process, log_path
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


@contextlib.contextmanager
def segmentation_stack(folder: Path, env: dict[str, str] | None = None) -> Iterator[SegmentationStack]:
    """Redis, the segmenter API and one worker, serving a tiny seeded U-Net bundle; and a phantom case.

    Args:
        folder: working folder (model store, job store, phantom, logs).
        env: more settings for the API and the worker (e.g. ``SEGMENTER_DICOMWEB_SERVERS``).
    """
    from brainscan.data.phantoms import write_brats_phantoms
    from tests.segmenter import make_segmenter_store

    # 32^3 patches with half overlap: a 48 x 48 x 32 phantom takes several patches (progress to see).
    models = make_segmenter_store(folder / "models", patch_size=(32, 32, 32), overlap=0.5)
    case = write_brats_phantoms(folder / "data", n=1, shape=PHANTOM_SHAPE)[0]
    case_files = {m: case / f"{case.name}_{m}.nii.gz" for m in MODALITIES}
    with redis_server(folder / "redis") as redis:
        env = {"BRAINSCAN_MODELS": str(models), "SEGMENTER_BROKER_URL": redis.url,
               "SEGMENTER_JOBS_DIR": str(folder / "jobs"), "SEGMENTER_LOG_LEVEL": "WARNING",
               "SEGMENTER_WARMUP": "false", **(env or {})}
        with celery_worker(env, folder) as (worker, worker_log), \
                serve_uvicorn("services.segmenter.app:app", env=env, ready_path="/readyz", log_dir=folder) as api:
            yield SegmentationStack(api, worker, worker_log, case_files, redis, folder / "jobs", models)


def wait_for_job(client: httpx.Client | TestClient, url: str, stack: SegmentationStack, *,
                 timeout_s: float = 90.0, headers: dict[str, str] | None = None) -> dict:
    """Poll ``url`` until the job is final; fails with the worker's log when it never gets there."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        response = client.get(url, headers=headers)
        assert response.status_code == 200, response.text
        job = response.json()
        if job["status"] in FINAL:
            return job
        assert stack.worker.poll() is None, f"the worker died\n{stack.worker_log_tail()}"
        time.sleep(0.25)
    pytest.fail(f"job not final after {timeout_s:g} s: {job}\n--- worker log ---\n{stack.worker_log_tail()}")


def job_urls(value) -> list[str]:
    """Every string in a JSON value that looks like a URL path."""
    if isinstance(value, str):
        return [value] if value.startswith("/") or "://" in value else []
    if isinstance(value, dict):
        return [url for item in value.values() for url in job_urls(item)]
    if isinstance(value, list):
        return [url for item in value for url in job_urls(item)]
    return []


def nifti_from_bytes(raw: bytes) -> nib.Nifti1Image:
    data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    return nib.Nifti1Image.from_bytes(data)


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[SegmentationStack]:
    if not (REPO_ROOT / "services" / "segmenter" / "app.py").is_file():
        pytest.skip("the segmenter service (services/segmenter/app.py) is not in this tree")
    with segmentation_stack(tmp_path_factory.mktemp("segmentation")) as running:
        yield running


@contextlib.contextmanager
def serve_gateway(stack: SegmentationStack, log_dir: Path) -> Iterator[RunningServer]:
    """The real gateway process in front of the segmenter (no classifier: its URL is a closed port)."""
    env = {"GATEWAY_SEGMENTER_URL": stack.url, "GATEWAY_CLASSIFIER_URL": f"http://127.0.0.1:{free_port()}",
           "GATEWAY_MAX_SEGMENTATION_UPLOAD_BYTES": str(TEST_SEGMENTATION_LIMIT), "GATEWAY_LOG_LEVEL": "WARNING"}
    with serve_uvicorn("gateway.app:app", env=env, ready_path="/api/health", log_dir=log_dir) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(stack, tmp_path_factory) -> Iterator[RunningServer]:
    with serve_gateway(stack, tmp_path_factory.mktemp("gateway-logs")) as server:
        yield server


@pytest.fixture
def browser_session(gateway) -> Iterator[Callable[[], httpx.Client]]:
    """``browser_session()``: a new client with its own cookie jar (a separate browser session)."""
    clients = []

    def _new() -> httpx.Client:
        client = httpx.Client(base_url=gateway.url, timeout=30, trust_env=False)
        clients.append(client)
        return client

    yield _new
    for client in clients:
        client.close()


@pytest.fixture(scope="module")
def finished_job(stack, gateway):
    """One phantom case segmented through the gateway: (owner's client, 202 response, final job)."""
    client = httpx.Client(base_url=gateway.url, timeout=30, trust_env=False)
    created = client.post("/api/v1/segmentations", files=stack.upload(), headers={"X-Request-ID": REQUEST_ID})
    assert created.status_code == 202, created.text
    job = wait_for_job(client, created.headers["location"], stack)
    yield client, created, job
    client.close()


# ---------------------------------------------------------------- through the gateway


@needs_redis
def test_phantom_case_through_the_gateway_gives_a_mask_on_the_input_grid(finished_job, stack):
    client, created, job = finished_job
    body = created.json()
    assert body["status"] == "queued"
    assert created.headers["location"] == f"/api/v1/segmentations/{body['id']}" == body["links"]["self"]
    assert SESSION_COOKIE in created.cookies
    assert job["status"] == "succeeded", job
    assert job["input"]["shape"] == list(PHANTOM_SHAPE)

    mask = client.get(job["result"]["mask_url"])
    assert mask.status_code == 200
    assert mask.headers["content-type"] == "application/gzip"
    assert 'filename="mask.nii.gz"' in mask.headers["content-disposition"]
    assert int(mask.headers["content-length"]) == len(mask.content)
    image = nifti_from_bytes(mask.content)
    reference = stack.reference()
    assert image.shape == reference.shape == PHANTOM_SHAPE
    np.testing.assert_allclose(image.affine, reference.affine, atol=1e-4)
    assert set(np.unique(np.asarray(image.dataobj))) <= {0, 1, 2, 4}
    assert_tumour_centre(job["result"]["tumour_centre"], image)

    for plane, url in job["result"]["previews"].items():
        preview = client.get(url)
        assert preview.status_code == 200, plane
        assert preview.headers["content-type"] == "image/png" and preview.content[:8] == b"\x89PNG\r\n\x1a\n"
    flair = client.get(job["links"]["inputs"]["flair"])
    assert nifti_from_bytes(flair.content).shape == PHANTOM_SHAPE


@needs_redis
@needs_brats_sample
def test_real_brats_case_through_the_gateway_lands_on_its_grid(stack, browser_session):
    """BraTS2021_00006 (240 x 240 x 155, LPS affine) uploaded as four files; the mask comes back on its grid."""
    client = browser_session()
    files = {m: (f"{BRATS_SAMPLE.name}_{m}.nii.gz", (BRATS_SAMPLE / f"{BRATS_SAMPLE.name}_{m}.nii.gz").read_bytes(),
                 "application/gzip") for m in MODALITIES}
    created = client.post("/api/v1/segmentations", files=files)
    assert created.status_code == 202, created.text
    job = wait_for_job(client, created.headers["location"], stack, timeout_s=300)
    assert job["status"] == "succeeded", job
    assert job["input"]["shape"] == [240, 240, 155]
    image = nifti_from_bytes(client.get(job["result"]["mask_url"]).content)
    reference = nib.load(str(BRATS_SAMPLE / f"{BRATS_SAMPLE.name}_flair.nii.gz"))
    assert image.shape == reference.shape == (240, 240, 155)
    np.testing.assert_allclose(image.affine, reference.affine, atol=1e-4)
    assert set(np.unique(np.asarray(image.dataobj))) <= {0, 1, 2, 4}
    assert set(job["result"]["volumes_ml"]) == {"WT", "TC", "ET", "NCR", "ED"}
    assert_tumour_centre(job["result"]["tumour_centre"], image)


def assert_tumour_centre(centre: dict | None, mask: nib.Nifti1Image) -> None:
    """The result's tumour centre is the returned mask's centre of mass, in voxels and in world mm."""
    labels = np.asarray(mask.dataobj)
    if not labels.any():
        assert centre is None
        return
    from scipy import ndimage

    expected = np.rint(ndimage.center_of_mass(labels > 0))
    np.testing.assert_array_equal(centre["voxel"], expected)
    np.testing.assert_allclose(centre["mm"], nib.affines.apply_affine(mask.affine, expected), atol=0.01)


@needs_redis
def test_bodies_and_headers_hold_only_gateway_urls(finished_job):
    _, created, job = finished_job
    urls = job_urls(created.json()) + job_urls(job) + [created.headers["location"]]
    assert len(urls) >= 1 + 4 + 1 + 3  # self, four inputs, mask, three previews
    prefix = f"/api/v1/segmentations/{job['id']}"
    assert all(url.startswith(prefix) for url in urls), urls
    assert "/v1/jobs" not in json.dumps(job)


@needs_redis
@pytest.mark.parametrize("what", ["job", "mask", "input", "preview", "delete"])
@pytest.mark.parametrize("forged_owner", [False, True])
def test_another_browser_session_sees_404(finished_job, browser_session, what, forged_owner):
    owner_client, _, job = finished_job
    stranger = browser_session()
    headers = {}
    if forged_owner:
        # The owner id the segmenter stores for the job's session: a client must not be able to claim it.
        headers[OWNER_HEADER] = f"session:{owner_client.cookies[SESSION_COOKIE]}"
    url = {"job": job["links"]["self"], "mask": job["result"]["mask_url"], "input": job["links"]["inputs"]["t1"],
           "preview": job["result"]["previews"]["axial"], "delete": job["links"]["self"]}[what]
    response = stranger.request("DELETE" if what == "delete" else "GET", url, headers=headers)
    assert response.status_code == 404, response.text
    assert response.json()["error"] == "not_found"
    assert owner_client.get(job["links"]["self"]).json()["status"] == "succeeded"  # still there for its owner


@needs_redis
def test_an_owner_header_from_the_client_is_ignored(finished_job):
    client, _, job = finished_job
    response = client.get(job["links"]["self"], headers={OWNER_HEADER: "session:someone-else"})
    assert response.status_code == 200
    assert response.json()["id"] == job["id"]


@needs_redis
def test_api_keys_are_separate_owners(stack):
    settings = gateway_settings(stack.url, api_keys=",".join(API_KEYS))
    with TestClient(create_app(settings)) as client:
        one, two = ({"X-API-Key": key} for key in API_KEYS)
        assert client.post("/api/v1/segmentations", files=stack.upload()).status_code == 401
        created = client.post("/api/v1/segmentations", files=stack.upload(), headers=one)
        assert created.status_code == 202, created.text
        url = created.headers["location"]
        client.cookies.clear()  # only the key may decide, not the session cookie this client got
        job = wait_for_job(client, url, stack, headers=one)
        assert job["status"] == "succeeded"
        assert client.get(url, headers=two).status_code == 404
        assert client.get(job["result"]["mask_url"], headers=two).status_code == 404
        assert client.get(url).status_code == 401
        # The gateway sends the key's owner id, never the key; the job record keeps only a hash of that.
        direct = httpx.get(f"{stack.url}/v1/jobs/{job['id']}",
                           headers={OWNER_HEADER: key_owner(API_KEYS[0]), **INTERNAL_HEADERS})
        assert direct.status_code == 200
        record = (stack.jobs_dir / job["id"] / "job.json").read_text()
        assert API_KEYS[0] not in record and key_owner(API_KEYS[0]) not in record
        assert json.loads(record)["owner_hash"] == owner_digest(key_owner(API_KEYS[0]))
        assert client.delete(url, headers=one).status_code == 204
        assert client.get(url, headers=one).status_code == 404


@needs_redis
@pytest.mark.parametrize(("replace", "status", "code"), [
    ({"t1": ("t1.nii.gz", b"these are notes, not a scan\n" * 20, "text/plain")}, 415, "unsupported_format"),
    ({"t1": ("t1.nii.gz", b"", "application/gzip")}, 400, "empty_input"),
])
def test_bad_input_gets_the_segmenters_answer(stack, gateway, browser_session, replace, status, code):
    files = stack.upload(**replace)
    via_gateway = browser_session().post("/api/v1/segmentations", files=files, headers={"X-Request-ID": REQUEST_ID})
    direct = httpx.post(f"{stack.url}/v1/jobs", files=files, timeout=30,
                        headers={"X-Request-ID": REQUEST_ID, OWNER_HEADER: "session:direct", **INTERNAL_HEADERS})
    assert via_gateway.status_code == direct.status_code == status, via_gateway.text
    assert via_gateway.json() == direct.json()
    assert via_gateway.json()["error"] == code


@needs_redis
def test_missing_modality_is_422(stack, browser_session):
    files = {m: part for m, part in stack.upload().items() if m != "flair"}
    response = browser_session().post("/api/v1/segmentations", files=files)
    assert response.status_code == 422
    assert response.json()["error"] == "missing_modality"


@needs_redis
def test_chunked_upload_over_the_limit_is_cut_off_while_streaming(gateway):
    """No Content-Length, 256 MiB if sent in full, against the gateway's 16 MiB segmentation limit."""
    total_chunks, yielded = 4096, 0

    def body():
        nonlocal yielded
        for _ in range(total_chunks):
            yielded += 1
            yield b"x" * 65536

    response = httpx.post(f"{gateway.url}/api/v1/segmentations", content=body(), timeout=30, trust_env=False,
                          headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert response.status_code == 413
    assert response.json()["error"] == "too_large"
    assert yielded < total_chunks // 4, f"generator yielded {yielded} of {total_chunks} chunks"


@needs_redis
def test_cancel_then_delete(stack, browser_session):
    client = browser_session()
    created = client.post("/api/v1/segmentations", files=stack.upload())
    assert created.status_code == 202
    url = created.headers["location"]
    cancelled = client.delete(url)
    # 200 with the cancelled job, or 204 when the worker had already finished it (then it is gone).
    assert cancelled.status_code in (200, 204), cancelled.text
    if cancelled.status_code == 200:
        assert cancelled.json()["status"] == "cancelled"
        assert cancelled.json()["links"]["self"] == url
        assert client.get(url).json()["status"] == "cancelled"
        assert client.delete(url).status_code == 204
    assert client.get(url).status_code == 404


@needs_redis
def test_models_and_readiness_include_the_segmenter(stack, browser_session):
    client = browser_session()
    models = client.get("/api/v1/segmentation-models")
    assert models.status_code == 200
    assert models.json() == httpx.get(f"{stack.url}/v1/models", headers=INTERNAL_HEADERS, timeout=10).json()
    assert [m["name"] for m in models.json()["models"]] == ["unet3d"]
    ready = client.get("/api/ready").json()
    assert ready["services"]["segmenter"]["status"] == "ready"
    assert ready["services"]["classifier"]["status"] == "unreachable"



# ---------------------------------------------------------------- the trust boundary behind the gateway


@needs_redis
@pytest.mark.parametrize("what", ["job", "mask", "input", "delete", "submit", "models", "metrics"])
@pytest.mark.parametrize("token", [None, "a-wrong-token-of-decent-length"])
def test_segmenter_api_answers_401_without_the_internal_token(finished_job, stack, what, token):
    """Whoever reaches the segmenter's port, forging the owner header of a real job, gets 401, not the job."""
    owner_client, _, job = finished_job
    forged = {OWNER_HEADER: f"session:{owner_client.cookies[SESSION_COOKIE]}"}
    if token is not None:
        forged["X-Brainscan-Internal-Token"] = token
    base = f"{stack.url}/v1/jobs/{job['id']}"
    method, url = {"job": ("GET", base), "mask": ("GET", f"{base}/files/mask.nii.gz"),
                   "input": ("GET", f"{base}/files/input_t1.nii.gz"), "delete": ("DELETE", base),
                   "submit": ("POST", f"{stack.url}/v1/jobs"), "models": ("GET", f"{stack.url}/v1/models"),
                   "metrics": ("GET", f"{stack.url}/metrics")}[what]
    files = stack.upload() if what == "submit" else None
    response = httpx.request(method, url, headers=forged, files=files, timeout=30)
    assert response.status_code == 401, response.text
    body = response.json()
    assert body["error"] == "unauthorized" and "X-Brainscan-Internal-Token" in body["detail"]
    assert body["request_id"] and job["id"] not in response.text
    assert owner_client.get(job["links"]["self"]).json()["status"] == "succeeded"  # untouched


@needs_redis
def test_segmenter_probes_stay_open_and_say_nothing_secret(stack):
    for path in ("/healthz", "/readyz"):
        response = httpx.get(stack.url + path, timeout=10)
        assert response.status_code == 200, response.text
        assert stack.redis.password not in response.text and INTERNAL_TOKEN not in response.text


@needs_redis
def test_job_records_hold_no_raw_session_cookie(finished_job, stack):
    owner_client, _, job = finished_job
    cookie = owner_client.cookies[SESSION_COOKIE]
    record = (stack.jobs_dir / job["id"] / "job.json").read_text()
    assert cookie not in record and "session:" not in record
    assert json.loads(record)["owner_hash"] == owner_digest(f"session:{cookie}")
    every_file = b"".join(path.read_bytes() for path in stack.jobs_dir.rglob("*") if path.is_file())
    assert cookie.encode() not in every_file


@needs_redis
def test_redis_refuses_clients_without_its_password(stack):
    import redis

    for url in (stack.redis.url_without_password, f"redis://:wrong-password@127.0.0.1:{stack.redis.port}/0"):
        client = redis.Redis.from_url(url, socket_timeout=5)
        with pytest.raises(redis.exceptions.AuthenticationError):
            client.llen("segmentation")
        client.close()
    assert redis.Redis.from_url(stack.redis.url, socket_timeout=5).ping()


@needs_redis
def test_a_wrong_redis_password_is_reported_without_the_password(stack, tmp_path):
    """The segmenter API's readiness names the failure, never the password it tried (nor the real one)."""
    from services.segmenter.app import create_app as create_segmenter_app
    from services.segmenter.settings import Settings

    wrong = "not-the-redis-password-123"
    settings = Settings(models_root=stack.models, jobs_dir=tmp_path / "jobs", broker_timeout_s=2.0,
                        broker_url=f"redis://127.0.0.1:{stack.redis.port}/0", redis_password=wrong)
    with TestClient(create_segmenter_app(settings)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    assert "refused the password" in response.json()["checks"]["broker"]
    assert "BRAINSCAN_REDIS_PASSWORD" in response.json()["detail"]
    assert wrong not in response.text and stack.redis.password not in response.text


@needs_redis
def test_no_secret_reaches_a_log(finished_job, stack):
    logs = stack.segmenter.log_tail(1_000_000) + stack.worker_log_tail(1_000_000)
    assert logs.strip(), "expected the services to have logged something"
    assert stack.redis.password not in logs and INTERNAL_TOKEN not in logs
    assert finished_job[0].cookies[SESSION_COOKIE] not in logs



# ---------------------------------------------------------------- without a segmenter


@pytest.mark.parametrize(("value", "expected"), [
    ("/v1/jobs/abc", "/api/v1/segmentations/abc"),
    ("/v1/jobs/abc/files/mask.nii.gz", "/api/v1/segmentations/abc/files/mask.nii.gz"),
    ("http://seg:8102/v1/jobs/abc", "/api/v1/segmentations/abc"),
    ("http://other:1/v1/jobs/abc", "http://other:1/v1/jobs/abc"),
    ("see /v1/jobs/abc", "see /v1/jobs/abc"),
    ("/v1/models", "/v1/models"),
    ({"a": ["/v1/jobs/x", {"b": "/v1/jobs/y/files/z"}], "n": 3, "none": None},
     {"a": ["/api/v1/segmentations/x", {"b": "/api/v1/segmentations/y/files/z"}], "n": 3, "none": None}),
])
def test_rewrite_job_urls(value, expected):
    assert rewrite_job_urls(value, "/api/v1/segmentations/", "http://seg:8102") == expected


@pytest.mark.parametrize(("base_url", "path", "cookie", "expect_new", "secure"), [
    ("http://testserver", "/", None, True, False),
    ("http://testserver", "/api/health", None, True, False),
    ("https://testserver", "/api/health", None, True, True),
    ("http://testserver", "/api/health", "x" * 43, False, False),
    ("http://testserver", "/api/health", "too-short", True, False),
    ("http://testserver", "/api/health", "x" * 42 + "!", True, False),
])
def test_session_cookie_is_issued_when_absent(base_url, path, cookie, expect_new, secure):
    app = create_app(gateway_settings(""))
    with TestClient(app, base_url=base_url) as client:
        headers = {"Cookie": f"{SESSION_COOKIE}={cookie}"} if cookie else {}
        response = client.get(path, headers=headers)
    set_cookie = response.headers.get("set-cookie")
    assert (set_cookie is not None) is expect_new
    if expect_new:
        name, _, rest = set_cookie.partition("=")
        value, *attributes = [part.strip() for part in rest.split(";")]
        assert name == SESSION_COOKIE
        assert len(value) == 43 and value != cookie
        assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= set(attributes)
        assert ("Secure" in attributes) is secure


def test_session_ids_are_unique():
    ids = set()
    with TestClient(create_app(gateway_settings(""))) as client:
        for _ in range(20):
            client.cookies.clear()
            ids.add(client.get("/api/health").cookies[SESSION_COOKIE])
    assert len(ids) == 20


def test_owner_ids_of_keys_are_hashed():
    owner = key_owner("key-one")
    assert owner.startswith("key:") and len(owner) == 4 + 24 and "key-one" not in owner
    assert key_owner("key-two") != owner
    with pytest.raises(ValueError, match="api_key"):
        key_owner("")


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/api/v1/segmentations"),
    ("GET", "/api/v1/segmentations/AAAAAAAAAAAAAAAAAAAAAA"),
    ("GET", "/api/v1/segmentations/AAAAAAAAAAAAAAAAAAAAAA/files/mask.nii.gz"),
    ("DELETE", "/api/v1/segmentations/AAAAAAAAAAAAAAAAAAAAAA"),
    ("GET", "/api/v1/segmentation-models"),
])
@pytest.mark.parametrize("segmenter_url", ["", "down"])
def test_segmenter_not_configured_or_down_is_503(method, path, segmenter_url):
    url = f"http://127.0.0.1:{free_port()}" if segmenter_url == "down" else ""
    with TestClient(create_app(gateway_settings(url))) as client:
        files = {"t1": ("t1.nii.gz", b"\x1f\x8b" + bytes(100), "application/gzip")} if method == "POST" else None
        response = client.request(method, path, files=files)
        ready = client.get("/api/ready").json()["services"]["segmenter"]["status"]
    assert response.status_code == 503, response.text
    body = response.json()
    assert body["error"] == "service_unavailable"
    assert ("GATEWAY_SEGMENTER_URL" in body["detail"]) is (segmenter_url == "")
    assert ready == ("not configured" if segmenter_url == "" else "unreachable")


@pytest.mark.parametrize(("path", "status", "code"), [
    ("/api/v1/segmentations/short", 404, "not_found"),
    ("/api/v1/segmentations/..%2F..%2Fetc", 404, "not_found"),
    ("/api/v1/segmentations/AAAAAAAAAAAAAAAAAAAAAA/files/..%2Fjob.json", 404, "not_found"),
    ("/api/v1/segmentations/AAAAAAAAAAAAAAAAAAAAAA/files/.hidden", 404, "not_found"),
])
def test_odd_ids_and_names_are_refused_by_the_gateway(path, status, code):
    # The segmenter is down: an answer other than 503 proves the gateway decided without it.
    with TestClient(create_app(gateway_settings(f"http://127.0.0.1:{free_port()}"))) as client:
        response = client.get(path)
    assert response.status_code == status
    assert response.json()["error"] == code


def test_declared_length_over_the_segmentation_limit_is_413_without_the_segmenter():
    settings = gateway_settings(f"http://127.0.0.1:{free_port()}", max_segmentation_upload_bytes=1000)
    with TestClient(create_app(settings)) as client:
        response = client.post("/api/v1/segmentations", files={"t1": ("t1.nii", bytes(5000), "application/octet-stream")},
                               headers={"X-Request-ID": REQUEST_ID})
    assert response.status_code == 413
    body = response.json()
    assert body["error"] == "too_large" and body["request_id"] == REQUEST_ID and ".nii.gz" in body["detail"]


def test_segmentation_limit_is_separate_from_the_classification_limit():
    settings = gateway_settings("")
    assert settings.max_segmentation_upload_bytes == 600 * 1024 * 1024
    assert settings.max_segmentation_upload_bytes > settings.max_upload_bytes
    with pytest.raises(ValueError, match="max_segmentation_upload_bytes"):
        gateway_settings("", max_segmentation_upload_bytes=0)


def test_not_multipart_is_415():
    with TestClient(create_app(gateway_settings(f"http://127.0.0.1:{free_port()}"))) as client:
        response = client.post("/api/v1/segmentations", content=b"{}", headers={"Content-Type": "application/json"})
    assert response.status_code == 415
    assert response.json()["error"] == "unsupported_media_type"


def test_openapi_documents_the_segmentation_routes():
    with TestClient(create_app(gateway_settings(""))) as client:
        schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    create = paths["/api/v1/segmentations"]["post"]
    assert {"t1", "t1ce", "t2", "flair", "case", "volume"} <= set(
        create["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"])
    for status in ("202", "413", "415", "422", "503"):
        assert "example" in create["responses"][status]["content"]["application/json"], status
    examples = paths["/api/v1/segmentations/{job_id}"]["get"]["responses"]["200"]["content"]["application/json"]
    assert {"running", "succeeded", "failed"} <= set(examples["examples"])
    assert "404" in paths["/api/v1/segmentations/{job_id}/files/{name}"]["get"]["responses"]
    assert {"200", "204", "404"} <= set(paths["/api/v1/segmentations/{job_id}"]["delete"]["responses"])
    assert "/api/v1/segmentation-models" in paths
    assert "/v1/jobs/" not in json.dumps(paths)


def test_metrics_label_segmentation_routes_by_template():
    with TestClient(create_app(gateway_settings(""))) as client:
        client.get("/api/v1/segmentations/AAAAAAAAAAAAAAAAAAAAAA")
        text = client.get("/metrics").text
    assert 'route="/api/v1/segmentations/{job_id}",status="503"' in text
    assert "AAAAAAAAAAAAAAAAAAAAAA" not in text


def test_middleware_drops_client_owner_headers_and_records_the_session():
    seen = {}

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        seen["headers"] = [name for name, _ in scope["headers"]]
        seen["session_id"] = scope["state"]["session_id"]
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    session = "s" * 43
    client = TestClient(BrowserSessionMiddleware(app))  # no lifespan: a bare ASGI app
    response = client.get("/", headers={OWNER_HEADER: "session:victim", "x-BRAINSCAN-owner": "key:x",
                                        "Cookie": f"other=1; {SESSION_COOKIE}={session}"})
    assert response.status_code == 204
    assert b"x-brainscan-owner" not in seen["headers"]
    assert seen["session_id"] == session
    assert "set-cookie" not in response.headers
