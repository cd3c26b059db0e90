"""`brainscan up`: the stack starts, serves a classification, and Ctrl-C leaves no process behind."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import pytest

from brainscan.launcher import free_port
from tests.bundles import make_classifier_store
from tests.paths import KAGGLE_TRAINING
from tests.servers import launch_brainscan_up as launch
from tests.servers import stop_launcher, wait_for_launcher

REPO = Path(__file__).resolve().parents[1]


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = make_classifier_store(tmp_path_factory.mktemp("models"), archs=("resnet50",))
    # The demo segmentation bundles that ship in the repo (training them here would take minutes).
    shutil.copytree(REPO / "models" / "segmentation", root / "segmentation")
    return root


def test_up_serves_and_ctrl_c_stops_everything(store: Path) -> None:
    port = free_port()
    proc = launch("--port", str(port), "--models", str(store), "--workers", "2",
                  "--data-dir", str(store.parent / "var"))
    try:
        lines = wait_for_launcher(proc)
        assert f"http://127.0.0.1:{port}/" in lines[-1]
        children = children_of(proc.pid)
        assert len(children) == 6, children  # redis, classifier, segmenter API, 2 workers, gateway
        worker_pools = [grandchild for pid in children for grandchild in children_of(pid)]
        assert httpx.get(f"http://127.0.0.1:{port}/api/ready", timeout=10).status_code == 200
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=10)
        assert page.status_code == 200 and "not for clinical use" in page.text.lower()
        image = next(KAGGLE_TRAINING.glob("glioma/*.jpg"), None) if KAGGLE_TRAINING.is_dir() else None
        if image is None:
            from brainscan.data.phantoms import make_kaggle_phantom
            from brainscan.data.phantoms.kaggle import encode_jpeg

            raw = encode_jpeg(make_kaggle_phantom("glioma", seed=1))
        else:
            raw = image.read_bytes()
        result = httpx.post(f"http://127.0.0.1:{port}/api/v1/classifications",
                            files={"file": ("scan.jpg", raw, "image/jpeg")}, timeout=60)
        assert result.status_code == 200, result.text
        assert result.json()["label"] in ("glioma", "meningioma", "notumor", "pituitary")
        segment_one_case(f"http://127.0.0.1:{port}", store.parent / "case")
    finally:
        out = stop_launcher(proc)
    assert proc.returncode == 0, out
    assert "stopping" in out
    time.sleep(0.5)
    assert [pid for pid in children + worker_pools if alive(pid)] == []


def segment_one_case(base: str, workdir: Path) -> None:
    """A phantom case through the launched gateway, segmenter API, broker and worker, to a mask."""
    import nibabel as nib
    import numpy as np

    from brainscan.data.phantoms import write_brats_phantoms

    case = write_brats_phantoms(workdir, n=1, seed=11, shape=(64, 64, 48))[0]
    files = {m: (p.name, p.read_bytes(), "application/gzip")
             for m in ("t1", "t1ce", "t2", "flair") for p in case.glob(f"*_{m}.nii.gz")}
    with httpx.Client(base_url=base, timeout=60) as client:  # keeps the session cookie: job ownership
        created = client.post("/api/v1/segmentations", files=files)
        assert created.status_code == 202, created.text
        job = created.json()
        deadline = time.monotonic() + 240
        while job["status"] in ("queued", "running") and time.monotonic() < deadline:
            time.sleep(0.5)
            job = client.get(f"/api/v1/segmentations/{job['id']}").json()
        assert job["status"] == "succeeded", job
        mask = client.get(job["result"]["mask_url"])
        assert mask.status_code == 200
    out = workdir / "mask.nii.gz"
    out.write_bytes(mask.content)
    reference = nib.load(str(next(case.glob("*_flair.nii.gz"))))
    result = nib.load(str(out))
    assert result.shape == reference.shape
    assert np.allclose(result.affine, reference.affine, atol=1e-4)
    assert set(np.unique(np.asarray(result.dataobj)).tolist()) <= {0, 1, 2, 4}


def test_up_refuses_a_taken_port(store: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = launch("--port", str(port), "--models", str(store))
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert f"port {port}" in out and "already in use" in out and "Traceback" not in out


def test_up_refuses_a_store_without_models(tmp_path: Path) -> None:
    proc = launch("--port", str(free_port()), "--models", str(tmp_path), "--no-demo")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "no classifier bundle" in out and "Traceback" not in out
