"""The segmenter API's job queue: Celery on Redis, by task name (no task code, no TensorFlow).

:class:`JobQueue` enqueues ``segmenter.segment(job_id)`` and checks that the broker answers;
:func:`require_broker` turns a broker that does not answer into a 503 with ``Retry-After``
(:class:`ServiceUnavailableError`) before an upload is read.
"""

from __future__ import annotations

from typing import Any

from brainscan.errors import BrainscanError
from services.segmenter.settings import QUEUE, TASK_NAME, Settings


class ServiceUnavailableError(BrainscanError):
    """The broker cannot take the job right now (503, with ``Retry-After``)."""

    code = "service_unavailable"
    http_status = 503


#: ``Retry-After`` of a 503 while the broker is down (the launcher restarts Redis within seconds)
BROKER_RETRY_AFTER_S = 10


def require_broker(queue: JobQueue) -> None:
    """Raise :class:`ServiceUnavailableError` unless the broker answers (checked before an upload is read)."""
    try:
        queue.ping()
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
        raise ServiceUnavailableError(f"the job queue is unreachable ({type(exc).__name__}); nothing was "
                                      f"uploaded; try again in {BROKER_RETRY_AFTER_S} s") from exc


class JobQueue:
    """Enqueues jobs on the Celery broker by task name, and checks that the broker answers."""

    def __init__(self, settings: Settings) -> None:
        from services.segmenter.celery_app import make_celery  # no task code, no TensorFlow, no import-time state

        self.settings = settings
        self.celery = make_celery(settings)
        # send_task subscribes to the result backend first; its default of 20 reconnection tries,
        # one a second, would hold a request for 20 s when Redis is down: fail fast and answer 503
        self.celery.conf.result_backend_transport_options = {
            **self.celery.conf.result_backend_transport_options,
            "retry_policy": {"max_retries": 1, "interval_start": 0.0, "interval_step": 0.5, "interval_max": 0.5},
        }

    def enqueue(self, job_id: str, task_id: str | None = None) -> str:
        """Send ``segmenter.segment(job_id)`` to the ``segmentation`` queue; returns the task id.

        Args:
            job_id: the job.
            task_id: the message's id, when the caller recorded it before sending (the reconciler);
                a fresh one otherwise.

        Raises:
            ServiceUnavailableError: the broker is unreachable.
        """
        try:
            return self.celery.send_task(TASK_NAME, args=[job_id], queue=QUEUE, retry=True, task_id=task_id).id
        except Exception as exc:  # kombu / redis raise a zoo of connection errors
            raise ServiceUnavailableError(f"the job queue is unreachable ({type(exc).__name__}); "
                                          "try again in a minute") from exc

    def _redis(self) -> Any:
        """A Redis client of the broker (with its password), timing out after ``broker_timeout_s``."""
        import redis

        return redis.Redis.from_url(self.settings.authenticated_broker_url,
                                    socket_connect_timeout=self.settings.broker_timeout_s,
                                    socket_timeout=self.settings.broker_timeout_s)

    def length(self) -> int:
        """Jobs waiting in the ``segmentation`` queue (kombu keeps it as a Redis list of that name).

        Raises:
            redis.exceptions.RedisError: the broker is unreachable (within ``broker_timeout_s``).
        """
        client = self._redis()
        try:
            return int(client.llen(QUEUE))
        finally:
            client.close()

    def ping(self) -> None:
        """Raise unless the broker answers a PING within ``broker_timeout_s`` (and accepts the password)."""
        client = self._redis()
        try:
            client.ping()
        finally:
            client.close()
