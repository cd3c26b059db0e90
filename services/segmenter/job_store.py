"""The :class:`JobStore` interface: what the segmenter needs from a job store, whatever holds the jobs.

:class:`services.segmenter.store.LocalJobStore` implements it with one folder per job; the class
docstring says how an S3-compatible store would.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from services.segmenter.job_record import Job


class JobStore(ABC):
    """What the segmenter needs from a job store.

    Every method raises :class:`~services.segmenter.jobs.JobNotFoundError` for an unknown or
    malformed job id. An S3-compatible store (MinIO, AWS S3) would implement it as follows:

    - ``create``: upload the input objects under ``<prefix>/<id>/``, then ``job.json`` last with
      ``If-None-Match: *``, so that a job is visible only once its inputs are.
    - ``get``: ``GetObject <prefix>/<id>/job.json`` (S3 is strongly read-after-write consistent).
    - ``update`` / ``transition``: optimistic concurrency instead of a file lock: read ``job.json``
      and its ETag, check ``expect_status`` / ``expect_fields``, apply the change, ``PutObject`` with
      ``If-Match: <etag>``; on ``412 Precondition Failed`` re-read and re-check (a cancel is never
      overwritten by progress, a superseded attempt never overwrites the one that took over).
    - ``path_for``: a path in a local working folder (the worker writes results there, the API
      downloads inputs there); ``commit_file`` uploads that file to ``<prefix>/<id>/<name>``, and
      the API would answer file downloads with a presigned-URL redirect instead of reading the path.
    - ``delete``: delete every object under the prefix (``job.json`` first, so the job vanishes at once).
    - ``expire``: a bucket lifecycle rule on ``expires_at`` does most of it; the sweep deletes
      the rest.
    - ``unfinished``: list the ``job.json`` objects (one ``ListObjectsV2`` per 1,000 jobs).
    - ``ping``: ``HeadBucket``.
    """

    @abstractmethod
    def create(self, owner: str, model: dict[str, Any], input_meta: dict[str, Any], *,
               files: Mapping[str, Path] | None = None) -> str:
        """Create a queued job holding ``files`` (allowed name -> staged local file, moved in); returns its id."""

    @abstractmethod
    def get(self, job_id: str) -> Job:
        """The job record (``ValueError`` for one :meth:`Job.from_dict` refuses)."""

    @abstractmethod
    def update(self, job_id: str, *, expect_status: Collection[str] | None = None,
               expect_fields: Mapping[str, Any] | None = None, **fields: Any) -> Job:
        """Set ``fields`` atomically; refuse (:class:`JobStateError`) unless the status is in ``expect_status``
        and each field of ``expect_fields`` holds that value (a compare-and-set)."""

    @abstractmethod
    def transition(self, job_id: str, status: str, *, expect_status: Collection[str] | None = None,
                   expect_fields: Mapping[str, Any] | None = None, **fields: Any) -> Job:
        """Move the job to ``status`` (checked by :func:`~services.segmenter.jobs.check_transition`) and set
        ``fields``; ``expect_status`` and ``expect_fields`` as in :meth:`update`."""

    @abstractmethod
    def unfinished(self) -> list[Job]:
        """The records of every queued or running job (what the reconciler checks)."""

    @abstractmethod
    def path_for(self, job_id: str, name: str) -> Path:
        """Local path of the job's file ``name``; ``ValueError`` for a name outside the allow-list."""

    def commit_file(self, job_id: str, name: str) -> None:  # noqa: B027 - optional hook
        """Publish a file written at :meth:`path_for` (a no-op where that path is the store itself)."""

    @abstractmethod
    def delete(self, job_id: str) -> None:
        """Remove the job and its files."""

    @abstractmethod
    def expire(self, now: datetime | None = None) -> list[str]:
        """Delete the jobs past their ``expires_at``; returns their ids."""

    @abstractmethod
    def ping(self) -> None:
        """Raise ``OSError`` unless the store can be written."""

    @abstractmethod
    def staging_dir(self) -> contextlib.AbstractContextManager[Path]:
        """A private local folder for an upload being validated, removed afterwards."""

    @abstractmethod
    def hash_legacy_owners(self) -> int:
        """Replace the raw ``owner`` of records written before owner hashing by its ``owner_hash``;
        returns how many were rewritten."""
