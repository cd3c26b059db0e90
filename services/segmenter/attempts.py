"""Who runs a job right now: worker identities, the heartbeat of a running attempt, a lost worker.

A worker process that claims a job (:func:`services.segmenter.jobs.claim_refusal` says whether it
may) writes into the record a fresh ``attempt_id``, its ``worker`` identity (``host:pid``) and a
``heartbeat_at`` that :class:`Heartbeat` renews every ``heartbeat_interval_s`` while the job runs.
The heartbeat goes to the job store, not to the broker, so it keeps beating while Redis is away.
Two things read it:

- another delivery of the same job, which leaves a job with a fresh heartbeat alone (a duplicate
  message never starts a second run);
- the API's reconciler (:mod:`services.segmenter.reconcile`), which queues again a job whose
  heartbeat is older than ``heartbeat_timeout_s`` (its whole worker died).

When only a pool process dies (SIGKILL, out of memory), the worker's main process knows at once and
records it with :func:`record_worker_lost`: the job reads "worker lost ..., retrying" within
seconds instead of a frozen "patch 108 of 160" until the next attempt starts.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
from pathlib import Path
from types import TracebackType

from services.segmenter.job_record import Job, JobStatus
from services.segmenter.jobs import JobNotFoundError, JobStateError, iso, utc_now
from services.segmenter.store import JobStore

log = logging.getLogger("services.segmenter.worker")


def worker_identity(pid: int | None = None) -> str:
    """``host:pid`` of this process (or of ``pid`` on this host): what a claim writes as ``worker``."""
    return f"{socket.gethostname()}:{pid if pid is not None else os.getpid()}"


def process_alive(worker: str) -> bool:
    """Whether the process ``host:pid`` still runs, as far as this process can tell.

    A process on another host (another container) cannot be checked: ``True``, and its heartbeat
    decides. A zombie (killed, not yet reaped) counts as dead.
    """
    host, _, pid = worker.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (not Linux): ask the kernel instead
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    return stat[stat.rindex(")") + 2:].split()[0] != "Z"


class Heartbeat:
    """Renews ``heartbeat_at`` of one attempt every ``interval_s`` from a daemon thread, as a context manager.

    It stops by itself once the record is no longer this attempt's (cancelled, deleted, taken over).

    Args:
        store: the job store.
        job_id: the job.
        attempt_id: the attempt that beats (the write expects it).
        interval_s: seconds between beats.
    """

    def __init__(self, store: JobStore, job_id: str, attempt_id: str, interval_s: float) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        self.store = store
        self.job_id = job_id
        self.attempt_id = attempt_id
        self.interval_s = interval_s
        self.beats = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.store.update(self.job_id, expect_status={JobStatus.RUNNING},
                                  expect_fields={"attempt_id": self.attempt_id}, heartbeat_at=iso(utc_now()))
                self.beats += 1
            except (JobStateError, JobNotFoundError):
                return  # no longer this attempt's job: the attempt notices at its next write
            except OSError as exc:  # a full or busy disk: the next beat may work
                log.warning("heartbeat of job %s failed: %s", self.job_id, exc, extra={"job_id": self.job_id})

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=max(self.interval_s, 5.0))


def lost_reason(error: BaseException) -> str:
    """``"its process died (signal 9 (SIGKILL))"`` for billiard's ``WorkerLostError``, without its job number."""
    text = str(error)
    found = re.search(r"(signal \d+(?: \(\w+\))?|exitcode \d+)", text)
    return f"its process died ({found.group(1)})" if found else f"its process died ({text.split(' Job:')[0]})"


def too_many_attempts(attempts: int) -> str:
    """The error detail of a job that failed with ``worker_lost``."""
    return (f"the job was started {attempts} times and its worker died each time (out of memory?); "
            "try a smaller volume")


def record_worker_lost(store: JobStore, job_id: str, worker: str, reason: str, *,
                       max_attempts: int) -> Job | None:
    """Record that the attempt of ``worker`` on ``job_id`` is lost: back to ``queued`` ("worker lost,
    retrying"), or ``failed`` with ``worker_lost`` after ``max_attempts`` attempts.

    Only the attempt that ``worker`` runs is touched: a job another process has taken over since,
    or one that finished, stays as it is.

    Returns:
        the updated record, or None when there was nothing to record.
    """
    try:
        job = store.get(job_id)
        if job.status is not JobStatus.RUNNING or job.worker != worker:
            return None
        mine = {"attempt_id": job.attempt_id}
        attempts = int(job.attempts or 0)
        if attempts >= max_attempts:
            record = store.transition(job_id, JobStatus.FAILED, expect_status={JobStatus.RUNNING}, expect_fields=mine,
                                      stage_detail=None, error={"error": "worker_lost",
                                                                "detail": too_many_attempts(attempts)})
        else:
            record = store.transition(job_id, JobStatus.QUEUED, expect_status={JobStatus.RUNNING}, expect_fields=mine,
                                      progress=0.0, heartbeat_at=None, stage_detail=f"worker lost ({reason}); retrying "
                                      f"(attempt {attempts + 1} of {max_attempts})")
    except (JobStateError, JobNotFoundError):
        return None  # cancelled, deleted or taken over meanwhile
    log.warning("job %s: worker %s lost (%s)", job_id, worker, reason, extra={"job_id": job_id})
    return record
