"""The typed job record (services/segmenter/job_record.py): ``JobStatus`` equals today's strings, a
record of an older version round-trips byte for byte, an unknown status or a malformed field is
refused, and the job store reads every record through it."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from services.segmenter.job_record import Job, JobStatus
from services.segmenter.jobs import FINAL, STATUSES, TRANSITIONS, JobNotFoundError, public_view
from services.segmenter.store import JOB_FILE, LocalJobStore

#: a ``job.json`` as written before owner hashing and before attempts, heartbeats and re-enqueueing
#: (no ``owner_hash``, ``attempt_id``, ``worker``, ``heartbeat_at``, ``enqueued_at``), keys in its order
OLD_RECORD: dict[str, Any] = {
    "id": "AAAAAAAAAAAAAAAAAAAAAA",
    "owner": "session:abc",
    "status": "running",
    "progress": 0.42,
    "stage": "inference",
    "stage_detail": "patch 9 of 18",
    "error": None,
    "created_at": "2024-06-01T12:00:00.000Z",
    "started_at": "2024-06-01T12:00:01.500Z",
    "finished_at": None,
    "expires_at": "2099-06-02T12:00:00.000Z",
    "model": {"name": "unet3d", "arch": "unet3d", "version": "2024-05-01", "demo": False},
    "input": {"shape": [240, 240, 155], "spacing_mm": [1.0, 1.0, 1.0], "source": "zip", "orientation": "LPS"},
    "result": None,
    "timings": {"queue_s": 0.2},
    "attempts": 1,
    "task_id": "celery-task-1",
    "history": [{"at": "2024-06-01T12:00:00.000Z", "status": "queued", "stage": "queued"},
                {"at": "2024-06-01T12:00:01.500Z", "status": "running", "stage": "preprocessing"}],
    "note": "a field this version does not know",
}


def write_record(root: Path, record: dict[str, Any]) -> Path:
    folder = root / record["id"]
    folder.mkdir(parents=True)
    (folder / ".lock").touch()
    path = folder / JOB_FILE
    path.write_text(json.dumps(record, indent=1), encoding="utf-8")
    return path


# -- the status enum ----------------------------------------------------------------------------

def test_status_values_are_the_strings_on_disk_and_on_the_wire() -> None:
    assert [status.value for status in JobStatus] == list(STATUSES) == [
        "queued", "running", "succeeded", "failed", "cancelled"]
    assert JobStatus("failed") is JobStatus.FAILED and JobStatus.FAILED == "failed"
    assert json.dumps({"status": JobStatus.CANCELLED}) == '{"status": "cancelled"}'
    assert f"{JobStatus.RUNNING}" == "running"
    assert FINAL == {"succeeded", "failed", "cancelled"} == {s for s in JobStatus if s.is_final}
    assert set(TRANSITIONS) == set(JobStatus)


# -- the record ---------------------------------------------------------------------------------

def test_old_record_round_trips_byte_for_byte() -> None:
    job = Job.from_dict(OLD_RECORD)
    assert job.status is JobStatus.RUNNING and job.progress == 0.42 and job.attempts == 1
    assert (job.owner_hash, job.attempt_id, job.worker, job.heartbeat_at) == (None, None, None, None)
    assert job.extra == {"owner": "session:abc", "note": "a field this version does not know"}
    again = job.to_dict()
    assert list(again) == list(OLD_RECORD)  # same keys, same order: nothing added, nothing dropped
    assert json.dumps(again, indent=1) == json.dumps(OLD_RECORD, indent=1)


def test_record_is_a_read_only_mapping_of_its_json_fields() -> None:
    job = Job.from_dict(OLD_RECORD)
    assert job["status"] == "running" and job["owner"] == "session:abc" and job.get("worker") is None
    assert "owner" in job and "worker" not in job and "extra" not in job
    with pytest.raises(KeyError):
        job["worker"]
    assert job == OLD_RECORD and len(job) == len(OLD_RECORD)
    assert public_view(job) == public_view(OLD_RECORD)
    with pytest.raises(AttributeError):
        job.status = JobStatus.FAILED  # type: ignore[misc]


@pytest.mark.parametrize("status", ["done", "QUEUED", "", 3])
def test_unknown_status_is_refused(status: Any) -> None:
    with pytest.raises(ValueError, match="status"):
        Job.from_dict({**OLD_RECORD, "status": status})


@pytest.mark.parametrize("change, reason", [
    ({"id": None}, "lacks"), ({"created_at": None}, "lacks"), ({"progress": "half"}, "progress"),
    ({"attempts": True}, "attempts"), ({"history": {}}, "history"), ({"model": "unet3d"}, "model"),
])
def test_malformed_record_is_refused(change: dict[str, Any], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        Job.from_dict({**OLD_RECORD, **change})
    with pytest.raises(ValueError, match="JSON object"):
        Job.from_dict(["not", "a", "record"])  # type: ignore[arg-type]


# -- the store reads through it -----------------------------------------------------------------

def test_store_loads_an_old_record_and_writes_it_back_unchanged(tmp_path: Path) -> None:
    store = LocalJobStore(tmp_path / "jobs", ttl_s=3600)
    path = write_record(store.root, OLD_RECORD)
    before = path.read_bytes()
    job = store.get(OLD_RECORD["id"])
    assert isinstance(job, Job) and job.status is JobStatus.RUNNING
    assert [j.id for j in store.unfinished()] == [OLD_RECORD["id"]]

    updated = store.update(OLD_RECORD["id"], expect_status={JobStatus.RUNNING}, progress=0.42)  # no change
    assert isinstance(updated, Job) and path.read_bytes() == before

    done = store.transition(OLD_RECORD["id"], JobStatus.SUCCEEDED, result={"mask": "mask.nii.gz"})
    on_disk = json.loads(path.read_text())
    assert done.status is JobStatus.SUCCEEDED and on_disk["status"] == "succeeded"
    assert on_disk["history"][-1]["status"] == "succeeded" and on_disk["note"] == OLD_RECORD["note"]
    assert list(on_disk)[:len(OLD_RECORD)] == list(OLD_RECORD)


def test_store_refuses_a_record_with_an_unknown_status(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = LocalJobStore(tmp_path / "jobs", ttl_s=3600)
    bad = {**OLD_RECORD, "status": "paused"}
    write_record(store.root, bad)
    with pytest.raises(ValueError, match="'paused'"):
        store.get(bad["id"])
    with caplog.at_level(logging.WARNING, logger="services.segmenter.store"):
        assert store.unfinished() == []  # skipped and reported, not served
    assert "paused" in caplog.text
    with pytest.raises(JobNotFoundError):
        store.get("BBBBBBBBBBBBBBBBBBBBBB")


def test_a_change_that_breaks_the_record_is_never_written(tmp_path: Path) -> None:
    store = LocalJobStore(tmp_path / "jobs", ttl_s=3600)
    path = write_record(store.root, OLD_RECORD)
    before = path.read_bytes()
    with pytest.raises(ValueError, match="attempts"):
        store.update(OLD_RECORD["id"], attempts="two")
    assert path.read_bytes() == before


def test_new_jobs_are_written_with_the_enum_as_its_string(tmp_path: Path) -> None:
    store = LocalJobStore(tmp_path / "jobs", ttl_s=3600)
    job_id = store.create("alice", OLD_RECORD["model"], OLD_RECORD["input"])
    text = (store.root / job_id / JOB_FILE).read_text()
    assert '"status": "queued"' in text and "JobStatus" not in text
    job = store.get(job_id)
    assert job.status is JobStatus.QUEUED and job.to_dict() == json.loads(text)
