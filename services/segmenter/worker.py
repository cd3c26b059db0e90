"""The Celery worker that segments queued jobs, and the Celery app the API enqueues with.

Run:
    celery -A services.segmenter.worker worker -Q segmentation -c 1 -P prefork

With ``WORKER_METRICS_PORT`` set, the main process serves the pool's Prometheus metrics (job
outcomes and durations, inference time) on that port: :mod:`services.segmenter.worker_metrics`.

This module is TensorFlow-free at import, so the API can build its Celery app with
:func:`make_celery` (and enqueue by name, ``send_task("segmenter.segment", [job_id])``) without
loading TensorFlow. TensorFlow comes in with the models, which each pool process loads in
``worker_process_init``, after the fork: a prefork worker hangs forever when a Keras model exists
in the parent before forking.

Delivery guarantees (Redis broker):

- ``task_acks_late`` + ``task_reject_on_worker_lost``: a job is acknowledged only when it is done,
  so when a pool process dies (SIGKILL, out of memory) the job goes back to the queue at once and
  another process restarts it from scratch (its partial outputs are removed first). A job whose
  worker died ``max_attempts`` times fails with ``worker_lost`` instead of looping forever.
- ``visibility_timeout`` (longer than the hard time limit): when the whole worker dies, kombu
  redelivers its unacknowledged job after this long; ``unacked_restore_interval`` sets how often
  a worker looks for such jobs (``unacked_restore_throttle`` 1: every time).
- ``worker_prefetch_multiplier`` 1: a busy worker reserves no second job that another could run.
- soft time limit: the job fails cleanly with ``time_limit``; the hard limit kills the process
  and :meth:`SegmentTask.on_failure` records the failure.
- retries only for transient broker errors (Redis connection / timeout), at most
  ``max_attempts - 1`` times with back-off; a bad input or a bad bundle fails the job at once.

Progress goes to ``job.json`` (``progress``, ``stage``, ``stage_detail`` "patch k of n", at most
every ``progress_interval_s``) and to the result backend (``update_state(state="PROGRESS")``).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery import Celery, Task
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded
from celery.signals import worker_init, worker_process_init, worker_shutdown
from kombu import Queue
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from brainscan.errors import BrainscanError, BundleError
from brainscan.labels import BRATS2021, MODALITIES
from brainscan.web import configure_logging
from services.segmenter.jobs import (
    FINAL,
    MASK_FILE,
    MODALITY_FILES,
    PREVIEW_FILES,
    SEG_FILE,
    STUDY_FILE,
    TRANSFORMS_FILE,
    JobNotFoundError,
    JobStateError,
    parse_iso,
    result_labels,
    stage_progress,
    utc_now,
)
from services.segmenter.settings import QUEUE, TASK_NAME, Settings
from services.segmenter import worker_metrics
from services.segmenter.store import JobStore, LocalJobStore

log = logging.getLogger("services.segmenter.worker")

#: errors worth another try: the broker or result backend was briefly unreachable
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError, KombuOperationalError)
SEGMENTATION = "segmentation"
#: bundles a pool process keeps loaded (current versions plus those older jobs asked for)
MODEL_CACHE_SIZE = 4


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
        "result_backend_transport_options": {"socket_connect_timeout": settings.broker_timeout_s},
        "broker_connection_timeout": settings.broker_timeout_s,
        "broker_connection_retry_on_startup": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": settings.worker_concurrency,
        "task_queues": (Queue(QUEUE, routing_key=QUEUE),),
        "task_default_queue": QUEUE,
        "task_routes": {TASK_NAME: {"queue": QUEUE, "routing_key": QUEUE}},
        "task_time_limit": settings.time_limit_s,
        "task_soft_time_limit": settings.soft_limit_s,
        "task_track_started": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_expires": int(settings.job_ttl_s),
        # importing TensorFlow and building the networks takes longer than the 4 s default
        "worker_proc_alive_timeout": 180.0,
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


class JobCancelledError(Exception):
    """Raised from the progress callback to stop inference of a job that was cancelled (or deleted)."""


@dataclass
class LoadedSegmenter:
    """A bundle ready to serve: the bundle and its compiled ``predict_fn`` (one trace per process)."""

    bundle: Any
    predict_fn: Callable[[Any], Any]


class ModelCache:
    """The segmentation bundles of one pool process, keyed by ``(arch, version)``.

    Args:
        settings: where the model store is.
        size: most bundles kept; the least recently used is dropped.
    """

    def __init__(self, settings: Settings, size: int = MODEL_CACHE_SIZE) -> None:
        self.settings = settings
        self.size = size
        self._models: OrderedDict[tuple[str, str], LoadedSegmenter] = OrderedDict()

    def load_current(self) -> dict[str, str]:
        """Load the current version of every segmentation architecture in the store.

        Returns:
            architecture -> version loaded, or ``"error: <reason>"`` (logged; the others still load).
        """
        from brainscan.models.store import ModelStore

        store = ModelStore(self.settings.store_root())
        task_dir = store.root / SEGMENTATION
        archs = sorted(d.name for d in task_dir.iterdir() if d.is_dir() and not d.name.startswith(".")) \
            if task_dir.is_dir() else []
        loaded: dict[str, str] = {}
        for arch in archs:
            try:
                version = store.current_version(SEGMENTATION, arch)
                self.get(arch, version)
                loaded[arch] = version
            except Exception as exc:  # noqa: BLE001 - one bad bundle must not stop the worker
                loaded[arch] = f"error: {getattr(exc, 'message', exc)}"
                log.error("cannot load segmentation model %s: %s", arch, exc, extra={"model": arch})
        if not archs:
            log.warning("no segmentation bundle in the model store %s", store.root)
        return loaded

    def get(self, arch: str, version: str) -> LoadedSegmenter:
        """The bundle ``segmentation/<arch>/<version>``, loaded (and warmed up) on first use.

        Raises:
            BundleError: missing or invalid bundle, or not a segmentation bundle.
        """
        key = (arch, version)
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        from brainscan.evaluation.segment import inference_settings
        from brainscan.inference.sliding_window import keras_predict_fn
        from brainscan.models.bundle import load_bundle
        from brainscan.models.store import ModelStore

        path = ModelStore(self.settings.store_root()).arch_dir(SEGMENTATION, arch) / version
        started = time.perf_counter()
        bundle = load_bundle(path)
        if bundle.task != SEGMENTATION:
            raise BundleError(f"bundle {path} is a {bundle.task} bundle, not a segmentation one")
        settings = inference_settings(bundle)
        predict_fn = keras_predict_fn(bundle.model, batch_size=settings["batch_size"])
        if self.settings.warmup:
            import numpy as np

            channels = int(bundle.manifest["input"]["channels"])
            predict_fn(np.zeros((1, *settings["patch_size"], channels), np.float32))  # traces the graph
        self._models[key] = LoadedSegmenter(bundle, predict_fn)
        while len(self._models) > self.size:
            self._models.popitem(last=False)
        log.info("loaded segmentation model %s version %s in %.1f s", arch, version, time.perf_counter() - started,
                 extra={"model": arch, "version": version})
        return self._models[key]


class JobRunner:
    """Runs one job from the store to its result; the Celery task is a thin shell around it.

    Tests call :meth:`run` directly with a store and a model cache.

    Args:
        settings: the settings.
        store: the job store.
        models: the process's model cache.
    """

    def __init__(self, settings: Settings, store: JobStore, models: ModelCache) -> None:
        self.settings = settings
        self.store = store
        self.models = models

    def run(self, job_id: str, *, report: Callable[[dict[str, Any]], None] | None = None,
            can_retry: bool = False) -> dict[str, Any]:
        """Segment job ``job_id`` and record the outcome in the store.

        Args:
            job_id: the job.
            report: called with each progress update (the task passes ``update_state``).
            can_retry: a transient error re-raises (for a retry) instead of failing the job.

        Returns:
            ``{"job_id", "status"}`` (plus ``"skipped": True`` for a job already final or gone).

        Raises:
            TRANSIENT_ERRORS: with ``can_retry``, after putting the job back to ``queued``.
            Exception: an unexpected error, after recording it as ``internal_error``.
        """
        try:
            job = self.store.get(job_id)
        except JobNotFoundError:
            log.warning("job %s is gone (deleted or expired); nothing to do", job_id, extra={"job_id": job_id})
            return {"job_id": job_id, "status": "gone", "skipped": True}
        if job["status"] in FINAL:
            log.info("job %s is already %s; skipped", job_id, job["status"], extra={"job_id": job_id})
            return {"job_id": job_id, "status": job["status"], "skipped": True}
        if job["attempts"] >= self.settings.max_attempts:
            # Redelivered again after its worker died each time (e.g. killed for memory): stop here.
            return self._fail(job_id, "worker_lost", f"the job was started {job['attempts']} times and its "
                              "worker died each time (out of memory?); try a smaller volume")
        queued_s = (utc_now() - parse_iso(job["created_at"])).total_seconds()
        try:
            self.store.transition(job_id, "running", expect_status={"queued", "running"}, stage="preprocessing",
                                  progress=0.0, stage_detail=None, error=None, result=None,
                                  attempts=job["attempts"] + 1, timings={"queue_s": round(queued_s, 3)})
        except (JobStateError, JobNotFoundError):
            return {"job_id": job_id, "status": "cancelled", "skipped": True}
        if job["status"] == "running":
            log.warning("job %s restarts from scratch (attempt %d): its previous worker died", job_id,
                        job["attempts"] + 1, extra={"job_id": job_id})
        self._clear_outputs(job_id)
        try:
            return self._segment(job_id, job, report)
        except (JobCancelledError, JobNotFoundError):
            log.info("job %s was cancelled or deleted during inference; stopped", job_id, extra={"job_id": job_id})
            return {"job_id": job_id, "status": "cancelled"}
        except SoftTimeLimitExceeded:
            return self._fail(job_id, "time_limit", f"the job ran longer than {self.settings.soft_limit_s:g} s and "
                              "was stopped; try a smaller volume or a faster machine")
        except BrainscanError as exc:
            return self._fail(job_id, exc.code, exc.message)
        except TRANSIENT_ERRORS as exc:
            if can_retry:
                self._requeue(job_id, exc)
                raise
            return self._fail(job_id, "transient_error", f"the broker was unreachable: {exc}; submit the job again")
        except MemoryError:
            return self._fail(job_id, "out_of_memory", "the worker ran out of memory; try a smaller volume")
        except Exception as exc:
            self._fail(job_id, "internal_error", f"{type(exc).__name__}: {exc}")
            raise
        finally:
            self._expire()

    # -- the pipeline ---------------------------------------------------------------------------

    def _segment(self, job_id: str, job: dict[str, Any], report: Callable[[dict[str, Any]], None] | None
                 ) -> dict[str, Any]:
        from brainscan.data.brats import BratsCase, load_case
        from brainscan.evaluation.segment import segment_case
        from brainscan.io.nifti import save_like
        from brainscan.labels import to_convention
        from brainscan.metrics.segmentation import volumes_ml
        from services.segmenter.intake import input_file_name
        from services.segmenter.previews import render_previews

        started = time.perf_counter()
        dicom = job["input"].get("source") == "dicom"
        if dicom:
            case = self._load_study(job_id, job)
        else:
            modalities = {m: self.store.path_for(job_id, input_file_name(m)) for m in MODALITIES}
            case = load_case(BratsCase(case_id=job_id, folder=modalities["flair"].parent, modalities=modalities),
                             with_seg=False)
        model = self.models.get(job["model"]["arch"], job["model"]["version"])
        loaded = time.perf_counter()
        self._check_running(job_id)
        self.store.update(job_id, expect_status={"running"}, stage="inference",
                          progress=stage_progress("inference"), stage_detail=None)
        on_patch = self._progress_callback(job_id, report)
        mask = segment_case(model.bundle, case, progress=on_patch, predict_fn=model.predict_fn)
        inferred = time.perf_counter()
        worker_metrics.record_inference(inferred - loaded)
        self.store.update(job_id, expect_status={"running"}, stage="writing results",
                          progress=stage_progress("writing results"), stage_detail=None)
        reference = case.reference
        # the mask speaks the labels of the upload's naming (enhancing tumour 3 for BraTS 2023-2024 names)
        convention = job["input"].get("label_convention", BRATS2021)
        if dicom:
            files = self._write_dicom_results(job_id, case, to_convention(mask, convention), model.bundle)
        else:
            save_like(to_convention(mask, convention), reference, self.store.path_for(job_id, MASK_FILE))
            files = {"mask": MASK_FILE}
        for name in files.values():
            self.store.commit_file(job_id, name)
        volumes = volumes_ml(mask, reference.spacing)
        previews = render_previews(case.channels[3], mask, reference.affine, reference.spacing)
        for plane, name in PREVIEW_FILES.items():
            self.store.path_for(job_id, name).write_bytes(previews[plane])
            self.store.commit_file(job_id, name)
        written = time.perf_counter()
        timings = {
            **self.store.get(job_id).get("timings", {}),
            "preprocess_s": round(loaded - started, 3),
            "inference_s": round(inferred - loaded, 3),
            "write_s": round(written - inferred, 3),
            "total_s": round(written - started, 3),
        }
        result = {**files, "files": list(files.values()), "volumes_ml": {k: round(v, 3) for k, v in volumes.items()},
                  "previews": dict(PREVIEW_FILES), "labels": result_labels(convention)}
        self.store.transition(job_id, "succeeded", expect_status={"running"}, result=result, timings=timings)
        log.info("job %s succeeded", job_id, extra={"job_id": job_id, "timings": timings,
                                                    "model": job["model"]["arch"], "volumes_ml": result["volumes_ml"]})
        return {"job_id": job_id, "status": "succeeded"}

    def _load_study(self, job_id: str, job: dict[str, Any]) -> Any:
        """The job's DICOM study as a case on the t1ce grid (:func:`brainscan.dicom.load_dicom_case`, as
        the CLI loads it), from exactly the series the intake checked; records that grid in ``input``."""
        import nibabel as nib

        from brainscan.dicom.case import load_dicom_case

        mapping = {summary["series_instance_uid"]: modality for modality, summary in job["input"]["series"].items()}
        case = load_dicom_case(self.store.path_for(job_id, STUDY_FILE), mapping)
        grid = {"shape": list(case.reference.shape), "spacing_mm": [round(float(s), 6) for s in case.reference.spacing],
                "orientation": "".join(nib.aff2axcodes(case.reference.affine))}
        self.store.update(job_id, expect_status={"running"}, input={**job["input"], **grid})
        return case

    def _write_dicom_results(self, job_id: str, case: Any, mask: Any, bundle: Any) -> dict[str, str]:
        """Write a DICOM job's outputs with :func:`brainscan.dicom.save_dicom_results` (the CLI's writer):
        ``seg.dcm``, ``mask.nii.gz`` and ``transforms.json``, and the four volumes on the t1ce grid as
        the job's ``input_<modality>.nii.gz`` (what the model saw; the page's viewer shows them).

        Returns:
            ``{"mask", "seg", "transforms"}`` -> job file name.
        """
        from brainscan.dicom.case import save_dicom_results
        from brainscan.dicom.seg import bundle_algorithm
        from services.segmenter.intake import input_file_name

        folder = self.store.path_for(job_id, MASK_FILE).parent
        written = save_dicom_results(case, mask, folder, algorithm=bundle_algorithm(bundle), save_volumes=True)
        for modality in MODALITIES:
            Path(written[modality]).replace(self.store.path_for(job_id, input_file_name(modality)))
            self.store.commit_file(job_id, input_file_name(modality))
        return {"mask": MASK_FILE, "seg": SEG_FILE, "transforms": TRANSFORMS_FILE}

    def _progress_callback(self, job_id: str, report: Callable[[dict[str, Any]], None] | None
                           ) -> Callable[[int, int], None]:
        """``(done, total)`` after each network call: stop if cancelled; record progress, throttled."""
        last_write = [float("-inf")]

        def on_patch(done: int, total: int) -> None:
            self._check_running(job_id)
            now = time.monotonic()
            if done < total and now - last_write[0] < self.settings.progress_interval_s:
                return
            last_write[0] = now
            fields = {"progress": stage_progress("inference", done / max(total, 1)),
                      "stage_detail": f"patch {done} of {total}"}
            try:
                self.store.update(job_id, expect_status={"running"}, **fields)
            except JobStateError as exc:
                raise JobCancelledError(job_id) from exc
            if report is not None:
                report({"job_id": job_id, "stage": "inference", **fields})

        return on_patch

    def _check_running(self, job_id: str) -> None:
        if self.store.get(job_id)["status"] != "running":
            raise JobCancelledError(job_id)

    # -- outcomes -------------------------------------------------------------------------------

    def _clear_outputs(self, job_id: str) -> None:
        """Remove results a previous, interrupted attempt may have left."""
        outputs = [MASK_FILE, SEG_FILE, TRANSFORMS_FILE, *PREVIEW_FILES.values()]
        if self.store.get(job_id)["input"].get("source") == "dicom":
            outputs += MODALITY_FILES  # a DICOM job's volumes on the t1ce grid are outputs too
        for name in outputs:
            self.store.path_for(job_id, name).unlink(missing_ok=True)

    def _fail(self, job_id: str, code: str, detail: str) -> dict[str, Any]:
        detail = self.settings.redact_paths(detail)  # the owner reads it in the job body
        try:
            self.store.transition(job_id, "failed", expect_status={"queued", "running"},
                                  error={"error": code, "detail": detail}, stage_detail=None)
        except (JobStateError, JobNotFoundError):
            return {"job_id": job_id, "status": "cancelled"}  # cancelled or deleted meanwhile: keep that
        log.warning("job %s failed: %s: %s", job_id, code, detail, extra={"job_id": job_id, "error": code})
        return {"job_id": job_id, "status": "failed", "error": code}

    def _requeue(self, job_id: str, exc: BaseException) -> None:
        try:
            self.store.transition(job_id, "queued", expect_status={"running"}, progress=0.0,
                                  stage_detail=f"retrying after a transient error: {type(exc).__name__}")
        except (JobStateError, JobNotFoundError):
            pass

    def _expire(self) -> None:
        try:
            self.store.expire()
        except OSError as exc:  # a sweep that fails must not fail the job that triggered it
            log.warning("job expiry sweep failed: %s", exc)


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


class SegmentTask(Task):
    """Records a hard time limit (the process was killed, so the task itself could not) as a failed job."""

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        if isinstance(exc, TimeLimitExceeded) and args:
            runner()._fail(str(args[0]), "time_limit", f"the job exceeded the hard time limit of "
                           f"{settings.time_limit_s:g} s and its worker process was stopped")


@app.task(name=TASK_NAME, bind=True, base=SegmentTask, acks_late=True, reject_on_worker_lost=True,
          max_retries=max(settings.max_attempts - 1, 0))
def segment(self: Task, job_id: str) -> dict[str, Any]:
    """Celery task ``segmenter.segment``: segment job ``job_id`` (see :class:`JobRunner`)."""

    def report(meta: dict[str, Any]) -> None:
        if self.request.id:
            self.update_state(state="PROGRESS", meta=meta)

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
