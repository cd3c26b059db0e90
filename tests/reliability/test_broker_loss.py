"""Losing the broker (issue #15, item 4), through the real stack: a password-protected ``redis-server``
with its append-only file, a prefork Celery worker (the production command), and the classifier,
the segmenter API and the gateway as uvicorn subprocesses (tests/servers.py).

The attack: Redis SIGKILLed while a job runs and another waits. It used to leave the running job
"queued - retrying after a transient error" for the broker's 2 h visibility timeout. Now:

- while Redis is down, the gateway's ``/api/ready`` answers 503 JSON with ``Retry-After`` naming
  the segmenter's broker, a segmentation upload answers 503 JSON with ``Retry-After`` and stores
  nothing, classification answers 200, the jobs stay readable, and no process exits;
- Redis back on its port with its append-only file: the running job finishes (it never needed
  Redis), the waiting one starts within :data:`RECONNECT_BOUND_S` of Redis' return or of the
  worker becoming free, both once (``attempts`` 1), with the masks of the in-process evaluation path;
- Redis back WITHOUT its data (the waiting job's message is gone): the segmenter API's reconciler
  sends it again, and it finishes within the same bound, once.

The bounds are the ones docs/OPERATIONS.md ("Losing the broker") states, plus slack for this
machine's two shared cores.
"""

from __future__ import annotations

import gzip
import os
import secrets
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import nibabel as nib
import numpy as np
import pytest

from brainscan.labels import KAGGLE_CLASSES, MODALITIES
from services.segmenter.jobs import parse_iso
from services.segmenter.store import LocalJobStore
from tests.redis_server import RedisServer, needs_redis
from tests.reliability.test_load_and_faults import Worker, start_redis_on, start_worker
from tests.reliability.test_worker_loss import FAST_RECOVERY_ENV
from tests.servers import RunningServer, serve_uvicorn

pytestmark = [needs_redis, pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

#: a worker retries its broker connection after 2, 4, 6, ... at most 30 s (kombu), so it is back
#: within 30 s of Redis; plus slack for this loaded machine
RECONNECT_BOUND_S = 30.0
SLACK_S = 15.0
JOB_TIMEOUT_S = 300.0
LONG_SHAPE = (128, 128, 96)
SMALL_SHAPE = (48, 48, 32)
FINAL = ("succeeded", "failed", "cancelled")


@dataclass
class Stack:
    """The running stack; ``redis`` is replaced when a test restarts it."""

    gateway: RunningServer
    segmenter: RunningServer
    classifier: RunningServer
    worker: Worker
    redis: RedisServer
    root: Path
    models: Path
    long_case: Path
    small_cases: list[Path]

    @property
    def jobs(self) -> LocalJobStore:
        return LocalJobStore(self.root / "jobs")

    def processes_alive(self) -> dict[str, bool]:
        return {"gateway": self.gateway.process.poll() is None, "segmenter": self.segmenter.process.poll() is None,
                "classifier": self.classifier.process.poll() is None, "worker": self.worker.process.poll() is None}

    def kill_redis(self) -> None:
        os.kill(self.redis.process.pid, signal.SIGKILL)
        self.redis.process.wait(timeout=30)

    def start_redis(self, folder: Path) -> datetime:
        """Redis again on the same port with the same password, its files in ``folder``; returns when it answered."""
        self.redis = start_redis_on(folder, port=self.redis.port, password=self.redis.password)
        return datetime.now(timezone.utc)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from brainscan.data.phantoms import write_brats_phantoms
    from tests.bundles import make_classifier_store
    from tests.segmenter import make_segmenter_store

    root = tmp_path_factory.mktemp("broker-loss")
    models = make_classifier_store(root / "models", archs=("resnet50",))
    make_segmenter_store(models, patch_size=(32, 32, 32), overlap=0.5)
    long_case = write_brats_phantoms(root / "long", n=1, seed=12, shape=LONG_SHAPE)[0]
    small_cases = write_brats_phantoms(root / "small", n=3, seed=11, shape=SMALL_SHAPE)
    redis = start_redis_on(root / "redis", password="broker-loss-" + secrets.token_hex(12))
    env = {"BRAINSCAN_MODELS": str(models), "SEGMENTER_BROKER_URL": redis.url, "SEGMENTER_JOBS_DIR": str(root / "jobs"),
           "SEGMENTER_WARMUP": "false", "SEGMENTER_PROGRESS_INTERVAL_S": "0.2", **FAST_RECOVERY_ENV}
    worker = start_worker(env, root / "worker.log")
    holder: list[Stack] = []
    try:
        with serve_uvicorn("services.classifier.app:app", env={"BRAINSCAN_MODELS": str(models)}, ready_path="/readyz",
                           log_dir=root) as classifier, \
                serve_uvicorn("services.segmenter.app:app", env=env, ready_path="/readyz", log_dir=root) as segmenter, \
                serve_uvicorn("gateway.app:app", env={"GATEWAY_CLASSIFIER_URL": classifier.url,
                                                      "GATEWAY_SEGMENTER_URL": segmenter.url},
                              ready_path="/api/ready", log_dir=root) as gateway:
            worker.wait_ready(processes=1)
            holder.append(Stack(gateway, segmenter, classifier, worker, redis, root, models, long_case, small_cases))
            yield holder[0]
    finally:
        worker.stop()
        (holder[0].redis if holder else redis).stop()


@pytest.fixture(scope="module")
def reference_mask(stack: Stack) -> Any:
    """``case folder -> mask`` by the evaluation path, in this process, with the same bundle."""
    from brainscan.data.brats import find_case, load_case
    from brainscan.evaluation.segment import segment_case
    from brainscan.models.bundle import load_bundle
    from brainscan.models.store import ModelStore

    bundle = load_bundle(ModelStore(stack.models).current("segmentation", "unet3d"))
    return lambda folder: segment_case(bundle, load_case(find_case(folder), with_seg=False))


# -- helpers ------------------------------------------------------------------------------------


def upload(case: Path) -> dict[str, tuple[str, bytes, str]]:
    return {m: (f"{case.name}_{m}.nii.gz", (case / f"{case.name}_{m}.nii.gz").read_bytes(), "application/gzip")
            for m in MODALITIES}


def submit(client: httpx.Client, case: Path) -> str:
    response = client.post("/api/v1/segmentations", files=upload(case))
    assert response.status_code == 202, response.text
    return response.json()["id"]


def poll(client: httpx.Client, stack: Stack, job_id: str, until: Any = lambda job: job["status"] in FINAL,
         timeout_s: float = JOB_TIMEOUT_S) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        response = client.get(f"/api/v1/segmentations/{job_id}")
        assert response.status_code == 200, response.text
        job = response.json()
        if until(job):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} stuck at {job}\n--- worker log ---\n{stack.worker.log_tail()}")


def mid_inference(job: dict[str, Any]) -> bool:
    return job["status"] == "running" and job["stage"] == "inference" and bool(job["stage_detail"])


def mask_of(client: httpx.Client, job: dict[str, Any]) -> np.ndarray:
    assert job["status"] == "succeeded", job
    response = client.get(job["result"]["mask_url"])
    assert response.status_code == 200, response.text
    return np.asanyarray(nib.Nifti1Image.from_bytes(gzip.decompress(response.content)).dataobj)


def slice_jpeg() -> bytes:
    from brainscan.data.phantoms import make_kaggle_phantom
    from brainscan.data.phantoms.kaggle import encode_jpeg

    return encode_jpeg(make_kaggle_phantom("glioma", seed=1))


def started_late_by(job: dict[str, Any], *moments: datetime) -> float:
    """Seconds from the latest of ``moments`` (Redis back, the worker free) to the job's start."""
    return (parse_iso(job["started_at"]) - max(moments)).total_seconds()


# -- tests --------------------------------------------------------------------------------------


def test_redis_killed_mid_job(stack: Stack, reference_mask: Any) -> None:
    with httpx.Client(base_url=stack.gateway.url, timeout=60, trust_env=False) as client:
        running_id = submit(client, stack.long_case)
        poll(client, stack, running_id, until=mid_inference)
        waiting_id = submit(client, stack.small_cases[0])
        assert poll(client, stack, waiting_id, until=lambda job: True)["status"] == "queued"

        stack.kill_redis()
        ready = client.get("/api/ready")
        assert ready.status_code == 503 and int(ready.headers["retry-after"]) > 0, ready.text
        body = ready.json()
        assert body["error"] == "service_unavailable" and body["services"]["classifier"]["status"] == "ready"
        assert body["services"]["segmenter"]["status"] == "not ready"
        assert "broker unreachable" in body["services"]["segmenter"]["detail"]

        jobs_before = {job["id"] for job in stack.jobs.unfinished()}
        refused = client.post("/api/v1/segmentations", files=upload(stack.small_cases[1]))
        assert refused.status_code == 503 and int(refused.headers["retry-after"]) > 0, refused.text
        assert refused.json()["error"] == "service_unavailable" and "job queue" in refused.json()["detail"]
        assert {job["id"] for job in stack.jobs.unfinished()} <= jobs_before  # nothing stored
        assert not any((stack.root / "jobs" / ".staging").iterdir())

        classified = client.post("/api/v1/classifications", files={"file": ("slice.jpg", slice_jpeg(), "image/jpeg")})
        assert classified.status_code == 200, classified.text
        assert classified.json()["label"] in KAGGLE_CLASSES
        assert client.get(f"/api/v1/segmentations/{waiting_id}").json()["status"] == "queued"
        time.sleep(5)  # an outage longer than one reconnection attempt of the worker
        assert stack.processes_alive() == dict.fromkeys(("gateway", "segmenter", "classifier", "worker"), True)

        returned = stack.start_redis(stack.root / "redis")  # same port, password and append-only file
        running = poll(client, stack, running_id)
        waiting = poll(client, stack, waiting_id)
        assert (running["status"], running["attempts"], waiting["status"], waiting["attempts"]) == (
            "succeeded", 1, "succeeded", 1), (running, waiting, stack.worker.log_tail())
        assert started_late_by(waiting, returned, parse_iso(running["finished_at"])) < RECONNECT_BOUND_S + SLACK_S
        np.testing.assert_array_equal(mask_of(client, running), reference_mask(stack.long_case))
        np.testing.assert_array_equal(mask_of(client, waiting), reference_mask(stack.small_cases[0]))
        deadline = time.monotonic() + RECONNECT_BOUND_S
        while client.get("/api/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert client.get("/api/ready").status_code == 200
        assert stack.processes_alive() == dict.fromkeys(("gateway", "segmenter", "classifier", "worker"), True)


def test_redis_back_without_its_data(stack: Stack, reference_mask: Any) -> None:
    """The waiting job's message is lost with Redis' files: the reconciler sends it again."""
    import redis

    with httpx.Client(base_url=stack.gateway.url, timeout=60, trust_env=False) as client:
        running_id = submit(client, stack.long_case)
        poll(client, stack, running_id, until=mid_inference)
        waiting_id = submit(client, stack.small_cases[2])
        first_send = stack.jobs.get(waiting_id)
        assert first_send["status"] == "queued", first_send

        stack.kill_redis()
        shutil.rmtree(stack.root / "redis")
        returned = stack.start_redis(stack.root / "redis-empty")
        broker = redis.Redis.from_url(stack.redis.url, socket_timeout=5)
        assert broker.llen("segmentation") == 0 and not broker.exists("unacked")  # every message is gone
        broker.close()

        running = poll(client, stack, running_id)
        waiting = poll(client, stack, waiting_id)
        assert (running["status"], running["attempts"], waiting["status"], waiting["attempts"]) == (
            "succeeded", 1, "succeeded", 1), (running, waiting, stack.worker.log_tail())
        record = stack.jobs.get(waiting_id)
        assert record["task_id"] != first_send["task_id"] and parse_iso(record["enqueued_at"]) > returned
        assert started_late_by(waiting, returned, parse_iso(running["finished_at"])) < RECONNECT_BOUND_S + SLACK_S
        np.testing.assert_array_equal(mask_of(client, waiting), reference_mask(stack.small_cases[2]))
        assert stack.processes_alive() == dict.fromkeys(("gateway", "segmenter", "classifier", "worker"), True)
