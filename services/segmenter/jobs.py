"""The segmentation job: its record, its states and the transitions between them.

A job record is the JSON object the job store keeps as ``job.json``; :func:`public_view` turns it
into the response body of ``GET /v1/jobs/{id}`` (``docs/CONTRACTS.md``, "Segmenter contract").

States::

    queued ──> running ──> succeeded
      │  │       │ │ └───> failed
      │  │       │ └─────> cancelled
      │  └───────┼───────> cancelled / failed
      │          ├──> running   (redelivered after its worker died: restarts from scratch)
      │          └──> queued    (a transient error: the task is retried)
      └── succeeded, failed and cancelled are final; only DELETE (or expiry) removes them.

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
from datetime import datetime, timedelta, timezone
from typing import Any

from brainscan.errors import BrainscanError
from brainscan.labels import BRATS2021, BRATS_LABEL_NAMES, BRATS_LABELS, convention_label_names

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL = frozenset({"succeeded", "failed", "cancelled"})
STAGES = ("queued", "preprocessing", "inference", "writing results", "done")
#: the allowed next statuses of each status (see the module docstring)
TRANSITIONS: dict[str, frozenset[str]] = {
    "queued": frozenset({"running", "cancelled", "failed"}),
    "running": frozenset({"running", "queued", "succeeded", "failed", "cancelled"}),
    "succeeded": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
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


def is_owned_by(job: dict[str, Any], owner: str) -> bool:
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
        "status": "queued",
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
        "history": [{"at": iso(now), "status": "queued", "stage": "queued"}],
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
    job["status"] = status
    if status == "running":
        job["started_at"] = iso(now)
        job["finished_at"] = None
    elif status == "queued":
        job["stage"] = "queued"
    if status in FINAL:
        job["finished_at"] = iso(now)
        if status == "succeeded":
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


def stage_progress(stage: str, fraction: float = 0.0) -> float:
    """Overall progress at ``fraction`` (0-1) of the way through ``stage``."""
    start, end = STAGE_PROGRESS[stage]
    return round(start + (end - start) * min(max(fraction, 0.0), 1.0), 4)


def result_labels(convention: str = BRATS2021) -> dict[str, str]:
    """Label value in a job's mask -> name: :data:`RESULT_LABELS` for ``"brats2021"``, and
    ``{"1": "NCR", "2": "ED", "3": "ET"}`` for a job uploaded with BraTS 2023-2024 names."""
    return {str(label): name for label, name in convention_label_names(convention).items() if label != 0}


def is_expired(job: dict[str, Any], now: datetime) -> bool:
    """Whether ``job`` is past its ``expires_at``."""
    return parse_iso(job["expires_at"]) <= now


def public_view(job: dict[str, Any], prefix: str = "/v1/jobs") -> dict[str, Any]:
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
        # every downloadable output by name; a DICOM job adds seg.dcm and transforms.json
        "files": {name: f"{base}/files/{name}" for name in result.get("files", [result["mask"]])},
    }
    if result is not None and "seg" in result:
        body["result"]["seg_url"] = f"{base}/files/{result['seg']}"
        body["result"]["transforms_url"] = f"{base}/files/{result['transforms']}"
    body["timings"] = job.get("timings") or {}
    body["attempts"] = job.get("attempts", 0)
    return body
