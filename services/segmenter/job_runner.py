"""The job logic of the segmentation worker: one job from the store to its result (:class:`JobRunner`).

The Celery task in :mod:`services.segmenter.worker` is a thin shell around it; tests call
:meth:`JobRunner.run` directly with a store and a model cache. TensorFlow comes in only with the
models (:mod:`services.segmenter.model_cache`), never at import. Delivery guarantees, attempts and
progress are described in :mod:`services.segmenter.worker`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from brainscan.errors import BrainscanError
from brainscan.labels import BRATS2021, MODALITIES
from services.segmenter.job_record import Job, JobStatus
from services.segmenter.jobs import (
    MASK_FILE,
    MODALITY_FILES,
    PREVIEW_FILES,
    SEG_FILE,
    STUDY_FILE,
    TRANSFORMS_FILE,
    JobNotFoundError,
    JobStateError,
    claim_refusal,
    iso,
    parse_iso,
    result_labels,
    stage_progress,
    utc_now,
)
from services.segmenter.attempts import (
    Heartbeat,
    lost_reason,
    process_alive,
    record_worker_lost,
    too_many_attempts,
    worker_identity,
)
from services.segmenter import worker_metrics
from services.segmenter.model_cache import ModelCache
from services.segmenter.settings import Settings
from services.segmenter.store import JobStore
from services.segmenter.upload import input_file_name

log = logging.getLogger("services.segmenter.worker")

#: errors worth another try: the broker or result backend was briefly unreachable
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (RedisConnectionError, RedisTimeoutError, KombuOperationalError)


class JobCancelledError(Exception):
    """Raised from the progress callback to stop inference of a job that was cancelled (or deleted)."""


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
        worker = worker_identity()
        refusal = claim_refusal(job, utc_now(), stale_after_s=self.settings.heartbeat_timeout_s,
                                is_alive=process_alive)
        if refusal is not None:  # final, or a second delivery of a job that runs elsewhere
            log.info("job %s not started: %s; this delivery is dropped", job_id, refusal, extra={"job_id": job_id})
            return {"job_id": job_id, "status": job.status, "skipped": True}
        if job.attempts >= self.settings.max_attempts:
            # Redelivered again after its worker died each time (e.g. killed for memory): stop here.
            return self._fail(job_id, "worker_lost", too_many_attempts(job.attempts))
        queued_s = (utc_now() - parse_iso(job.created_at)).total_seconds()
        attempt = {"attempt_id": uuid.uuid4().hex}
        try:  # compare-and-set: exactly one of two racing deliveries gets the job
            self.store.transition(job_id, JobStatus.RUNNING, expect_status={job.status},
                                  expect_fields={"attempt_id": job.attempt_id}, stage="preprocessing",
                                  progress=0.0, stage_detail=None, error=None, result=None,
                                  attempts=job.attempts + 1, timings={"queue_s": round(queued_s, 3)},
                                  worker=worker, heartbeat_at=iso(utc_now()), **attempt)
        except (JobStateError, JobNotFoundError):
            return {"job_id": job_id, "status": JobStatus.CANCELLED, "skipped": True}
        if job.status is JobStatus.RUNNING:
            log.warning("job %s restarts from scratch (attempt %d): its previous worker %s died", job_id,
                        job.attempts + 1, job.worker, extra={"job_id": job_id})
        self._clear_outputs(job_id)
        try:
            with Heartbeat(self.store, job_id, attempt["attempt_id"], self.settings.heartbeat_interval_s):
                return self._segment(job_id, job, report, attempt)
        except (JobCancelledError, JobNotFoundError):
            log.info("job %s was cancelled, deleted or taken over during inference; stopped", job_id,
                     extra={"job_id": job_id})
            return {"job_id": job_id, "status": JobStatus.CANCELLED}
        except SoftTimeLimitExceeded:
            return self._fail(job_id, "time_limit", f"the job ran longer than {self.settings.soft_limit_s:g} s and "
                              "was stopped; try a smaller volume or a faster machine", attempt)
        except BrainscanError as exc:
            return self._fail(job_id, exc.code, exc.message, attempt)
        except TRANSIENT_ERRORS as exc:
            if can_retry:
                self._requeue(job_id, exc)
                raise
            return self._fail(job_id, "transient_error", f"the broker was unreachable: {exc}; submit the job again",
                              attempt)
        except MemoryError:
            return self._fail(job_id, "out_of_memory", "the worker ran out of memory; try a smaller volume", attempt)
        except Exception as exc:
            self._fail(job_id, "internal_error", f"{type(exc).__name__}: {exc}", attempt)
            raise
        finally:
            self._expire()

    def worker_lost(self, job_id: str, worker: str, error: BaseException) -> Job | None:
        """Record that ``worker`` (``host:pid``) died running ``job_id`` (see
        :func:`services.segmenter.attempts.record_worker_lost`); the worker's main process calls it."""
        return record_worker_lost(self.store, job_id, worker, lost_reason(error),
                                  max_attempts=self.settings.max_attempts)

    # -- the pipeline ---------------------------------------------------------------------------

    def _segment(self, job_id: str, job: Job, report: Callable[[dict[str, Any]], None] | None,
                 attempt: dict[str, str]) -> dict[str, Any]:
        """The pipeline of one attempt; every write expects ``attempt`` (its ``attempt_id``)."""
        from brainscan.data.brats import BratsCase, load_case
        from brainscan.inference.segmenter import segment_case
        from brainscan.io.nifti import save_like
        from brainscan.labels import to_convention
        from brainscan.metrics.segmentation import volumes_ml
        from services.segmenter.previews import render_previews, tumour_centre_record

        started = time.perf_counter()
        dicom = job.input.get("source") == "dicom"
        aligned = bool(job.input.get("alignment", {}).get("needed"))  # NIfTI modalities on different grids
        if dicom:
            case = self._load_study(job_id, job, attempt)
        elif aligned:
            case = self._load_aligned(job_id, job)
        else:
            modalities = {m: self.store.path_for(job_id, input_file_name(m)) for m in MODALITIES}
            case = load_case(BratsCase(case_id=job_id, folder=modalities["flair"].parent, modalities=modalities),
                             with_seg=False)
        model = self.models.get(job.model["arch"], job.model["version"])
        loaded = time.perf_counter()
        self._check_running(job_id, attempt)
        self.store.update(job_id, expect_status={JobStatus.RUNNING}, expect_fields=attempt, stage="inference",
                          progress=stage_progress("inference"), stage_detail=None)
        on_patch = self._progress_callback(job_id, report, attempt)
        mask = segment_case(model.bundle, case, progress=on_patch, predict_fn=model.predict_fn)
        inferred = time.perf_counter()
        worker_metrics.record_inference(inferred - loaded)
        self.store.update(job_id, expect_status={JobStatus.RUNNING}, expect_fields=attempt, stage="writing results",
                          progress=stage_progress("writing results"), stage_detail=None)
        reference = case.reference
        # the mask speaks the labels of the upload's naming (enhancing tumour 3 for BraTS 2023-2024 names)
        convention = job.input.get("label_convention", BRATS2021)
        if dicom:
            files = self._write_dicom_results(job_id, case, to_convention(mask, convention), model.bundle)
        elif aligned:
            from brainscan.preprocess.align import save_aligned_results

            save_aligned_results(case, to_convention(mask, convention), self.store.path_for(job_id, MASK_FILE).parent)
            files = {"mask": MASK_FILE, "transforms": TRANSFORMS_FILE}
        else:
            save_like(to_convention(mask, convention), reference, self.store.path_for(job_id, MASK_FILE))
            files = {"mask": MASK_FILE}
        for name in files.values():
            self.store.commit_file(job_id, name)
        volumes = volumes_ml(mask, reference.spacing)
        centre = tumour_centre_record(mask, reference.affine)
        previews = render_previews(case.channels[3], mask, reference.affine, reference.spacing,
                                   centre=centre["voxel"] if centre else None)
        for plane, name in PREVIEW_FILES.items():
            self.store.path_for(job_id, name).write_bytes(previews[plane])
            self.store.commit_file(job_id, name)
        pacs = self._push_seg(job_id, job.input["pacs"], attempt) if job.input.get("pacs") else None
        written = time.perf_counter()
        timings = {
            **self.store.get(job_id).get("timings", {}),
            "preprocess_s": round(loaded - started, 3),
            "inference_s": round(inferred - loaded, 3),
            "write_s": round(written - inferred, 3),
            "total_s": round(written - started, 3),
        }
        result = {**files, "files": list(files.values()), "volumes_ml": {k: round(v, 3) for k, v in volumes.items()},
                  "previews": dict(PREVIEW_FILES), "labels": result_labels(convention),
                  "tumour_centre": centre}
        precision = getattr(model.bundle, "precision", None)  # the arithmetic the network ran in
        if precision is not None:
            result["precision"] = precision
        if pacs is not None:
            result["pacs"] = pacs
        self.store.transition(job_id, JobStatus.SUCCEEDED, expect_status={JobStatus.RUNNING}, expect_fields=attempt,
                              result=result, timings=timings, heartbeat_at=None)
        log.info("job %s succeeded", job_id, extra={"job_id": job_id, "timings": timings,
                                                    "model": job.model["arch"], "volumes_ml": result["volumes_ml"]})
        return {"job_id": job_id, "status": JobStatus.SUCCEEDED}

    def _load_study(self, job_id: str, job: Job, attempt: dict[str, str]) -> Any:
        """The job's DICOM study as a case on the t1ce grid (:func:`brainscan.dicom.load_dicom_case`, as
        the CLI loads it), from exactly the series the intake checked; records that grid in ``input``."""
        import nibabel as nib

        from brainscan.dicom.case import load_dicom_case

        mapping = {summary["series_instance_uid"]: modality for modality, summary in job.input["series"].items()}
        case = load_dicom_case(self.store.path_for(job_id, STUDY_FILE), mapping)
        grid = {"shape": list(case.reference.shape), "spacing_mm": [round(float(s), 6) for s in case.reference.spacing],
                "orientation": "".join(nib.aff2axcodes(case.reference.affine))}
        self.store.update(job_id, expect_status={JobStatus.RUNNING}, expect_fields=attempt, input={**job.input, **grid})
        return case

    def _load_aligned(self, job_id: str, job: Job) -> Any:
        """A NIfTI job whose modalities are on different grids, brought onto the t1ce grid
        (:func:`brainscan.preprocess.align.align_nifti_case`: the DICOM path's registration and brain
        extraction); its stored inputs stay as uploaded."""
        from brainscan.io.nifti import load_nifti
        from brainscan.preprocess.align import align_nifti_case

        volumes = {m: load_nifti(self.store.path_for(job_id, input_file_name(m))) for m in MODALITIES}
        return align_nifti_case(volumes, case_id=job_id, names=job.input.get("filenames"))

    def _push_seg(self, job_id: str, pacs: dict[str, Any], attempt: dict[str, str]) -> dict[str, Any]:
        """Store a PACS job's SEG back in its PACS (:func:`services.segmenter.dicom_intake.push_seg`); the
        outcome goes into ``result.pacs``, and a failed push still leaves a succeeded job with its SEG."""
        from services.segmenter.dicom_intake import push_seg

        self.store.update(job_id, expect_status={JobStatus.RUNNING}, expect_fields=attempt,
                          stage_detail=f"storing the SEG in PACS {pacs['server']}")
        return push_seg(pacs, self.store.path_for(job_id, SEG_FILE), self.settings.dicomweb_servers,
                        timeout_s=self.settings.dicomweb_timeout_s)

    def _write_dicom_results(self, job_id: str, case: Any, mask: Any, bundle: Any) -> dict[str, str]:
        """Write a DICOM job's outputs with :func:`brainscan.dicom.save_dicom_results` (the CLI's writer):
        ``seg.dcm``, ``mask.nii.gz`` and ``transforms.json``, and the four volumes on the t1ce grid as
        the job's ``input_<modality>.nii.gz`` (what the model saw; the page's viewer shows them).

        Returns:
            ``{"mask", "seg", "transforms"}`` -> job file name.
        """
        from brainscan.dicom.case import save_dicom_results
        from brainscan.dicom.seg import bundle_algorithm

        folder = self.store.path_for(job_id, MASK_FILE).parent
        written = save_dicom_results(case, mask, folder, algorithm=bundle_algorithm(bundle), save_volumes=True)
        for modality in MODALITIES:
            Path(written[modality]).replace(self.store.path_for(job_id, input_file_name(modality)))
            self.store.commit_file(job_id, input_file_name(modality))
        return {"mask": MASK_FILE, "seg": SEG_FILE, "transforms": TRANSFORMS_FILE}

    def _progress_callback(self, job_id: str, report: Callable[[dict[str, Any]], None] | None,
                           attempt: dict[str, str]) -> Callable[[int, int], None]:
        """``(done, total)`` after each network call: stop if cancelled; record progress, throttled."""
        last_write = [float("-inf")]

        def on_patch(done: int, total: int) -> None:
            self._check_running(job_id, attempt)
            now = time.monotonic()
            if done < total and now - last_write[0] < self.settings.progress_interval_s:
                return
            last_write[0] = now
            fields = {"progress": stage_progress("inference", done / max(total, 1)),
                      "stage_detail": f"patch {done} of {total}"}
            try:
                self.store.update(job_id, expect_status={JobStatus.RUNNING}, expect_fields=attempt, **fields)
            except JobStateError as exc:
                raise JobCancelledError(job_id) from exc
            if report is not None:
                report({"job_id": job_id, "stage": "inference", **fields})

        return on_patch

    def _check_running(self, job_id: str, attempt: dict[str, str]) -> None:
        """Stop (:class:`JobCancelledError`) unless the job still runs as this attempt."""
        job = self.store.get(job_id)
        if job.status is not JobStatus.RUNNING or job.attempt_id != attempt["attempt_id"]:
            raise JobCancelledError(job_id)

    # -- outcomes -------------------------------------------------------------------------------

    def _clear_outputs(self, job_id: str) -> None:
        """Remove results a previous, interrupted attempt may have left."""
        outputs = [MASK_FILE, SEG_FILE, TRANSFORMS_FILE, *PREVIEW_FILES.values()]
        if self.store.get(job_id)["input"].get("source") == "dicom":
            outputs += MODALITY_FILES  # a DICOM job's volumes on the t1ce grid are outputs too
        for name in outputs:
            self.store.path_for(job_id, name).unlink(missing_ok=True)

    def _fail(self, job_id: str, code: str, detail: str, attempt: dict[str, str] | None = None) -> dict[str, Any]:
        """Record the failure (only while the job runs as ``attempt``, when given)."""
        detail = self.settings.redact_paths(detail)  # the owner reads it in the job body
        try:
            self.store.transition(job_id, JobStatus.FAILED, expect_status={JobStatus.QUEUED, JobStatus.RUNNING},
                                  expect_fields=attempt, error={"error": code, "detail": detail}, stage_detail=None,
                                  heartbeat_at=None)
        except (JobStateError, JobNotFoundError):
            return {"job_id": job_id, "status": JobStatus.CANCELLED}  # cancelled or deleted meanwhile: keep that
        log.warning("job %s failed: %s: %s", job_id, code, detail, extra={"job_id": job_id, "error": code})
        return {"job_id": job_id, "status": JobStatus.FAILED, "error": code}

    def _requeue(self, job_id: str, exc: BaseException) -> None:
        try:
            self.store.transition(job_id, JobStatus.QUEUED, expect_status={JobStatus.RUNNING}, progress=0.0,
                                  heartbeat_at=None,
                                  stage_detail=f"retrying after a transient error: {type(exc).__name__}")
        except (JobStateError, JobNotFoundError):
            pass

    def _expire(self) -> None:
        try:
            self.store.expire()
        except OSError as exc:  # a sweep that fails must not fail the job that triggered it
            log.warning("job expiry sweep failed: %s", exc)
