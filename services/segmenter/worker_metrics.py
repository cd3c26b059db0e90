"""Prometheus metrics of the Celery worker, exported by its main process over HTTP.

The jobs run in prefork pool processes, so each process writes its samples to files in a shared
folder (``prometheus_client`` multiprocess mode) and the worker's main process serves their sum.
Off by default; set ``WORKER_METRICS_PORT`` to turn it on:

======================================  =============================  =====================================
environment variable                    default                        meaning
======================================  =============================  =====================================
``WORKER_METRICS_PORT``                 0 (off)                        port of the worker's ``/metrics``
                                                                       (HTTP, all of ``/`` answers it)
``WORKER_METRICS_ADDR``                 ``127.0.0.1``                  address it listens on (``0.0.0.0``
                                                                       in a container)
``PROMETHEUS_MULTIPROC_DIR``            ``<jobs dir>/.worker-metrics/  folder of the per-process sample
                                        <main pid>``                   files; the default one is emptied
                                                                       at start and removed at shutdown
======================================  =============================  =====================================

Run two workers on one host with two ports (each serves only its own pool). The job store skips
dot-folders, so the default folder under the jobs dir is never taken for a job.

Metrics:
    segmenter_worker_jobs_total{outcome}               counter: succeeded / failed / cancelled / skipped
                                                       (already final or gone) / retried (transient
                                                       broker error) / error (unexpected exception)
    segmenter_worker_job_duration_seconds{outcome}     histogram: the task from start to end
    segmenter_worker_inference_seconds                 histogram: the sliding-window inference alone
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger("services.segmenter.worker")

PORT_ENV = "WORKER_METRICS_PORT"
ADDR_ENV = "WORKER_METRICS_ADDR"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: 1 s to 1 h: a phantom takes a second, a BraTS case ~20 s on a CPU, a large series minutes
JOB_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
OUTCOMES = ("succeeded", "failed", "cancelled", "skipped", "retried", "error")


def metrics_port(environ: dict[str, str] | None = None) -> int:
    """The port from ``WORKER_METRICS_PORT`` (0: off).

    Raises:
        ValueError: not an integer in 0..65535 (the message names the value).
    """
    raw = (environ if environ is not None else os.environ).get(PORT_ENV, "0").strip() or "0"
    try:
        port = int(raw)
    except ValueError:
        raise ValueError(f"{PORT_ENV} must be a port number (0 = off), got {raw!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{PORT_ENV} must be in 0..65535 (0 = off), got {port}")
    return port


class _JobMetrics:
    """The metric objects of one pool process (made after the fork, in multiprocess mode)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.jobs = Counter("segmenter_worker_jobs", "segmentation jobs finished by this worker, by outcome",
                            ("outcome",))
        self.duration = Histogram("segmenter_worker_job_duration_seconds", "segmentation task duration, by outcome",
                                  ("outcome",), buckets=JOB_BUCKETS)
        self.inference = Histogram("segmenter_worker_inference_seconds", "sliding-window inference of one job",
                                   buckets=JOB_BUCKETS)


_enabled = False
_metrics: _JobMetrics | None = None
_owned_dir: Path | None = None


def start_exporter(jobs_dir: Path, environ: dict[str, str] | None = None) -> int:
    """In the worker main process, before the pool forks: set up multiprocess mode and serve it.

    Args:
        jobs_dir: the job store folder (the default sample folder goes under it).
        environ: the environment (default ``os.environ``; it is updated with ``PROMETHEUS_MULTIPROC_DIR``
            so that the pool processes inherit it).

    Returns:
        the port served, or 0 when ``WORKER_METRICS_PORT`` is unset or 0 (nothing is started).

    Raises:
        ValueError: a bad ``WORKER_METRICS_PORT``.
        OSError: the port is taken.
    """
    global _enabled, _owned_dir
    environ = environ if environ is not None else os.environ
    port = metrics_port(environ)
    if port == 0:
        return 0
    folder_text = environ.get(MULTIPROC_ENV)
    if folder_text:
        folder = Path(folder_text)
    else:
        # one folder per worker main process: a second worker must not wipe this one's samples
        folder = Path(jobs_dir) / ".worker-metrics" / str(os.getpid())
        shutil.rmtree(folder, ignore_errors=True)  # samples of a previous run with the same pid are stale
        _owned_dir = folder
    folder.mkdir(parents=True, exist_ok=True)
    environ[MULTIPROC_ENV] = str(folder)
    os.environ[MULTIPROC_ENV] = str(folder)

    from prometheus_client import CollectorRegistry, start_http_server, values
    from prometheus_client.multiprocess import MultiProcessCollector

    # prometheus_client picks its value class at import; it may have been imported before the
    # variable was set (then metrics made later would stay per-process and never be exported)
    values.ValueClass = values.get_value_class()
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(folder))
    start_http_server(port, addr=environ.get(ADDR_ENV, "127.0.0.1"), registry=registry)
    _enabled = True
    log.info("worker metrics on port %d", port, extra={"metrics_dir": str(folder)})
    return port


def stop_exporter() -> None:
    """At worker shutdown: remove the default sample folder (the HTTP thread dies with the process)."""
    global _owned_dir
    if _owned_dir is not None:
        shutil.rmtree(_owned_dir, ignore_errors=True)
        _owned_dir = None


def _get() -> _JobMetrics | None:
    global _metrics
    if not _enabled:
        return None
    if _metrics is None:
        _metrics = _JobMetrics()
    return _metrics


def record_job(outcome: str, seconds: float) -> None:
    """Count one finished task and its duration (no-op when the exporter is off)."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
    metrics = _get()
    if metrics is not None:
        metrics.jobs.labels(outcome=outcome).inc()
        metrics.duration.labels(outcome=outcome).observe(seconds)


def record_inference(seconds: float) -> None:
    """Record the inference time of one job (no-op when the exporter is off)."""
    metrics = _get()
    if metrics is not None:
        metrics.inference.observe(seconds)


def outcome_of(result: Any) -> str:
    """The outcome label of a :meth:`JobRunner.run` result."""
    if isinstance(result, dict):
        if result.get("skipped"):
            return "skipped"
        if result.get("status") in ("succeeded", "failed", "cancelled"):
            return result["status"]
    return "error"
