"""The segmentation job: its record, its states and the transitions between them.

A job record is the JSON object the job store keeps as ``job.json``, read as a typed
:class:`~services.segmenter.job_record.Job` (its status a :class:`~services.segmenter.job_record.JobStatus`);
the transitions below apply to the JSON object under the store's lock. :func:`public_view` turns it
into the response body of ``GET /v1/jobs/{id}`` (``docs/CONTRACTS.md``, "Segmenter contract").

States::

    queued ──> running ──> succeeded
      │  │       │ │ └───> failed
      │  │       │ └─────> cancelled
      │  └───────┼───────> cancelled / failed
      │          ├──> running   (taken over after its worker died: restarts from scratch)
      │          └──> queued    (worker lost, or a transient error: the job is queued again)
      └── succeeded, failed and cancelled are final; only DELETE (or expiry) removes them.

Who runs a job: a worker process *claims* it (``queued -> running``, or ``running -> running`` when
the previous attempt is dead) and writes a fresh ``attempt_id``, ``worker`` (``host:pid``) and
``heartbeat_at``, which it renews every few seconds while it works. Every write of an attempt
expects its own ``attempt_id``, so an attempt that another one took over writes nothing more, and a
second delivery of the same job finds it running with a fresh heartbeat and leaves it alone
(:func:`claim_refusal`): a job never runs twice at once, and a rerun starts from scratch on the same
inputs and model version, so it cannot end with a different result. A job whose worker is lost is
put back to ``queued`` with ``stage_detail`` "worker lost ..., retrying" (by the worker's main
process when a pool process dies, by the API's reconciler when a heartbeat stops).

Stages of a running job, with the share of ``progress`` each one covers: ``preprocessing``
(reading the inputs, 0-5 %), ``inference`` (sliding-window patches, 5-95 %), ``writing results``
(mask, volumes, previews, 95-100 %), then ``done``. Every change of status or stage is appended to
the record's ``history`` (``[{"at", "status", "stage"}]``), so a test or an operator can see that a
job was restarted.

The record never holds the owner id itself (a browser session id would be a live session for
anyone who reads the jobs volume), only ``owner_hash``, its :func:`owner_digest`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

from brainscan.errors import BrainscanError
from brainscan.labels import BRATS2021, BRATS_LABEL_NAMES, BRATS_LABELS, convention_label_names
from services.segmenter.job_record import JobStatus

STATUSES = tuple(status.value for status in JobStatus)
FINAL = frozenset(status for status in JobStatus if status.is_final)
STAGES = ("queued", "preprocessing", "inference", "writing results", "done")
#: the allowed next statuses of each status (see the module docstring)
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.FAILED}),
    JobStatus.RUNNING: frozenset({JobStatus.RUNNING, JobStatus.QUEUED, JobStatus.SUCCEEDED, JobStatus.FAILED,
                                  JobStatus.CANCELLED}),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}
#: ``progress`` at the start and end of each stage
STAGE_PROGRESS: dict[str, tuple[float, float]] = {
    "queued": (0.0, 0.0),
    "preprocessing": (0.0, 0.05),
    "inference": (0.05, 0.95),
    "writing results": (0.95, 1.0),
    "done": (1.0, 1.0),
}
MODALITY_FILES = ("input_t1.nii.gz", "input_t1ce.nii.gz", "input_t2.nii.gz", "input_flair.nii.gz")
MASK_FILE = "mask.nii.gz"
#: a DICOM job's files: the study as uploaded, and beside the mask the DICOM SEG and the record of
#: every transform (the names :func:`brainscan.dicom.save_dicom_results` writes; a test keeps them equal)
STUDY_FILE = "input_study.zip"
SEG_FILE = "seg.dcm"
TRANSFORMS_FILE = "transforms.json"
PREVIEW_PLANES = ("axial", "coronal", "sagittal")
PREVIEW_FILES = {plane: f"preview_{plane}.png" for plane in PREVIEW_PLANES}
#: every file name a job may hold and the API may serve; anything else is refused
ALLOWED_FILES = frozenset({*MODALITY_FILES, MASK_FILE, *PREVIEW_FILES.values(), STUDY_FILE, SEG_FILE,
                           TRANSFORMS_FILE})
#: label value -> name in a result, e.g. {"1": "NCR"}
RESULT_LABELS = {str(label): BRATS_LABEL_NAMES[label] for label in BRATS_LABELS if label != 0}
#: domain separation of the owner hash: no other SHA-256 in the project matches it
OWNER_HASH_PREFIX = b"brainscan job owner v1\0"
_PUBLIC_KEYS = ("id", "status", "progress", "stage", "stage_detail", "error", "created_at", "started_at",
                "finished_at", "expires_at", "model", "input")


class JobNotFoundError(BrainscanError):
    """No such job (or it belongs to another owner: the API never tells the two apart)."""

    code = "not_found"
    http_status = 404


class JobStateError(BrainscanError):
    """A transition that the job's current status does not allow (e.g. running after cancelled)."""

    code = "job_conflict"
    http_status = 409

    def __init__(self, message: str, *, status: str) -> None:
        super().__init__(message)
        self.status = status


def utc_now() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(timezone.utc)


def iso(moment: datetime) -> str:
    """``2024-06-01T12:00:00.000Z`` (the format of manifests)."""
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(text: str) -> datetime:
    """Inverse of :func:`iso` (naive times are taken as UTC)."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def owner_digest(owner: str) -> str:
    """What a job record keeps of its owner id: SHA-256 (hex) of a fixed prefix and the id.

    Owner ids are 256-bit random session ids or hashes of API keys (``gateway.ownership``), so the
    digest cannot be turned back into a usable id; it is stable across restarts and token
    rotations, so an owner keeps its jobs.
    """
    return hashlib.sha256(OWNER_HASH_PREFIX + owner.encode()).hexdigest()


def is_owned_by(job: Mapping[str, Any], owner: str) -> bool:
    """Whether ``owner`` owns ``job`` (compared in constant time).

    A record written before owner hashing holds the raw ``owner``; it is compared through its
    digest too, until the API's start-up rewrites it (``LocalJobStore.hash_legacy_owners``).
    """
    stored = job.get("owner_hash")
    if stored is None and isinstance(job.get("owner"), str):
        stored = owner_digest(job["owner"])
    return isinstance(stored, str) and hmac.compare_digest(stored, owner_digest(owner))


def new_job(*, job_id: str, owner: str, model: dict[str, Any], input_meta: dict[str, Any],
            now: datetime, ttl_s: float) -> dict[str, Any]:
    """The record of a freshly submitted job (status ``queued``).

    Args:
        job_id: the unguessable id.
        owner: the opaque owner id (``X-Brainscan-Owner``); only this owner sees the job. The
            record keeps only its :func:`owner_digest`.
        model: ``{"name", "arch", "version", "demo"}`` of the bundle the job will use.
        input_meta: ``{"shape", "spacing_mm", "source", ...}`` from the intake.
        now: the creation time.
        ttl_s: seconds until the job expires.

    Raises:
        ValueError: a non-positive ``ttl_s`` or an empty owner.
    """
    if not ttl_s > 0:
        raise ValueError(f"ttl_s must be positive, got {ttl_s}")
    if not owner:
        raise ValueError("owner must be a non-empty string")
    return {
        "id": job_id,
        "owner_hash": owner_digest(owner),
        "status": JobStatus.QUEUED,
        "progress": 0.0,
        "stage": "queued",
        "stage_detail": None,
        "error": None,
        "created_at": iso(now),
        "started_at": None,
        "finished_at": None,
        "expires_at": iso(now + timedelta(seconds=ttl_s)),
        "model": dict(model),
        "input": dict(input_meta),
        "result": None,
        "timings": {},
        "attempts": 0,
        "task_id": None,
        "enqueued_at": None,
        "attempt_id": None,
        "worker": None,
        "heartbeat_at": None,
        "history": [{"at": iso(now), "status": JobStatus.QUEUED, "stage": "queued"}],
    }


def check_transition(current: str, new: str) -> None:
    """Raise :class:`JobStateError` unless ``current -> new`` is allowed.

    Raises:
        ValueError: ``new`` is not a status at all.
        JobStateError: the transition is not allowed (e.g. out of a final status).
    """
    if new not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {new!r}")
    if new not in TRANSITIONS.get(current, frozenset()):
        raise JobStateError(f"a {current} job cannot become {new}", status=current)


def apply_transition(job: dict[str, Any], status: str, now: datetime, **fields: Any) -> dict[str, Any]:
    """Move ``job`` (in place) to ``status`` and set ``fields``; returns ``job``.

    Sets ``started_at`` on entering ``running``, ``finished_at`` on a final status, the stage
    that goes with a final status (``done`` after success), and appends to ``history``.

    Raises:
        JobStateError / ValueError: as :func:`check_transition`.
    """
    check_transition(job["status"], status)
    job["status"] = status = JobStatus(status)
    if status is JobStatus.RUNNING:
        job["started_at"] = iso(now)
        job["finished_at"] = None
    elif status is JobStatus.QUEUED:
        job["stage"] = "queued"
    if status.is_final:
        job["finished_at"] = iso(now)
        if status is JobStatus.SUCCEEDED:
            job["stage"], job["progress"], job["stage_detail"] = "done", 1.0, None
    job.update(fields)
    if "stage" in fields and fields["stage"] not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {fields['stage']!r}")
    job["history"].append({"at": iso(now), "status": status, "stage": job["stage"]})
    return job


def apply_update(job: dict[str, Any], now: datetime, **fields: Any) -> dict[str, Any]:
    """Set ``fields`` on ``job`` (in place; not ``status``, see :func:`apply_transition`); returns ``job``.

    A change of ``stage`` is appended to ``history``.

    Raises:
        ValueError: ``status`` among the fields, or an unknown stage.
    """
    if "status" in fields:
        raise ValueError("the status changes only through apply_transition()")
    stage = fields.get("stage", job["stage"])
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    changed = stage != job["stage"]
    job.update(fields)
    if changed:
        job["history"].append({"at": iso(now), "status": job["status"], "stage": stage})
    return job


def heartbeat_age_s(job: Mapping[str, Any], now: datetime) -> float:
    """Seconds since the running attempt of ``job`` last showed a sign of life (its ``heartbeat_at``,
    else its ``started_at``, else its ``created_at``)."""
    last = job.get("heartbeat_at") or job.get("started_at") or job["created_at"]
    return (now - parse_iso(last)).total_seconds()


def claim_refusal(job: Mapping[str, Any], now: datetime, *, stale_after_s: float,
                  is_alive: Callable[[str], bool] = lambda worker: True) -> str | None:
    """Why a worker process must not start ``job`` now, or None when it may (see the module docstring).

    Args:
        job: the record as read.
        now: the current time.
        stale_after_s: a heartbeat older than this means the attempt is dead.
        is_alive: whether the ``host:pid`` of the running attempt still runs, when that can be
            told (a process on this host); ``True`` when it cannot.

    Returns:
        ``None`` for a queued job, or a running one whose attempt is gone (no ``attempt_id``, a
        stale heartbeat, or a dead process); else the reason. A fresh attempt of the claiming
        process itself is no exception: another thread of a thread pool may run it.
    """
    if job["status"] in FINAL:
        return f"the job is already {job['status']}"
    if job["status"] != JobStatus.RUNNING or not job.get("attempt_id"):
        return None
    age = heartbeat_age_s(job, now)
    if age > stale_after_s or not is_alive(str(job.get("worker"))):
        return None
    return f"it is running on {job.get('worker')} (heartbeat {age:.0f} s ago)"


def stage_progress(stage: str, fraction: float = 0.0) -> float:
    """Overall progress at ``fraction`` (0-1) of the way through ``stage``."""
    start, end = STAGE_PROGRESS[stage]
    return round(start + (end - start) * min(max(fraction, 0.0), 1.0), 4)


def result_labels(convention: str = BRATS2021) -> dict[str, str]:
    """Label value in a job's mask -> name: :data:`RESULT_LABELS` for ``"brats2021"``, and
    ``{"1": "NCR", "2": "ED", "3": "ET"}`` for a job uploaded with BraTS 2023-2024 names."""
    return {str(label): name for label, name in convention_label_names(convention).items() if label != 0}


def is_expired(job: Mapping[str, Any], now: datetime) -> bool:
    """Whether ``job`` is past its ``expires_at``."""
    return parse_iso(job["expires_at"]) <= now


def public_view(job: Mapping[str, Any], prefix: str = "/v1/jobs") -> dict[str, Any]:
    """The response body of ``GET /v1/jobs/{id}`` for a job record.

    Internal fields (owner, task id, history) stay out; file names become URLs under ``prefix``.
    """
    base = f"{prefix}/{job['id']}"
    body = {key: job.get(key) for key in _PUBLIC_KEYS}
    body["links"] = {
        "self": base,
        "inputs": {name[len("input_"):-len(".nii.gz")]: f"{base}/files/{name}" for name in MODALITY_FILES},
    }
    result = job.get("result")
    body["result"] = None if result is None else {
        "mask_url": f"{base}/files/{result['mask']}",
        "volumes_ml": result["volumes_ml"],
        "previews": {plane: f"{base}/files/{name}" for plane, name in result["previews"].items()},
        "labels": result["labels"],
        "tumour_centre": result.get("tumour_centre"),  # None: nothing segmented (or a job of an older worker)
        "precision": result.get("precision"),  # the network's arithmetic (jobs of older workers: none)
        # every downloadable output by name; a DICOM job adds seg.dcm and transforms.json, a NIfTI job
        # aligned to t1ce transforms.json
        "files": {name: f"{base}/files/{name}" for name in result.get("files", [result["mask"]])},
    }
    if result is not None and "seg" in result:
        body["result"]["seg_url"] = f"{base}/files/{result['seg']}"
    if result is not None and "transforms" in result:
        body["result"]["transforms_url"] = f"{base}/files/{result['transforms']}"
    if result is not None and "pacs" in result:  # a study pulled from a PACS: was its SEG stored back?
        body["result"]["pacs"] = result["pacs"]
    body["timings"] = job.get("timings") or {}
    body["attempts"] = job.get("attempts", 0)
    return body
