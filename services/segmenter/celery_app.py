"""The Celery app of the segmenter, as the API (to enqueue) and the worker (to consume) both build it.

TensorFlow-free and free of task code: the API enqueues by task name (``send_task("segmenter.segment",
[job_id])``). What the settings guarantee (late acknowledgement, redelivery, broker loss) is told in
:mod:`services.segmenter.worker`.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Queue

from services.segmenter.settings import QUEUE, TASK_NAME, Settings


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration of the segmenter (API and worker share it)."""
    transport = {
        "visibility_timeout": int(settings.visibility_timeout_s),
        "unacked_restore_interval": settings.unacked_restore_interval_s,
        "unacked_restore_throttle": 1,
        "socket_connect_timeout": settings.broker_timeout_s,
    }
    return {
        "broker_url": settings.authenticated_broker_url,
        "result_backend": settings.authenticated_backend_url,
        "broker_transport_options": transport,
        # progress in the result backend is best effort (the job store has it): fail fast, never stall a job
        "result_backend_transport_options": {
            "socket_connect_timeout": settings.broker_timeout_s,
            "retry_policy": {"max_retries": 1, "interval_start": 0.0, "interval_step": 0.5, "interval_max": 0.5},
        },
        "broker_connection_timeout": settings.broker_timeout_s,
        "broker_connection_retry_on_startup": True,
        # a worker outlives any broker outage (the launcher or compose restarts Redis) instead of
        # exiting after 100 reconnection attempts
        "broker_connection_max_retries": None,
        # a job running when the broker goes finishes (its outcome is in the job store); its
        # unacknowledged message, redelivered later, finds it final and is skipped
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": settings.worker_concurrency,
        "task_queues": (Queue(QUEUE, routing_key=QUEUE),),
        "task_default_queue": QUEUE,
        "task_routes": {TASK_NAME: {"queue": QUEUE, "routing_key": QUEUE}},
        "task_time_limit": settings.time_limit_s,
        "task_soft_time_limit": settings.soft_limit_s,
        # no STARTED state in the result backend: storing it runs before the task body, so a broker
        # outage at that moment would fail the delivery without running it (the job store records starts)
        "task_track_started": False,
        # nor a result: the job store holds every outcome, and storing one after the job would make a
        # delivery that finished while the broker was away end in a (harmless but noisy) handler error
        "task_ignore_result": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_expires": int(settings.job_ttl_s),
        # importing TensorFlow and building the networks takes longer than the 4 s default
        "worker_proc_alive_timeout": 180.0,
        # a dead pool process is reported (the job reads "worker lost") after 2 s, not 10: the wait is
        # for a result the process may have sent before dying, and these tasks send none
        "worker_lost_wait": 2.0,
        # a publish to a dead broker must fail fast (the API answers 503), not hang the request
        "task_publish_retry_policy": {"max_retries": 2, "interval_start": 0.0, "interval_step": 0.5,
                                      "interval_max": 1.0},
        "worker_hijack_root_logger": False,
        # the JSON log lines go to stderr as they are, not re-wrapped as WARNING records
        "worker_redirect_stdouts": False,
    }


def make_celery(settings: Settings | None = None) -> Celery:
    """A Celery app configured for the segmenter (no task code, no TensorFlow).

    Args:
        settings: the settings; ``None`` reads them from the environment.
    """
    settings = settings if settings is not None else Settings()
    celery_app = Celery("segmenter", set_as_current=False)
    celery_app.conf.update(celery_config(settings))
    return celery_app
