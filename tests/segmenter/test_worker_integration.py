"""The segmenter end to end, without fakes: a real redis-server, a real prefork Celery worker
subprocess (``celery -A services.segmenter.worker worker -Q segmentation -c 1 -P prefork``) loading
a tiny seeded U-Net bundle from a temporary model store, and the API enqueueing through Celery.

Covered: the three upload shapes give the same mask on the input grid; progress moves through
"patch k of n"; a job survives the SIGKILL of the pool process that runs it (redelivered, restarted
from scratch, same mask as the in-process evaluation path); queued and running jobs can be
cancelled; another owner sees nothing; the real BraTS sample case keeps its grid.
"""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from fastapi.testclient import TestClient

from brainscan.data.phantoms import write_brats_phantoms
from brainscan.labels import MODALITIES
from services.segmenter.app import create_app
from services.segmenter.settings import Settings
from services.segmenter.store import LocalJobStore
from tests.paths import BRATS_SAMPLE, REPO_ROOT, needs_brats_sample
from tests.redis_server import needs_redis, redis_server
from tests.segmenter import case_zip, make_segmenter_store

pytestmark = [needs_redis, pytest.mark.slow]  # a real worker runs a model end to end

OWNER = {"X-Brainscan-Owner": "integration-owner"}
FINAL = ("succeeded", "failed", "cancelled")
WORKER_READY_TIMEOUT_S = 180.0
JOB_TIMEOUT_S = 240.0


@dataclass
class Stack:
    """The running pieces: API client, the worker process and its log, the job store."""

    client: TestClient
    worker: subprocess.Popen
    worker_log: Path
    store: LocalJobStore
    models: Path

    def log_tail(self, chars: int = 6000) -> str:
        return self.worker_log.read_text(errors="replace")[-chars:]


def _wait_for_log(path: Path, text: str, process: subprocess.Popen, timeout_s: float, count: int = 1) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if path.read_text(errors="replace").count(text) >= count:
            return
        if process.poll() is not None:
            break
        time.sleep(0.2)
    raise RuntimeError(f"worker did not log {text!r} x{count}\n--- worker log ---\n"
                       f"{path.read_text(errors='replace')[-6000:]}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("segmenter-stack")
    models = make_segmenter_store(root / "models", patch_size=(64, 64, 64), overlap=0.25)
    with redis_server(root / "redis") as redis:
        env = {
            **os.environ,
            "BRAINSCAN_MODELS": str(models),
            "SEGMENTER_BROKER_URL": redis.url,
            "SEGMENTER_JOBS_DIR": str(root / "jobs"),
            "SEGMENTER_PROGRESS_INTERVAL_S": "0.2",
            "SEGMENTER_UNACKED_RESTORE_INTERVAL_S": "1",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
            "PYTHONUNBUFFERED": "1",
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }
        worker_log = root / "worker.log"
        with worker_log.open("wb") as log_file:
            worker = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "services.segmenter.worker", "worker", "-Q", "segmentation",
                 "-c", "1", "-P", "prefork", "--without-gossip", "--without-mingle", "--loglevel", "INFO"],
                cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            _wait_for_log(worker_log, "worker process ready", worker, WORKER_READY_TIMEOUT_S)
            settings = Settings(models_root=models, broker_url=redis.url, jobs_dir=root / "jobs")
            app = create_app(settings)
            with TestClient(app) as client:
                assert client.get("/readyz").status_code == 200
                yield Stack(client, worker, worker_log, app.state.store, models)
        finally:
            worker.terminate()
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(timeout=30)


@pytest.fixture(scope="module")
def small_case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_brats_phantoms(tmp_path_factory.mktemp("phantom-small"), n=1, seed=3)[0]


@pytest.fixture(scope="module")
def full_case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """240 x 240 x 155 at 1 mm, like real BraTS: long enough (dozens of patches) to act on a running job."""
    return write_brats_phantoms(tmp_path_factory.mktemp("phantom-full"), n=1, seed=4, full_size=True)[0]


def modality_files(case: Path) -> dict[str, bytes]:
    return {m: next(case.glob(f"*_{m}.nii.gz")).read_bytes() for m in MODALITIES}


def as_upload(case: Path, source: str) -> dict[str, tuple[str, bytes]]:
    files = modality_files(case)
    if source == "files":
        return {m: (f"{case.name}_{m}.nii.gz", data) for m, data in files.items()}
    if source == "zip":
        members = {f"{case.name}/{case.name}_{m}.nii.gz": data for m, data in files.items()}
        members[f"{case.name}/{case.name}_seg.nii.gz"] = next(case.glob("*_seg.nii.gz")).read_bytes()
        return {"case": (f"{case.name}.zip", case_zip(members))}
    reference = nib.load(next(case.glob("*_flair.nii.gz")))
    stacked = np.stack([np.asanyarray(nib.load(next(case.glob(f"*_{m}.nii.gz"))).dataobj) for m in MODALITIES], -1)
    image = nib.Nifti1Image(stacked, reference.affine, header=reference.header)
    return {"volume": ("volume.nii.gz", gzip.compress(image.to_bytes(), compresslevel=1))}


def submit(stack: Stack, upload: dict[str, tuple[str, bytes]]) -> dict[str, Any]:
    response = stack.client.post("/v1/jobs", files=upload, headers=OWNER)
    assert response.status_code == 202, response.text
    return response.json()


def poll(stack: Stack, job_id: str, until: Any = lambda body: body["status"] in FINAL,
         timeout_s: float = JOB_TIMEOUT_S) -> list[dict[str, Any]]:
    """Every body seen while polling, the last one satisfying ``until``."""
    seen = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = stack.client.get(f"/v1/jobs/{job_id}", headers=OWNER).json()
        seen.append(body)
        if until(body):
            return seen
        if stack.worker.poll() is not None:
            break
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} stuck at {seen[-1] if seen else None}\n--- worker log ---\n{stack.log_tail()}")


def download_mask(stack: Stack, body: dict[str, Any]) -> nib.Nifti1Image:
    response = stack.client.get(body["result"]["mask_url"], headers=OWNER)
    assert response.status_code == 200
    return nib.Nifti1Image.from_bytes(gzip.decompress(response.content))


def check_result(stack: Stack, body: dict[str, Any], case: Path) -> np.ndarray:
    """The succeeded job's mask lies on the input grid with BraTS labels; volumes and previews are there."""
    assert body["status"] == "succeeded", (body, stack.log_tail())
    flair = nib.load(next(case.glob("*_flair.nii.gz")))
    mask_img = download_mask(stack, body)
    mask = np.asanyarray(mask_img.dataobj)
    assert mask.shape == flair.shape
    np.testing.assert_allclose(mask_img.affine, flair.affine, atol=1e-4)
    assert set(np.unique(mask).tolist()) <= {0, 1, 2, 4}
    assert set(body["result"]["volumes_ml"]) == {"WT", "TC", "ET", "NCR", "ED"}
    from brainscan.models.precision import resolve_precision

    assert body["result"]["precision"] == resolve_precision("auto")  # SEGMENTER_PRECISION's default
    assert body["result"]["volumes_ml"]["WT"] == pytest.approx(
        np.count_nonzero(mask) * float(np.prod(flair.header.get_zooms()[:3])) / 1000.0, abs=1e-2)
    for url in body["result"]["previews"].values():
        png = stack.client.get(url, headers=OWNER)
        assert png.headers["content-type"] == "image/png" and png.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"queue_s", "preprocess_s", "inference_s", "write_s"} <= set(body["timings"])
    return mask


def pool_children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (the prefork pool of a worker main process)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name in parentheses may hold spaces: the fields after the last ')' are fixed
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid:
            children.append(int(entry.name))
    return children


# -- tests --------------------------------------------------------------------------------------

def test_three_upload_shapes_give_the_same_mask_on_the_input_grid(stack: Stack, small_case: Path) -> None:
    jobs = {source: submit(stack, as_upload(small_case, source)) for source in ("files", "zip", "4d")}
    masks = {}
    for source, job in jobs.items():
        assert job["input"]["source"] == source
        body = poll(stack, job["id"])[-1]
        masks[source] = check_result(stack, body, small_case)
        assert body["attempts"] == 1 and body["error"] is None
    np.testing.assert_array_equal(masks["zip"], masks["files"])
    np.testing.assert_array_equal(masks["4d"], masks["files"])
    other = {"X-Brainscan-Owner": "someone-else"}
    job_id = jobs["files"]["id"]
    assert stack.client.get(f"/v1/jobs/{job_id}", headers=other).status_code == 404
    assert stack.client.get(f"/v1/jobs/{job_id}/files/mask.nii.gz", headers=other).status_code == 404


def test_job_survives_sigkill_of_its_pool_process(stack: Stack, full_case: Path) -> None:
    from brainscan.data.brats import BratsCase, load_case
    from brainscan.inference.segmenter import segment_case
    from brainscan.models.bundle import load_bundle
    from brainscan.models.store import ModelStore

    job = submit(stack, as_upload(full_case, "files"))
    assert job["input"]["shape"] == [240, 240, 155]

    def mid_inference(body: dict[str, Any]) -> bool:
        return body["stage"] == "inference" and 0 < body["progress"] < 1 and bool(body["stage_detail"])

    running = poll(stack, job["id"], until=mid_inference)[-1]
    done, total = (int(n) for n in running["stage_detail"].removeprefix("patch ").split(" of "))
    assert 1 <= done < total and total >= 10
    children = pool_children(stack.worker.pid)
    assert len(children) == 1, children
    os.kill(children[0], signal.SIGKILL)

    seen = poll(stack, job["id"])
    final = seen[-1]
    mask = check_result(stack, final, full_case)
    record = stack.store.get(job["id"])
    assert final["attempts"] == 2
    assert [h["stage"] for h in record["history"]].count("preprocessing") == 2  # started twice
    assert [h["stage"] for h in record["history"]][-3:] == ["inference", "writing results", "done"]
    assert pool_children(stack.worker.pid) and pool_children(stack.worker.pid) != children
    # the restarted job computed the same mask as the evaluation path does in this process
    paths = {m: stack.store.path_for(job["id"], f"input_{m}.nii.gz") for m in MODALITIES}
    case = load_case(BratsCase("case", paths["flair"].parent, paths), with_seg=False)
    bundle = load_bundle(ModelStore(stack.models).current("segmentation", "unet3d"))
    np.testing.assert_array_equal(mask, segment_case(bundle, case))


def test_queued_and_running_jobs_can_be_cancelled(stack: Stack, full_case: Path, small_case: Path) -> None:
    long_job = submit(stack, as_upload(full_case, "files"))
    queued_job = submit(stack, as_upload(small_case, "files"))
    poll(stack, long_job["id"], until=lambda body: body["stage"] == "inference" and body["progress"] > 0.05)
    assert stack.client.get(f"/v1/jobs/{queued_job['id']}", headers=OWNER).json()["status"] == "queued"

    for job in (queued_job, long_job):
        response = stack.client.delete(f"/v1/jobs/{job['id']}", headers=OWNER)
        assert (response.status_code, response.json()["status"]) == (200, "cancelled")
    # a job submitted afterwards runs once the worker has dropped both
    follower = submit(stack, as_upload(small_case, "files"))
    assert poll(stack, follower["id"])[-1]["status"] == "succeeded"

    long_record = stack.store.get(long_job["id"])
    assert long_record["status"] == "cancelled" and long_record["result"] is None
    assert long_record["progress"] < 0.95
    assert not stack.store.path_for(long_job["id"], "mask.nii.gz").exists()
    queued_record = stack.store.get(queued_job["id"])
    assert (queued_record["status"], queued_record["attempts"], queued_record["started_at"]) == ("cancelled", 0, None)


@needs_brats_sample
def test_real_brats_case_keeps_its_grid(stack: Stack) -> None:
    upload = {m: (path.name, path.read_bytes()) for m in MODALITIES for path in BRATS_SAMPLE.glob(f"*_{m}.nii.gz")}
    assert len(upload) == 4
    job = submit(stack, upload)
    body = poll(stack, job["id"])[-1]
    mask = check_result(stack, body, BRATS_SAMPLE)
    assert mask.shape == (240, 240, 155)
    assert body["input"]["spacing_mm"] == [1.0, 1.0, 1.0]

