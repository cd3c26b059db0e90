"""The pieces that keep one job to one run, each on its own: claims, compare-and-set writes, the
heartbeat, the record of a lost pool process, and the reconciler against a real ``redis-server``
holding real Celery messages (the end-to-end cases are in test_worker_loss.py and test_broker_loss.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis

from services.segmenter.attempts import Heartbeat, lost_reason, process_alive, record_worker_lost, worker_identity
from services.segmenter.jobs import JobStateError, claim_refusal, iso, parse_iso, utc_now
from services.segmenter.reconcile import Reconciler, live_job_ids, message_job_id
from services.segmenter.settings import QUEUE, TASK_NAME, Settings
from services.segmenter.store import LocalJobStore
from tests.redis_server import needs_redis, redis_server

MODEL = {"name": "unet3d", "arch": "unet3d", "version": "test-1", "demo": True}
INPUT = {"shape": [8, 8, 8], "spacing_mm": [1.0, 1.0, 1.0], "source": "files"}
NOW = utc_now()
ME = "host-a:100"


@pytest.fixture()
def store(tmp_path: Path) -> LocalJobStore:
    return LocalJobStore(tmp_path / "jobs")


def running_job(store: LocalJobStore, *, worker: str = "host-b:200", beat_s_ago: float = 1.0, attempts: int = 1,
                attempt_id: str | None = "attempt-1") -> str:
    job_id = store.create("owner-1", MODEL, INPUT)
    store.transition(job_id, "running", attempts=attempts, attempt_id=attempt_id, worker=worker,
                     heartbeat_at=iso(utc_now() - timedelta(seconds=beat_s_ago)), stage="inference")
    return job_id


def record(status: str, **fields: Any) -> dict[str, Any]:
    return {"status": status, "created_at": iso(NOW), "started_at": iso(NOW), **fields}


CLAIMS = {
    "queued": (record("queued"), {}, None),
    "final": (record("succeeded"), {}, "already succeeded"),
    "running, written before attempts": (record("running"), {}, None),
    "running in this process": (record("running", attempt_id="a", worker=ME, heartbeat_at=iso(NOW)), {},
                                "running on host-a:100"),
    "running elsewhere": (record("running", attempt_id="a", worker="host-b:7", heartbeat_at=iso(NOW)), {},
                          "running on host-b:7"),
    "heartbeat stale": (record("running", attempt_id="a", worker="host-b:7",
                               heartbeat_at=iso(NOW - timedelta(seconds=31))), {}, None),
    "process gone": (record("running", attempt_id="a", worker="host-b:7", heartbeat_at=iso(NOW)),
                     {"is_alive": lambda worker: False}, None),
}


@pytest.mark.parametrize("job, extra, refusal", CLAIMS.values(), ids=CLAIMS.keys())
def test_claim_refusal(job: dict[str, Any], extra: dict[str, Any], refusal: str | None) -> None:
    found = claim_refusal(job, NOW, stale_after_s=30.0, **extra)
    assert (found is None) is (refusal is None) and (refusal is None or refusal in found), found


def test_compare_and_set_writes_only_over_the_expected_fields(store: LocalJobStore) -> None:
    job_id = running_job(store)
    with pytest.raises(JobStateError, match="attempt_id 'attempt-1', expected 'attempt-0'"):
        store.update(job_id, expect_fields={"attempt_id": "attempt-0"}, progress=0.5)
    with pytest.raises(JobStateError):
        store.transition(job_id, "succeeded", expect_fields={"attempt_id": "attempt-0"})
    assert (store.get(job_id)["status"], store.get(job_id)["progress"]) == ("running", 0.0)
    store.update(job_id, expect_status={"running"}, expect_fields={"attempt_id": "attempt-1"}, progress=0.5)
    assert store.get(job_id)["progress"] == 0.5
    assert [job["id"] for job in store.unfinished()] == [job_id]


def test_a_lost_pool_process_requeues_only_its_own_attempt(store: LocalJobStore) -> None:
    job_id = running_job(store, worker="host-b:200")
    assert record_worker_lost(store, job_id, "host-b:999", "its process died (signal 9 (SIGKILL))",
                              max_attempts=3) is None  # another process runs it now
    assert store.get(job_id)["status"] == "running"
    lost = record_worker_lost(store, job_id, "host-b:200", "its process died (signal 9 (SIGKILL))", max_attempts=3)
    assert lost is not None and (lost["status"], lost["heartbeat_at"]) == ("queued", None)
    assert lost["stage_detail"] == "worker lost (its process died (signal 9 (SIGKILL))); retrying (attempt 2 of 3)"

    last = running_job(store, worker="host-b:200", attempts=3)
    failed = record_worker_lost(store, last, "host-b:200", "its process died (signal 9 (SIGKILL))", max_attempts=3)
    assert failed is not None and failed["status"] == "failed" and failed["error"]["error"] == "worker_lost"


def test_lost_reason_keeps_the_signal_and_drops_the_job_number() -> None:
    from billiard.exceptions import WorkerLostError

    error = WorkerLostError("Worker exited prematurely: signal 9 (SIGKILL) Job: 3.")
    assert lost_reason(error) == "its process died (signal 9 (SIGKILL))"
    assert lost_reason(WorkerLostError("Worker exited prematurely: exitcode 70 Job: 0.")) == \
        "its process died (exitcode 70)"


def test_the_heartbeat_beats_until_another_attempt_takes_over(store: LocalJobStore) -> None:
    job_id = running_job(store, beat_s_ago=60.0)
    first = store.get(job_id)["heartbeat_at"]
    with Heartbeat(store, job_id, "attempt-1", interval_s=0.05) as heartbeat:
        deadline = time.monotonic() + 10
        while heartbeat.beats < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert heartbeat.beats >= 2 and parse_iso(store.get(job_id)["heartbeat_at"]) > parse_iso(first)
        store.transition(job_id, "running", attempt_id="attempt-2", heartbeat_at=None)  # taken over
        time.sleep(0.3)
        assert store.get(job_id)["heartbeat_at"] is None  # the old attempt wrote nothing more
        assert not heartbeat._thread.is_alive()
    with pytest.raises(ValueError, match="interval_s must be positive"):
        Heartbeat(store, job_id, "attempt-2", interval_s=0)


def test_process_alive_tells_dead_and_zombie_processes() -> None:
    assert process_alive(worker_identity()) and process_alive("another-host:1")
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    assert not process_alive(worker_identity(finished.pid))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert process_alive(worker_identity(sleeper.pid))
        sleeper.kill()
        deadline = time.monotonic() + 10  # killed, not reaped yet: a zombie
        while process_alive(worker_identity(sleeper.pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not process_alive(worker_identity(sleeper.pid)) and sleeper.poll() is not None
    finally:
        sleeper.kill()
        sleeper.wait()


class EmptyBroker:
    """The three reads :func:`live_job_ids` makes, of a broker that holds no message."""

    def lrange(self, key: str, start: int, end: int) -> list[bytes]:
        return []

    def zrange(self, key: str, start: int, end: int, withscores: bool = False) -> list[Any]:
        return []

    def hgetall(self, key: str) -> dict[bytes, bytes]:
        return {}

    def close(self) -> None:
        pass


@pytest.mark.parametrize("lost", ["message", "worker"])
def test_the_record_names_the_new_message_even_when_a_worker_finishes_it_at_once(store: LocalJobStore,
                                                                                  lost: str) -> None:
    """A free worker claims a resent job, and a small one finishes, before ``send_task`` returns."""
    settings = Settings(jobs_dir=store.root, reconcile_grace_s=0.0, heartbeat_timeout_s=30.0)
    job_id = running_job(store, beat_s_ago=31.0) if lost == "worker" else store.create("owner-1", MODEL, INPUT)
    old = store.update(job_id, task_id="lost-message", enqueued_at=iso(utc_now() - timedelta(seconds=60)))
    sent: list[tuple[str, str]] = []

    def enqueue_to_a_fast_worker(sent_id: str, task_id: str) -> str:
        sent.append((sent_id, task_id))
        store.transition(sent_id, "running", attempts=1, attempt_id="attempt-2", worker=ME, heartbeat_at=iso(utc_now()))
        store.transition(sent_id, "succeeded")
        return task_id

    reconciler = Reconciler(settings, store, enqueue_to_a_fast_worker, client=EmptyBroker)
    assert reconciler.run_once() == {"worker_lost": [job_id] if lost == "worker" else [],
                                     "message_lost": [job_id] if lost == "message" else []}
    done = store.get(job_id)
    assert done["status"] == "succeeded" and [(job_id, done["task_id"])] == sent
    assert done["task_id"] != "lost-message" and parse_iso(done["enqueued_at"]) > parse_iso(old["enqueued_at"])


def test_a_job_claimed_while_the_reconciler_decides_is_not_sent_again(store: LocalJobStore) -> None:
    settings = Settings(jobs_dir=store.root, reconcile_grace_s=0.0, heartbeat_timeout_s=30.0)
    job_id = store.create("owner-1", MODEL, INPUT)
    sent: list[str] = []

    class ClaimedAfterTheList(LocalJobStore):  # a worker claims the job right after the reconciler read it
        def unfinished(self) -> list[Any]:
            records = super().unfinished()
            store.transition(job_id, "running", attempts=1, attempt_id="attempt-1", worker=ME,
                             heartbeat_at=iso(utc_now()))
            return records

    reconciler = Reconciler(settings, ClaimedAfterTheList(store.root),
                            lambda sent_id, task_id: sent.append(sent_id) or task_id, client=EmptyBroker)
    assert reconciler.run_once() == {"worker_lost": [], "message_lost": []} and sent == []
    claimed = store.get(job_id)
    assert claimed["status"] == "running" and claimed["task_id"] is None


# -- against a real broker ----------------------------------------------------------------------

@needs_redis
def test_the_reconciler_resends_exactly_the_jobs_without_a_message_or_a_worker(store: LocalJobStore,
                                                                                tmp_path: Path) -> None:
    from services.segmenter.celery_app import make_celery

    with redis_server(tmp_path / "redis") as server:
        settings = Settings(broker_url=server.url, jobs_dir=store.root, reconcile_grace_s=0.0,
                            heartbeat_timeout_s=30.0, broker_timeout_s=2.0)
        celery = make_celery(settings)
        sent: list[str] = []

        def enqueue(job_id: str, task_id: str | None = None) -> str:
            sent.append(job_id)
            return celery.send_task(TASK_NAME, args=[job_id], queue=QUEUE, task_id=task_id).id

        waiting = store.create("owner-1", MODEL, INPUT)
        enqueue(waiting)
        lost_message = store.create("owner-1", MODEL, INPUT)
        alive = running_job(store, beat_s_ago=1.0)
        dead = running_job(store, beat_s_ago=31.0)
        celery.send_task("another.task", args=[lost_message], queue=QUEUE)  # not a segmentation message
        client = redis.Redis.from_url(server.url)
        assert {message_job_id(raw) for raw in client.lrange(QUEUE, 0, -1)} == {waiting, None}
        assert live_job_ids(client, 30.0) == {waiting}
        sent.clear()

        reconciler = Reconciler(settings, store, enqueue)
        assert reconciler.run_once() == {"worker_lost": [dead], "message_lost": [lost_message]}
        assert sorted(sent) == sorted([dead, lost_message])
        assert live_job_ids(client, 30.0) == {waiting, dead, lost_message}
        requeued = store.get(dead)
        assert requeued["status"] == "queued" and requeued["stage_detail"].startswith("worker lost (no heartbeat for 3")
        assert store.get(lost_message)["task_id"] and store.get(lost_message)["enqueued_at"]
        assert {message_job_id(raw): json.loads(raw)["headers"]["id"] for raw in client.lrange(QUEUE, 0, -1)
                }[lost_message] == store.get(lost_message)["task_id"]  # the record names the message sent
        assert store.get(alive)["status"] == "running"
        assert reconciler.run_once() == {"worker_lost": [], "message_lost": []}  # idempotent

        # a message a worker reserved counts only for the grace period
        with celery.connection_for_read() as connection:
            reserved = connection.SimpleQueue(QUEUE).get(timeout=10)
            assert client.hlen("unacked") == 1
            assert live_job_ids(client, 30.0) == {waiting, dead, lost_message}
            later = live_job_ids(client, 30.0, now=time.time() + 60)  # the reservation is 60 s old
            assert len(later) == 2 and reserved.payload[0][0] not in later
            reserved.ack()
        client.close()

    with pytest.raises(redis.exceptions.RedisError):  # the broker is gone: nothing changes
        reconciler.run_once()
    assert store.get(alive)["status"] == "running"
