"""The job record and its transitions (services/segmenter/jobs.py) and the local job store
(services/segmenter/store.py): atomic, locked updates that never lose a write or undo a cancel,
the file allow-list, deletion and expiry; records keep only a hash of their owner."""

from __future__ import annotations

import json
import multiprocessing
import threading
from datetime import timedelta
from pathlib import Path

import pytest

from services.segmenter.jobs import (
    ALLOWED_FILES,
    STATUSES,
    TRANSITIONS,
    JobNotFoundError,
    JobStateError,
    check_transition,
    is_owned_by,
    owner_digest,
    public_view,
    stage_progress,
    utc_now,
)
from services.segmenter.store import JOB_FILE, LocalJobStore

MODEL = {"name": "unet3d", "arch": "unet3d", "version": "test-1", "demo": True}
INPUT = {"shape": [20, 18, 12], "spacing_mm": [1.0, 1.2, 1.5], "source": "files"}


@pytest.fixture()
def store(tmp_path: Path) -> LocalJobStore:
    return LocalJobStore(tmp_path / "jobs", ttl_s=3600)


def new(store: LocalJobStore, owner: str = "alice") -> str:
    return store.create(owner, MODEL, INPUT)


# -- transitions --------------------------------------------------------------------------------

ALLOWED = {(old, new) for old, targets in TRANSITIONS.items() for new in targets}
EXPECTED_ALLOWED = {
    ("queued", "running"), ("queued", "cancelled"), ("queued", "failed"),
    ("running", "running"), ("running", "queued"), ("running", "succeeded"), ("running", "failed"),
    ("running", "cancelled"),
}


def test_transition_table_is_the_documented_one() -> None:
    assert ALLOWED == EXPECTED_ALLOWED


@pytest.mark.parametrize("old", STATUSES)
@pytest.mark.parametrize("new_status", STATUSES)
def test_check_transition(old: str, new_status: str) -> None:
    if (old, new_status) in EXPECTED_ALLOWED:
        check_transition(old, new_status)
    else:
        with pytest.raises(JobStateError):
            check_transition(old, new_status)


def test_unknown_status_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="'done'"):
        check_transition("queued", "done")


@pytest.mark.parametrize("stage, fraction, expected", [
    ("preprocessing", 0.0, 0.0), ("inference", 0.0, 0.05), ("inference", 0.5, 0.5), ("inference", 1.0, 0.95),
    ("writing results", 0.0, 0.95), ("done", 0.0, 1.0), ("inference", 7.0, 0.95),
])
def test_stage_progress(stage: str, fraction: float, expected: float) -> None:
    assert stage_progress(stage, fraction) == pytest.approx(expected)


# -- records ------------------------------------------------------------------------------------

def test_create_makes_a_queued_job_with_an_unguessable_id(store: LocalJobStore) -> None:
    ids = {new(store) for _ in range(20)}
    assert len(ids) == 20
    for job_id in ids:
        assert len(job_id) == 22 and job_id.replace("-", "").replace("_", "").isalnum()
    job = store.get(next(iter(ids)))
    assert (job["status"], job["stage"], job["progress"]) == ("queued", "queued", 0.0)
    assert is_owned_by(job, "alice") and not is_owned_by(job, "bob")
    created, expires = (utc_now().fromisoformat(job[k].replace("Z", "+00:00")) for k in ("created_at", "expires_at"))
    assert expires - created == timedelta(seconds=3600)


def test_public_view_follows_the_contract(store: LocalJobStore) -> None:
    job_id = new(store)
    body = public_view(store.get(job_id))
    assert {"id", "status", "progress", "stage", "stage_detail", "error", "created_at", "started_at", "finished_at",
            "expires_at", "model", "input", "links", "result"} <= set(body)
    assert not {"owner", "owner_hash", "history"} & set(body)
    assert body["links"]["self"] == f"/v1/jobs/{job_id}"
    assert body["links"]["inputs"]["t1ce"] == f"/v1/jobs/{job_id}/files/input_t1ce.nii.gz"
    assert body["result"] is None


def test_create_moves_staged_files_in(store: LocalJobStore, tmp_path: Path) -> None:
    staged = tmp_path / "staged.nii.gz"
    staged.write_bytes(b"volume")
    job_id = store.create("alice", MODEL, INPUT, files={"input_t1.nii.gz": staged})
    assert store.path_for(job_id, "input_t1.nii.gz").read_bytes() == b"volume"
    assert not staged.exists()
    with pytest.raises(ValueError, match="not a job file"):
        store.create("alice", MODEL, INPUT, files={"notes.txt": staged})


def test_transition_records_times_and_history(store: LocalJobStore) -> None:
    job_id = new(store)
    store.transition(job_id, "running", stage="preprocessing")
    store.update(job_id, stage="inference", progress=0.3)
    store.update(job_id, progress=0.6, stage_detail="patch 3 of 5")
    job = store.transition(job_id, "succeeded", result={"mask": "mask.nii.gz"})
    assert job["started_at"] and job["finished_at"]
    assert (job["stage"], job["progress"], job["stage_detail"]) == ("done", 1.0, None)
    assert [(h["status"], h["stage"]) for h in job["history"]] == [
        ("queued", "queued"), ("running", "preprocessing"), ("running", "inference"), ("succeeded", "done")]
    assert store.get(job_id) == job
    with pytest.raises(JobStateError):
        store.transition(job_id, "running")


def test_update_never_changes_the_status(store: LocalJobStore) -> None:
    with pytest.raises(ValueError, match="transition"):
        store.update(new(store), status="succeeded")


def test_progress_write_never_undoes_a_cancel(store: LocalJobStore) -> None:
    job_id = new(store)
    store.transition(job_id, "running", stage="inference")
    store.transition(job_id, "cancelled", expect_status={"queued", "running"})
    with pytest.raises(JobStateError) as caught:
        store.update(job_id, expect_status={"running"}, progress=0.7)
    assert caught.value.status == "cancelled"
    assert store.get(job_id)["status"] == "cancelled"
    assert store.get(job_id)["progress"] == 0.0


def test_update_is_atomic_and_leaves_no_temporary_files(store: LocalJobStore) -> None:
    job_id = new(store)
    for step in range(30):
        store.update(job_id, progress=step / 30)
    folder = store.root / job_id
    assert sorted(p.name for p in folder.iterdir()) == [".lock", JOB_FILE]
    assert json.loads((folder / JOB_FILE).read_text())["progress"] == pytest.approx(29 / 30)


def _write_many(root: str, job_id: str, writer: int, count: int) -> None:
    store = LocalJobStore(root)
    for step in range(count):
        store.update(job_id, **{f"writer_{writer}": step + 1})


def test_concurrent_writers_in_several_processes_lose_no_update(store: LocalJobStore) -> None:
    job_id = new(store)
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_write_many, args=(str(store.root), job_id, w, 40)) for w in range(4)]
    stop = threading.Event()
    torn: list[Exception] = []

    def read_continuously() -> None:
        while not stop.is_set():
            try:
                store.get(job_id)
            except json.JSONDecodeError as exc:  # a half-written record would show up here
                torn.append(exc)

    reader = threading.Thread(target=read_continuously)
    reader.start()
    for process in writers:
        process.start()
    for process in writers:
        process.join(timeout=60)
    stop.set()
    reader.join()
    assert [p.exitcode for p in writers] == [0, 0, 0, 0]
    job = store.get(job_id)
    # each update re-reads the record under the lock, so every writer's last value survives
    assert [job[f"writer_{w}"] for w in range(4)] == [40, 40, 40, 40]
    assert torn == []


# -- files --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["job.json", ".lock", "../job.json", "/etc/passwd", "mask.nii", "input_seg.nii.gz",
                                  "preview_axial.png/..", "", "MASK.NII.GZ"])
def test_path_for_refuses_names_outside_the_allow_list(store: LocalJobStore, name: str) -> None:
    with pytest.raises(ValueError, match="not a job file"):
        store.path_for(new(store), name)


def test_path_for_allows_every_job_file(store: LocalJobStore) -> None:
    job_id = new(store)
    for name in ALLOWED_FILES:
        assert store.path_for(job_id, name) == store.root / job_id / name


@pytest.mark.parametrize("job_id", ["..", "../../etc", "a" * 21, "a" * 23, "abc/def0123456789abcde", ""])
def test_malformed_ids_are_unknown_jobs(store: LocalJobStore, job_id: str) -> None:
    with pytest.raises(JobNotFoundError):
        store.get(job_id)
    with pytest.raises(JobNotFoundError):
        store.path_for(job_id, "mask.nii.gz")


# -- deletion and expiry ------------------------------------------------------------------------

def test_delete_removes_the_job_and_later_writes_fail(store: LocalJobStore) -> None:
    job_id = new(store)
    store.delete(job_id)
    assert not (store.root / job_id).exists()
    assert not [p for p in store.root.iterdir() if p.name.startswith(".trash")]
    for action in (lambda: store.get(job_id), lambda: store.update(job_id, progress=0.5),
                   lambda: store.transition(job_id, "running"), lambda: store.delete(job_id)):
        with pytest.raises(JobNotFoundError):
            action()


def test_expire_removes_only_jobs_past_their_expiry(tmp_path: Path) -> None:
    short = LocalJobStore(tmp_path / "jobs", ttl_s=60)
    old = short.create("alice", MODEL, INPUT)
    running = short.create("alice", MODEL, INPUT)
    short.transition(running, "running")
    fresh = LocalJobStore(tmp_path / "jobs", ttl_s=3600).create("alice", MODEL, INPUT)
    assert short.expire(utc_now()) == []
    removed = short.expire(utc_now() + timedelta(seconds=120))
    assert sorted(removed) == sorted([old, running])
    assert [p.name for p in short.root.iterdir() if not p.name.startswith(".")] == [fresh]
    assert short.expire(utc_now() + timedelta(days=2)) == [fresh]


def test_staging_dir_is_removed_after_use(store: LocalJobStore) -> None:
    with store.staging_dir() as staging:
        (staging / "t1.upload").write_bytes(b"x")
        assert staging.parent == store.root / ".staging"
    assert not staging.exists()


def test_ping_needs_a_writable_root(tmp_path: Path) -> None:
    LocalJobStore(tmp_path / "jobs").ping()
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError):
        LocalJobStore(blocker / "jobs").ping()


# -- owners -------------------------------------------------------------------------------------

SESSION_OWNER = "session:" + "S" * 43  # what the gateway sends for a browser session (the cookie value)


def test_records_hold_only_a_hash_of_the_owner(store: LocalJobStore) -> None:
    job_id = new(store, SESSION_OWNER)
    store.update(job_id, progress=0.5)  # a worker's rewrite keeps it so
    text = (store.root / job_id / JOB_FILE).read_text()
    assert "S" * 43 not in text and "session:" not in text
    record = json.loads(text)
    assert "owner" not in record and record["owner_hash"] == owner_digest(SESSION_OWNER)
    assert len(record["owner_hash"]) == 64 and record["owner_hash"] != owner_digest("S" * 43)


def test_owner_digest_is_stable_and_separates_owners() -> None:
    assert owner_digest("key:abc") == owner_digest("key:abc")
    assert len({owner_digest(owner) for owner in ("key:abc", "key:abd", "session:abc", "abc")}) == 4


def test_legacy_records_are_rewritten_and_stay_with_their_owner(store: LocalJobStore) -> None:
    """A job.json written before owner hashing holds the raw session id: the API's start-up replaces it."""
    legacy, current = new(store, SESSION_OWNER), new(store, "bob")
    path = store.root / legacy / JOB_FILE
    record = json.loads(path.read_text())
    del record["owner_hash"]
    record["owner"] = SESSION_OWNER
    path.write_text(json.dumps(record))
    assert is_owned_by(store.get(legacy), SESSION_OWNER) and not is_owned_by(store.get(legacy), "bob")

    assert store.hash_legacy_owners() == 1
    assert "S" * 43 not in path.read_text()
    assert store.get(legacy)["owner_hash"] == owner_digest(SESSION_OWNER)
    assert is_owned_by(store.get(legacy), SESSION_OWNER) and is_owned_by(store.get(current), "bob")
    assert store.hash_legacy_owners() == 0
    assert LocalJobStore(store.root.parent / "never-made").hash_legacy_owners() == 0


def test_a_record_without_owner_belongs_to_nobody() -> None:
    assert not is_owned_by({"id": "x"}, "alice")
