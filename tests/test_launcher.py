"""`brainscan up`: the stack starts, serves a classification, and Ctrl-C leaves no process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from brainscan.launcher import free_port
from tests.bundles import make_classifier_store
from tests.paths import KAGGLE_TRAINING

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


def launch(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "brainscan.cli.main", "up", *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_classifier_store(tmp_path_factory.mktemp("models"), archs=("resnet50",))


def test_up_serves_and_ctrl_c_stops_everything(store: Path) -> None:
    port = free_port()
    proc = launch("--port", str(port), "--models", str(store))
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "launcher exited:\n" + "".join(lines)
            lines.append(line)
            if "brainscan is running" in line:
                break
        else:
            pytest.fail("launcher never became ready:\n" + "".join(lines))
        assert f"http://127.0.0.1:{port}/" in lines[-1]
        children = children_of(proc.pid)
        assert len(children) == 2, children  # classifier + gateway
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
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "stopping" in out
    time.sleep(0.5)
    assert [pid for pid in children if alive(pid)] == []


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
    proc = launch("--port", str(free_port()), "--models", str(tmp_path))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "no classifier bundle" in out and "Traceback" not in out
