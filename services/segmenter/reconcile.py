"""The reconciler: jobs whose worker or queue message was lost are queued again.

The job store holds the truth about jobs; a Redis message only says "run job X". After a loss the
two can disagree, and without this a job would wait for the broker's visibility timeout (2 h) or
for ever. Every ``reconcile_interval_s`` the segmenter API looks at every queued or running job:

=========================================  ==========================================================
job                                        what the reconciler does
=========================================  ==========================================================
running, heartbeat older than              its worker is lost (the whole worker was killed, its host
``heartbeat_timeout_s``                    went): back to ``queued``, "worker lost (no heartbeat for
                                           N s); retrying", and a new message
queued, no message for it in Redis, sent   its message was lost (Redis restarted without its data or
more than ``reconcile_grace_s`` ago        before its append-only file had it, a publish failed):
                                           a new message
=========================================  ==========================================================

A message "for" a job is one waiting in the ``segmentation`` queue, or one a worker reserved
(kombu's ``unacked`` hash) less than ``reconcile_grace_s`` ago. A reservation older than that whose
job is still queued is taken as lost: Celery forgets what a worker had reserved but not started
when its broker connection drops, and the message stays in ``unacked`` until the visibility timeout
(2 h). A worker that merely waits longer for a free pool process (one loading its models) gets a
duplicate, which is harmless.

A round is skipped while the broker is unreachable. Sending a job twice is harmless: a delivery
of a job that is final, or that runs with a fresh heartbeat, is dropped
(:func:`services.segmenter.jobs.claim_refusal`), and each state change here is a compare-and-set
on the record the decision was made on, so a job that moved meanwhile is left alone.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.concurrency import run_in_threadpool

from brainscan.errors import BrainscanError
from services.segmenter.job_record import JobStatus
from services.segmenter.jobs import JobNotFoundError, JobStateError, heartbeat_age_s, iso, parse_iso, utc_now
from services.segmenter.settings import QUEUE, TASK_NAME, Settings
from services.segmenter.store import JobStore

log = logging.getLogger("services.segmenter")

#: kombu's Redis transport: the hash of reserved (unacknowledged) messages and its delivery times
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"
#: kombu keeps messages with a priority in lists named ``<queue>\x06\x16<step>``
PRIORITY_QUEUES = (QUEUE, *(f"{QUEUE}\x06\x16{step}" for step in (3, 6, 9)))


def message_job_id(message: dict[str, Any] | str | bytes) -> str | None:
    """The job id a kombu Redis message of ``segmenter.segment`` carries (its first argument), else None.

    Args:
        message: the message as kombu stores it (JSON text, or already decoded).
    """
    try:
        if not isinstance(message, dict):
            message = json.loads(message)
        if message.get("headers", {}).get("task") != TASK_NAME:
            return None
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        payload = json.loads(body)
        args = payload[0] if isinstance(payload, list) else payload.get("args", [])  # protocol 2, else 1
        return str(args[0]) if args else None
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, binascii.Error):
        return None


def live_job_ids(client: Any, reserved_grace_s: float, now: float | None = None) -> set[str]:
    """Ids of the jobs that have a message in the broker: waiting in the queue, or reserved by a
    worker less than ``reserved_grace_s`` ago.

    Args:
        client: a ``redis.Redis`` client of the broker.
        reserved_grace_s: how long a reservation counts.
        now: the current Unix time (kombu's delivery times are Unix times).

    Raises:
        redis.exceptions.RedisError: the broker is unreachable.
    """
    now = time.time() if now is None else now
    ids = {message_job_id(raw) for key in PRIORITY_QUEUES for raw in client.lrange(key, 0, -1)}
    delivered = {_text(tag): score for tag, score in client.zrange(UNACKED_INDEX_KEY, 0, -1, withscores=True)}
    for tag, raw in client.hgetall(UNACKED_KEY).items():
        if now - delivered.get(_text(tag), 0.0) > reserved_grace_s:
            continue  # held by a worker that is gone, or forgotten by one that lost its connection
        try:
            ids.add(message_job_id(json.loads(raw)[0]))
        except (ValueError, IndexError, TypeError):
            continue
    ids.discard(None)
    return ids  # type: ignore[return-value]


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def broker_client(settings: Settings) -> Any:
    """A Redis client of the broker (with its password) that gives up after ``broker_timeout_s``."""
    import redis

    return redis.Redis.from_url(settings.authenticated_broker_url, socket_connect_timeout=settings.broker_timeout_s,
                                socket_timeout=settings.broker_timeout_s)


class Reconciler:
    """Queues again the jobs that lost their worker or their message (see the module docstring).

    Args:
        settings: heartbeat timeout, grace and broker.
        store: the job store.
        enqueue: ``enqueue(job_id, task_id)`` sends ``segmenter.segment(job_id)`` as message ``task_id`` and
            returns that id (the API's ``JobQueue.enqueue``).
        client: makes a Redis client of the broker (default :func:`broker_client`).
    """

    def __init__(self, settings: Settings, store: JobStore, enqueue: Callable[[str, str], str],
                 client: Callable[[], Any] | None = None) -> None:
        self.settings = settings
        self.store = store
        self.enqueue = enqueue
        self.client = client or (lambda: broker_client(settings))

    def run_once(self) -> dict[str, list[str]]:
        """One round.

        A job's record names the new message (``task_id``, ``enqueued_at``) before the message is sent:
        a free worker may claim the job, even finish it, the moment it is sent, and the record must not
        keep naming the lost message then. A job that moved meanwhile (claimed, cancelled) is not sent.

        Returns:
            ``{"worker_lost": [job ids], "message_lost": [job ids]}``: the jobs sent again.

        Raises:
            redis.exceptions.RedisError: the broker is unreachable (nothing was changed).
            Exception: what ``enqueue`` raises when the broker goes during the round (the record names a
                message that was never sent, so the job counts as without one and the next round sends it).
        """
        client = self.client()
        try:
            live = live_job_ids(client, self.settings.reconcile_grace_s)
        finally:
            client.close()
        sent: dict[str, list[str]] = {"worker_lost": [], "message_lost": []}
        for job in self.store.unfinished():
            now = utc_now()
            task_id = str(uuid.uuid4())
            message = {"task_id": task_id, "enqueued_at": iso(now)}
            try:
                if job.status is JobStatus.RUNNING:
                    age = heartbeat_age_s(job, now)
                    if age <= self.settings.heartbeat_timeout_s:
                        continue
                    self.store.transition(job.id, JobStatus.QUEUED, expect_status={JobStatus.RUNNING},
                                          expect_fields={key: job.get(key) for key in ("attempt_id", "heartbeat_at")},
                                          progress=0.0, heartbeat_at=None,
                                          stage_detail=f"worker lost (no heartbeat for {age:.0f} s); retrying",
                                          **message)
                    kind = "worker_lost"
                else:
                    last_sent = parse_iso(job.enqueued_at or job.created_at)
                    if job.id in live or (now - last_sent).total_seconds() < self.settings.reconcile_grace_s:
                        continue
                    self.store.update(job.id, expect_status={JobStatus.QUEUED},
                                      expect_fields={key: job.get(key) for key in ("attempt_id", "task_id")},
                                      **message)
                    kind = "message_lost"
            except (JobStateError, JobNotFoundError):
                continue  # it moved meanwhile: claimed by a worker (alive after all), or cancelled
            self.enqueue(job.id, task_id)
            sent[kind].append(job.id)
            log.warning("job %s queued again (%s)", job.id, kind.replace("_", " "),
                        extra={"job_id": job.id, "task_id": task_id})
        return sent

    async def run_forever(self) -> None:
        """A round every ``reconcile_interval_s`` (off the event loop) until cancelled; failures are logged."""
        import redis

        while True:
            await asyncio.sleep(self.settings.reconcile_interval_s)
            try:
                await run_in_threadpool(self.run_once)
            except (redis.exceptions.RedisError, BrainscanError) as exc:  # BrainscanError: enqueue's 503
                log.debug("reconciler round skipped: the broker is unreachable (%s)", type(exc).__name__)
            except Exception:  # noqa: BLE001 - the next round may work; it is logged
                log.exception("reconciler round failed")
