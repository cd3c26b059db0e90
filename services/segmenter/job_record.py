"""The typed job record: :class:`JobStatus` and :class:`Job`, the ``job.json`` of one segmentation job.

The JSON on disk and on the wire is unchanged: :class:`JobStatus` is a ``str`` enum whose values
are the statuses' strings, and :meth:`Job.to_dict` gives back exactly the mapping
:meth:`Job.from_dict` read (same keys, same order, keys it does not know kept as they were), so a
record written by an older version loads and is written back byte for byte. :meth:`Job.from_dict`
refuses a record without an id, an unknown status or a malformed field (``ValueError``): the job
store reads every record through it (:meth:`services.segmenter.store.LocalJobStore.get`).

A :class:`Job` is read-only; it is also a read-only mapping of its JSON fields (``job["status"]``,
``job.get("worker")``, ``"owner" in job``), so code written against the dict record keeps working.
Changes go through the store (``update`` / ``transition``), which applies them to the JSON object
under the job's lock (:mod:`services.segmenter.jobs`) and validates the result again.

Example:
    >>> job = Job.from_dict(json.loads(path.read_text()))
    >>> job.status is JobStatus.QUEUED, job.status == "queued", job.to_dict() == json.loads(path.read_text())
    (True, True, True)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any


class JobStatus(StrEnum):
    """The status of a job (see the state diagram in :mod:`services.segmenter.jobs`); equal to its string."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        """Succeeded, failed and cancelled are final: only DELETE (or expiry) removes the job."""
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


#: fields every record has (``new_job`` writes them; records of every version hold them)
_REQUIRED = ("id", "status", "created_at", "expires_at")
#: field -> the JSON types it may hold (``None`` allowed for all but the required ones)
_TYPES: dict[str, tuple[type, ...]] = {
    "id": (str,), "owner_hash": (str,), "status": (str,), "progress": (int, float), "stage": (str,),
    "stage_detail": (str,), "error": (dict,), "created_at": (str,), "started_at": (str,), "finished_at": (str,),
    "expires_at": (str,), "model": (dict,), "input": (dict,), "result": (dict,), "timings": (dict,),
    "attempts": (int,), "task_id": (str,), "enqueued_at": (str,), "attempt_id": (str,), "worker": (str,),
    "heartbeat_at": (str,), "history": (list,),
}


@dataclass(frozen=True, eq=False)
class Job(Mapping[str, Any]):
    """One job record (``job.json``), typed; also a read-only mapping of its JSON fields.

    Attributes:
        id: the unguessable job id.
        status: where the job stands.
        created_at / expires_at / started_at / finished_at / enqueued_at / heartbeat_at: ISO times
            (``2024-06-01T12:00:00.000Z``), or None.
        owner_hash: SHA-256 of the owner id (``jobs.owner_digest``); None on a record written before
            owner hashing, which holds a raw ``owner`` (kept in ``extra`` until the API rewrites it).
        progress, stage, stage_detail: progress (0-1) and stage of a running job.
        error: ``{"error", "detail"}`` of a failed job.
        model: ``{"name", "arch", "version", "demo"}``; input: the intake's description of the upload.
        result: the outputs of a succeeded job; timings: seconds per step.
        attempts, attempt_id, worker: how often it was started, and by whom now (``host:pid``).
        task_id: the Celery task id of its queue message.
        history: ``[{"at", "status", "stage"}]``, one entry per change of status or stage.
        extra: fields this version does not know, kept as read.
    """

    id: str
    status: JobStatus
    created_at: str
    expires_at: str
    owner_hash: str | None = None
    progress: float = 0.0
    stage: str = "queued"
    stage_detail: str | None = None
    error: dict[str, Any] | None = None
    started_at: str | None = None
    finished_at: str | None = None
    model: dict[str, Any] = field(default_factory=dict)
    input: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    timings: dict[str, Any] = field(default_factory=dict)
    attempts: int = 0
    task_id: str | None = None
    enqueued_at: str | None = None
    attempt_id: str | None = None
    worker: str | None = None
    heartbeat_at: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    #: the record's keys in the order read, so that :meth:`to_dict` writes them back the same way
    _keys: tuple[str, ...] = field(default=(), repr=False)

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> Job:
        """The job of a record as stored (any version's ``job.json``).

        Raises:
            ValueError: not an object, a required field missing, an unknown status, or a field of
                the wrong JSON type.
        """
        if not isinstance(record, Mapping):
            raise ValueError(f"a job record is a JSON object, got {type(record).__name__}")
        missing = [name for name in _REQUIRED if record.get(name) is None]
        if missing:
            raise ValueError(f"job record {str(record.get('id'))[:40]!r} lacks {missing}")
        for name, types in _TYPES.items():
            value = record.get(name)
            if value is not None and (not isinstance(value, types) or isinstance(value, bool) and bool not in types):
                raise ValueError(f"job record {record['id'][:40]!r}: {name} must be "
                                 f"{' or '.join(t.__name__ for t in types)}, got {type(value).__name__}")
        try:
            status = JobStatus(record["status"])
        except ValueError:
            raise ValueError(f"job record {record['id'][:40]!r} has an unknown status {record['status']!r}; "
                             f"one of {[s.value for s in JobStatus]}") from None
        known = {f.name for f in fields(cls)} - {"extra", "_keys"}
        values = {name: record[name] for name in known if name in record}
        return cls(**{**values, "status": status}, extra={k: v for k, v in record.items() if k not in known},
                   _keys=tuple(record))

    def to_dict(self) -> dict[str, Any]:
        """The record as stored: the keys read (in their order) or, for a new job, every field.

        ``status`` stays a :class:`JobStatus` (a ``str``), so ``json.dump`` writes the same text.
        """
        return {key: self[key] for key in self}

    # -- the read-only mapping of the JSON fields ------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        if key in self.extra:
            return self.extra[key]
        if key not in _TYPES or (self._keys and key not in self._keys):
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys or (*_TYPES, *self.extra))

    def __len__(self) -> int:
        return len(self._keys or (*_TYPES, *self.extra))
