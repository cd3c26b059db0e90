"""The Celery worker that segments queued jobs, and the Celery app the API enqueues with.

Run:
    celery -A services.segmenter.worker worker -Q segmentation -c 1 -P prefork

With ``WORKER_METRICS_PORT`` set, the main process serves the pool's Prometheus metrics (job
outcomes and durations, inference time) on that port: :mod:`services.segmenter.worker_metrics`.

This module is TensorFlow-free at import, so the API can build its Celery app with
:func:`make_celery` (:mod:`services.segmenter.celery_app`; it enqueues by name,
``send_task("segmenter.segment", [job_id])``) without loading TensorFlow. TensorFlow comes in
with the models, which each pool process loads in ``worker_process_init``, after the fork: a
prefork worker hangs forever when a Keras model exists in the parent before forking.

Delivery guarantees (Redis broker):

- ``task_acks_late`` + ``task_reject_on_worker_lost``: a job is acknowledged only when it is done,
  so when a pool process dies (SIGKILL, out of memory) the job goes back to the queue at once and
  another process restarts it from scratch (its partial outputs are removed first). A job whose
  worker died ``max_attempts`` times fails with ``worker_lost`` instead of looping forever.
- ``visibility_timeout`` (longer than the hard time limit): when the whole worker dies, kombu
  redelivers its unacknowledged job after this long; ``unacked_restore_interval`` sets how often
  a worker looks for such jobs (``unacked_restore_throttle`` 1: every time). The API's reconciler
  (:mod:`services.segmenter.reconcile`) queues such a job again long before, once its heartbeat stops.
- ``worker_prefetch_multiplier`` 1: a busy worker reserves no second job that another could run.
- soft time limit: the job fails cleanly with ``time_limit``; the hard limit kills the process
  and :meth:`SegmentTask.on_failure` records the failure.
- retries only for transient broker errors (Redis connection / timeout), at most
  ``max_attempts - 1`` times with back-off; a bad input or a bad bundle fails the job at once.
- one run at a time: a process claims a job and beats a heartbeat into its record while it runs
  (:mod:`services.segmenter.attempts`); a second delivery of a job that runs elsewhere is dropped,
  a job whose pool process died reads "worker lost ..., retrying" at once (:class:`SegmentRequest`).
- broker loss: the job store, not Redis, holds a job's status, progress and heartbeat, so a running
  job finishes while Redis is down (progress in the result backend is best effort; no STARTED state
  and no result are stored there), and the worker reconnects for ever (kombu retries every 2, 4, ...
  at most 30 s) instead of exiting after 100 tries.

The job logic itself is :class:`services.segmenter.job_runner.JobRunner`; this module is the Celery
app, its signals and the task around it.

Progress goes to ``job.json`` (``progress``, ``stage``, ``stage_detail`` "patch k of n", at most
every ``progress_interval_s``) and, best effort, to the result backend (``update_state(state="PROGRESS")``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from billiard.exceptions import WorkerLostError
from celery import Task
from celery.exceptions import TimeLimitExceeded
from celery.signals import worker_init, worker_process_init, worker_shutdown
from celery.worker.request import Request

from serving.web import configure_logging
from services.segmenter import worker_metrics
from services.segmenter.attempts import worker_identity
from services.segmenter.celery_app import make_celery
from services.segmenter.job_runner import TRANSIENT_ERRORS, JobCancelledError, JobRunner
from services.segmenter.model_cache import ModelCache
from services.segmenter.settings import TASK_NAME, Settings
from services.segmenter.store import LocalJobStore

log = logging.getLogger("services.segmenter.worker")

#: the job logic lives in :mod:`services.segmenter.job_runner`; these names stay importable here
__all__ = ["TRANSIENT_ERRORS", "JobCancelledError", "JobRunner", "app", "runner", "segment", "settings"]


# -- the Celery app and task --------------------------------------------------------------------

settings = Settings()
configure_logging(log, settings.log_level, propagate=False)  # Celery formats the root logger its own way
settings.require_redis_password("the segmentation worker")
app = make_celery(settings)
_runner: JobRunner | None = None


def runner() -> JobRunner:
    """This process's :class:`JobRunner` (made on first use: solo and thread pools skip process init)."""
    global _runner
    if _runner is None:
        store = LocalJobStore(settings.jobs_dir, ttl_s=settings.job_ttl_s)
        _runner = JobRunner(settings, store, ModelCache(settings))
    return _runner


@worker_init.connect
def _start_metrics(**_: Any) -> None:
    """The main process serves the pool's Prometheus metrics when ``WORKER_METRICS_PORT`` is set
    (see :mod:`services.segmenter.worker_metrics`); before the fork, so the pool inherits the setup."""
    worker_metrics.start_exporter(settings.jobs_dir)


@worker_shutdown.connect
def _stop_metrics(**_: Any) -> None:
    worker_metrics.stop_exporter()


@worker_process_init.connect
def _load_models(**_: Any) -> None:
    """Each pool process loads the current bundles after the fork (never at import: see the docstring)."""
    loaded = runner().models.load_current()
    log.info("worker process ready", extra={"models": loaded})


class SegmentRequest(Request):
    """A delivery as the worker's main process handles it: when the pool process running it dies,
    the job reads "worker lost ..., retrying" at once (:meth:`JobRunner.worker_lost`), before
    Celery puts the message back in the queue (``reject_on_worker_lost``)."""

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> None:
        error = getattr(exc_info.exception, "exc", exc_info.exception)  # ExceptionWithTraceback wraps it
        if isinstance(error, WorkerLostError) and self.args and self.worker_pid:
            try:  # a runner of its own: the main process never loads models, and forks the pool from here
                JobRunner(settings, LocalJobStore(settings.jobs_dir, ttl_s=settings.job_ttl_s), ModelCache(settings)
                          ).worker_lost(str(self.args[0]), worker_identity(self.worker_pid), error)
            except OSError as exc:  # the job store is unreachable: the heartbeat will tell the reconciler
                log.warning("cannot record the lost worker of job %s: %s", self.args[0], exc)
        super().on_failure(exc_info, send_failed_event=send_failed_event, return_ok=return_ok)


class SegmentTask(Task):
    """Records a hard time limit (the process was killed, so the task itself could not) as a failed job;
    its deliveries are :class:`SegmentRequest` (a lost pool process shows at once)."""

    Request = SegmentRequest

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        if isinstance(exc, TimeLimitExceeded) and args:
            runner()._fail(str(args[0]), "time_limit", f"the job exceeded the hard time limit of "
                           f"{settings.time_limit_s:g} s and its worker process was stopped")


@app.task(name=TASK_NAME, bind=True, base=SegmentTask, acks_late=True, reject_on_worker_lost=True,
          max_retries=max(settings.max_attempts - 1, 0))
def segment(self: Task, job_id: str) -> dict[str, Any]:
    """Celery task ``segmenter.segment``: segment job ``job_id`` (see :class:`JobRunner`)."""

    broker_lost = [False]

    def report(meta: dict[str, Any]) -> None:
        if not self.request.id:
            return
        try:
            self.update_state(state="PROGRESS", meta=meta)
        except TRANSIENT_ERRORS as exc:  # best effort: the job store has the progress the API serves
            if not broker_lost[0]:
                log.warning("job %s: progress not sent to the result backend (%s); the job goes on", job_id, exc,
                            extra={"job_id": job_id})
            broker_lost[0] = True

    started = time.perf_counter()
    outcome = "error"
    try:
        result = runner().run(job_id, report=report, can_retry=self.request.retries < self.max_retries)
        outcome = worker_metrics.outcome_of(result)
        return result
    except TRANSIENT_ERRORS as exc:
        outcome = "retried"
        raise self.retry(exc=exc, countdown=min(2 ** self.request.retries, 30)) from exc
    finally:
        worker_metrics.record_job(outcome, time.perf_counter() - started)
