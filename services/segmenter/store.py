"""Where jobs live: the :class:`JobStore` interface and :class:`LocalJobStore`, one folder per job.

The API and the worker share the store (a folder both can reach, e.g. a volume mounted in both
containers). Layout of :class:`LocalJobStore`::

    <root>/<job id>/job.json            the job record (services.segmenter.jobs), replaced atomically
    <root>/<job id>/.lock               flock()ed around every read-modify-write of job.json
    <root>/<job id>/input_t1.nii.gz     ... the normalised inputs, then mask.nii.gz, preview_*.png
    <root>/.staging/<random>/           uploads being validated (never visible as jobs)
    <root>/.trash-<job id>-<random>/    a job being deleted (renamed first, so it vanishes at once)

Two processes write a job concurrently: the worker (progress every half second) and the API (a
cancel). Every write takes an exclusive ``fcntl.flock`` on the job's lock file, re-reads the record,
checks the transition, and writes a temporary file that ``os.replace`` puts in place, so readers
(which take no lock) always see a whole record and no update is lost.

Example:
    >>> store = LocalJobStore("var/jobs")
    >>> job_id = store.create("owner-1", model, input_meta, files={"input_t1.nii.gz": staged_t1, ...})
    >>> store.transition(job_id, "running", stage="preprocessing")
    >>> store.update(job_id, expect_status={"running"}, progress=0.5, stage_detail="patch 9 of 18")
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import time
import uuid
from collections.abc import Collection, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from services.segmenter.job_record import Job, JobStatus
from services.segmenter.job_store import JobStore
from services.segmenter.jobs import (
    ALLOWED_FILES,
    JobNotFoundError,
    JobStateError,
    apply_transition,
    apply_update,
    is_expired,
    new_job,
    owner_digest,
    utc_now,
)

log = logging.getLogger("services.segmenter.store")

JOB_FILE = "job.json"
LOCK_FILE = ".lock"
#: ``secrets.token_urlsafe(16)``: 22 characters of the URL-safe base64 alphabet
JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{22}$")
#: staging and trash folders older than this are debris of a crashed process
_DEBRIS_AGE_S = 3600.0


def check_job_id(job_id: str) -> str:
    """``job_id`` if it looks like one this store made, else :class:`JobNotFoundError`.

    Ids are used in paths: anything but 22 URL-safe characters (``..``, slashes) never gets that far.
    """
    if not isinstance(job_id, str) or not JOB_ID_PATTERN.match(job_id):
        raise JobNotFoundError(f"no job {str(job_id)[:40]!r}")
    return job_id


def check_file_name(name: str) -> str:
    """``name`` if it is a file a job may hold (see ``jobs.ALLOWED_FILES``), else ``ValueError``."""
    if name not in ALLOWED_FILES:
        raise ValueError(f"{str(name)[:80]!r} is not a job file; job files are {sorted(ALLOWED_FILES)}")
    return name


class LocalJobStore(JobStore):
    """Jobs as folders under ``root`` (see the module docstring).

    Args:
        root: the store folder, created on the first write (so that merely building an app, e.g.
            on import, leaves no folder behind).
        ttl_s: seconds from creation to expiry of new jobs.
    """

    def __init__(self, root: str | Path, *, ttl_s: float = 86400.0) -> None:
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        self.root = Path(root)
        self.ttl_s = float(ttl_s)

    def __repr__(self) -> str:
        return f"LocalJobStore({str(self.root)!r})"

    # -- records ------------------------------------------------------------------------------

    def create(self, owner: str, model: dict[str, Any], input_meta: dict[str, Any], *,
               files: Mapping[str, Path] | None = None) -> str:
        """Create a queued job; its folder appears (renamed into place) only once complete.

        Args:
            owner: opaque owner id.
            model: ``{"name", "arch", "version", "demo"}``.
            input_meta: ``{"shape", "spacing_mm", "source", ...}``.
            files: allowed file name -> a local file to move into the job (same filesystem: renamed).

        Returns:
            the new id, ``secrets.token_urlsafe(16)``.

        Raises:
            ValueError: a file name outside the allow-list, or a bad owner.
        """
        names = {check_file_name(name): Path(path) for name, path in (files or {}).items()}
        job_id = secrets.token_urlsafe(16)
        record = new_job(job_id=job_id, owner=owner, model=model, input_meta=input_meta, now=utc_now(),
                         ttl_s=self.ttl_s)
        self.root.mkdir(parents=True, exist_ok=True)
        building = self.root / f".new-{job_id}"
        building.mkdir()
        try:
            for name, source in names.items():
                shutil.move(str(source), building / name)
            (building / LOCK_FILE).touch()
            _write_json(building / JOB_FILE, record)
            os.rename(building, self.root / job_id)
        except BaseException:
            shutil.rmtree(building, ignore_errors=True)
            raise
        return job_id

    def get(self, job_id: str) -> Job:
        """The job record (no lock: ``job.json`` is only ever replaced whole), read by :meth:`Job.from_dict`.

        Raises:
            JobNotFoundError: no such job. ValueError: a record that is not JSON or not a job.
        """
        return Job.from_dict(self._read(job_id))

    def _read(self, job_id: str) -> dict[str, Any]:
        path = self.root / check_job_id(job_id) / JOB_FILE
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise JobNotFoundError(f"no job {job_id!r}") from None

    def update(self, job_id: str, *, expect_status: Collection[str] | None = None,
               expect_fields: Mapping[str, Any] | None = None, **fields: Any) -> Job:
        """Set ``fields`` on the record under the job's lock.

        Args:
            job_id: the job.
            expect_status: if given, refuse unless the current status is one of these (the
                worker's progress writes pass ``{"running"}`` so they never undo a cancel).
            expect_fields: if given, refuse unless ``record[key] == value`` for each item (the worker
                passes its ``attempt_id``, so an attempt another one took over writes nothing).
            **fields: record fields to set (``status`` is refused: use :meth:`transition`); a new
                ``stage`` is appended to the record's ``history``.

        Returns:
            the updated record.

        Raises:
            JobNotFoundError: no such job (e.g. deleted meanwhile).
            JobStateError: the status is not in ``expect_status``, or a field differs from ``expect_fields``.
        """
        if "status" in fields:
            raise ValueError("update() does not change the status; use transition()")
        with self._locked(job_id) as record:
            _expect(record, expect_status, expect_fields)
            return Job.from_dict(apply_update(record, utc_now(), **fields))

    def transition(self, job_id: str, status: str, *, expect_status: Collection[str] | None = None,
                   expect_fields: Mapping[str, Any] | None = None, **fields: Any) -> Job:
        """Move the job to ``status`` under the job's lock (see ``jobs.apply_transition``).

        Raises:
            JobNotFoundError: no such job.
            JobStateError: the transition is not allowed, the status is not in ``expect_status`` or a
                field differs from ``expect_fields``.
        """
        with self._locked(job_id) as record:
            _expect(record, expect_status, expect_fields)
            return Job.from_dict(apply_transition(record, status, utc_now(), **fields))

    @contextlib.contextmanager
    def _locked(self, job_id: str) -> Iterator[dict[str, Any]]:
        """Yield the record (its JSON object) under an exclusive lock; write it back if the block succeeds
        and :meth:`Job.from_dict` accepts the result."""
        folder = self.root / check_job_id(job_id)
        try:
            fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except (FileNotFoundError, NotADirectoryError):
            raise JobNotFoundError(f"no job {job_id!r}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            # The job may have been deleted (its folder renamed away) while this waited.
            record = self._read(job_id)
            yield record
            Job.from_dict(record)  # a change that breaks the record is refused (ValueError), never written
            _write_json(folder / JOB_FILE, record)
        finally:
            os.close(fd)  # closing releases the flock

    # -- files --------------------------------------------------------------------------------

    def path_for(self, job_id: str, name: str) -> Path:
        """``<root>/<id>/<name>`` for an allowed ``name`` (the file need not exist yet).

        Raises:
            JobNotFoundError: malformed id.
            ValueError: ``name`` is not in the allow-list (``jobs.ALLOWED_FILES``).
        """
        return self.root / check_job_id(job_id) / check_file_name(name)

    @contextlib.contextmanager
    def staging_dir(self) -> Iterator[Path]:
        """A fresh folder under ``<root>/.staging`` (same filesystem, so ``create`` renames files in)."""
        parent = self.root / ".staging"
        parent.mkdir(parents=True, exist_ok=True)
        folder = parent / uuid.uuid4().hex
        folder.mkdir()
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    # -- removal ------------------------------------------------------------------------------

    def delete(self, job_id: str) -> None:
        """Remove the job: renamed away under its lock (it vanishes at once), then deleted.

        Raises:
            JobNotFoundError: no such job.
        """
        folder = self.root / check_job_id(job_id)
        try:
            fd = os.open(folder / LOCK_FILE, os.O_RDWR)
        except (FileNotFoundError, NotADirectoryError):
            raise JobNotFoundError(f"no job {job_id!r}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            trash = self.root / f".trash-{job_id}-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(folder, trash)
            except FileNotFoundError:
                raise JobNotFoundError(f"no job {job_id!r}") from None
        finally:
            os.close(fd)
        shutil.rmtree(trash, ignore_errors=True)

    def expire(self, now: datetime | None = None) -> list[str]:
        """Delete every job past its ``expires_at``, and debris of crashed processes.

        Queued or running jobs are deleted too once expired: a job a day old that never finished
        will not (its worker notices the deletion and stops).

        Returns:
            the ids of the deleted jobs.
        """
        now = now or utc_now()
        removed: list[str] = []
        if not self.root.is_dir():
            return removed
        for folder in sorted(self.root.iterdir()):
            if folder.name.startswith("."):
                self._clear_debris(folder)
                continue
            if not JOB_ID_PATTERN.match(folder.name) or not folder.is_dir():
                continue
            try:
                record = self.get(folder.name)
                if not is_expired(record, now):
                    continue
                self.delete(folder.name)
            except JobNotFoundError:
                continue  # deleted meanwhile by a DELETE or another sweep
            except (OSError, ValueError, KeyError) as exc:  # an unreadable record: report, keep going
                log.warning("cannot expire job %s: %s", folder.name, exc)
                continue
            removed.append(folder.name)
        if removed:
            log.info("expired %d job(s)", len(removed), extra={"jobs": removed})
        return removed

    def _clear_debris(self, folder: Path) -> None:
        if folder.name == ".staging":
            for child in folder.iterdir():
                if _age_s(child) > _DEBRIS_AGE_S:
                    shutil.rmtree(child, ignore_errors=True)
        elif folder.name.startswith((".trash-", ".new-")) and _age_s(folder) > _DEBRIS_AGE_S:
            shutil.rmtree(folder, ignore_errors=True)

    def unfinished(self) -> list[Job]:
        """The records of every queued or running job, oldest folder name first (unreadable ones skipped)."""
        records = []
        for folder in sorted(self.root.iterdir()) if self.root.is_dir() else ():
            if not JOB_ID_PATTERN.match(folder.name) or not folder.is_dir():
                continue
            try:
                record = self.get(folder.name)
            except JobNotFoundError:
                continue  # deleted meanwhile
            except (OSError, ValueError) as exc:  # an unreadable record: report, keep going
                log.warning("cannot read job %s: %s", folder.name, exc)
                continue
            if record.status in (JobStatus.QUEUED, JobStatus.RUNNING):
                records.append(record)
        return records

    def hash_legacy_owners(self) -> int:
        """Rewrite every record that still holds a raw ``owner`` (a session id or a key's owner id)
        to hold only its :func:`~services.segmenter.jobs.owner_digest`, under the job's lock.

        Run by the API at start-up: afterwards the store holds no owner id that could be replayed,
        and the owners still reach their jobs (:func:`~services.segmenter.jobs.is_owned_by`).

        Returns:
            the number of records rewritten.
        """
        rewritten = 0
        for folder in sorted(self.root.iterdir()) if self.root.is_dir() else ():
            if not JOB_ID_PATTERN.match(folder.name) or not folder.is_dir():
                continue
            try:
                if "owner" not in self.get(folder.name):
                    continue
                with self._locked(folder.name) as record:
                    owner = record.pop("owner", None)
                    if isinstance(owner, str):
                        record["owner_hash"] = owner_digest(owner)
                rewritten += 1
            except JobNotFoundError:
                continue  # deleted meanwhile
            except (OSError, ValueError) as exc:  # an unreadable record: report, keep going
                log.warning("cannot hash the owner of job %s: %s", folder.name, exc)
        return rewritten

    def ping(self) -> None:
        """Raise ``OSError`` unless a file can be created and removed under ``root``."""
        self.root.mkdir(parents=True, exist_ok=True)
        probe = self.root / f".ping-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"ok")
        probe.unlink()


def _expect(record: Mapping[str, Any], expect_status: Collection[str] | None,
            expect_fields: Mapping[str, Any] | None = None) -> None:
    if expect_status is not None and record["status"] not in expect_status:
        raise JobStateError(f"job {record['id']} is {record['status']}, expected one of {sorted(expect_status)}",
                            status=record["status"])
    for key, value in (expect_fields or {}).items():
        if record.get(key) != value:
            raise JobStateError(f"job {record['id']} has {key} {record.get(key)!r}, expected {value!r}",
                                status=record["status"])


def _write_json(path: Path, record: dict[str, Any]) -> None:
    """Write ``record`` to ``path`` atomically: a temporary file in the same folder, then ``os.replace``."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            json.dump(record, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0
