"""`brainscan up`: the stack starts, serves a classification, and Ctrl-C leaves no process behind; each
run has its own internal token and Redis password, which no child gets on its command line, no child
gets unless it needs it, and nothing prints. A Redis that dies is started again (same port, password
and append-only file, after a back-off) while every other service keeps running and a job in flight
finishes."""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest

from brainscan.launcher import (
    RESTART_MAX_DELAY_S,
    LaunchError,
    RunSecrets,
    Service,
    free_port,
    plan,
    restart_delay,
    start,
    supervise,
)
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


#: secrets exported in the shell that starts the launcher: a run must use fresh ones instead
EXPORTED = {"BRAINSCAN_INTERNAL_TOKEN": "exported-token-0123456789abcdef",
            "BRAINSCAN_REDIS_PASSWORD": "exported-redis-password-0123456789"}


def environ_of(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(entry.decode(errors="replace").partition("=")[::2] for entry in entries if b"=" in entry)


def cmdline_of(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


@pytest.mark.timeout(1500)  # the waits of the two launches it replaces
def test_up_serves_restarts_a_redis_that_dies_and_ctrl_c_stops_everything(store: Path) -> None:
    """One launched stack (each start loads TensorFlow in four processes): it serves the page, a
    classification and a segmentation; Redis killed under a queued job comes back on its port while
    nothing else stops and the job finishes once; Ctrl-C then stops every process, the new Redis too."""
    import redis

    port = free_port()
    proc = launch("--port", str(port), "--models", str(store), "--workers", "2",
                  "--data-dir", str(store.parent / "var"), env=EXPORTED)
    try:
        lines = wait_for_launcher(proc)
        assert f"http://127.0.0.1:{port}/" in lines[-1]
        children = children_of(proc.pid)
        assert len(children) == 6, children  # redis, classifier, segmenter API, 2 workers, gateway
        worker_pools = [grandchild for pid in children for grandchild in children_of(pid)]
        run_secrets = check_trust_boundary(lines, children)
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/api/ready", timeout=10).status_code == 200
        page = httpx.get(f"{base}/", timeout=10)
        assert page.status_code == 200 and "not for clinical use" in page.text.lower()
        image = next(KAGGLE_TRAINING.glob("glioma/*.jpg"), None) if KAGGLE_TRAINING.is_dir() else None
        if image is None:
            from brainscan.data.phantoms import make_kaggle_phantom
            from brainscan.data.phantoms.kaggle import encode_jpeg

            raw = encode_jpeg(make_kaggle_phantom("glioma", seed=1))
        else:
            raw = image.read_bytes()
        result = httpx.post(f"{base}/api/v1/classifications", files={"file": ("scan.jpg", raw, "image/jpeg")},
                            timeout=60)
        assert result.status_code == 200, result.text
        assert result.json()["label"] in ("glioma", "meningioma", "notumor", "pituitary")
        segment_one_case(base, store.parent / "case")

        # Redis dies under a queued job
        redis_port = int(re.search(r"starting redis on 127\.0\.0\.1:(\d+)", "".join(lines)).group(1))
        commands = {pid: cmdline_of(pid) for pid in children}
        redis_pid = next(pid for pid, command in commands.items() if "redis-server" in command)
        worker_pid = next(pid for pid, command in commands.items() if "celery" in command)
        password = environ_of(worker_pid)["BRAINSCAN_REDIS_PASSWORD"]
        others = sorted(set(children) - {redis_pid})
        with httpx.Client(base_url=base, timeout=60) as client:  # keeps the session cookie: job ownership
            job = client.post("/api/v1/segmentations", files=phantom_upload(store.parent / "redis-loss-case"))
            assert job.status_code == 202, job.text
            os.kill(redis_pid, signal.SIGKILL)
            image = {"file": ("scan.jpg", slice_jpeg(), "image/jpeg")}
            classified = client.post("/api/v1/classifications", files=image)
            assert classified.status_code == 200, classified.text

            deadline = time.monotonic() + 60
            restarted = None
            while time.monotonic() < deadline and restarted is None:
                time.sleep(0.5)
                fresh = [pid for pid in children_of(proc.pid)
                         if pid not in children and "redis-server" in cmdline_of(pid)]
                if fresh and redis.Redis(host="127.0.0.1", port=redis_port, password=password,
                                         socket_timeout=2).ping():
                    restarted = fresh[0]
            assert restarted is not None, "the launcher did not start Redis again on its port"
            assert [pid for pid in others if not alive(pid)] == [] and set(others) <= set(children_of(proc.pid))

            body = job.json()
            deadline = time.monotonic() + 240
            while body["status"] in ("queued", "running") and time.monotonic() < deadline:
                time.sleep(0.5)
                body = client.get(f"/api/v1/segmentations/{body['id']}").json()
            assert body["status"] == "succeeded" and body["attempts"] == 1, body
            deadline = time.monotonic() + 60
            while client.get("/api/ready").status_code != 200 and time.monotonic() < deadline:
                time.sleep(0.5)
            assert client.get("/api/ready").status_code == 200
    finally:
        out = stop_launcher(proc)
    assert proc.returncode == 0, out
    assert "stopping" in out
    assert "redis stopped unexpectedly (status -9); restarting it in 1 s" in out, out
    assert "restarted redis (restart 1 in a row)" in out
    assert not any(secret in "".join(lines) + out for secret in run_secrets)  # never printed
    time.sleep(0.5)
    # the killed Redis was reaped at once: its pid may be a stranger's by now
    assert [pid for pid in [*others, *worker_pools, restarted] if alive(pid)] == []


def check_trust_boundary(lines: list[str], children: list[int]) -> tuple[str, str]:
    """The launched stack's internal services and Redis refuse callers without its secrets, which
    are fresh (not the exported ones), on no command line, and given only to who needs them.

    Returns:
        the run's internal token and Redis password.
    """
    import redis

    started = re.findall(r"starting (\S+) on \S*?127\.0\.0\.1:(\d+)", "".join(lines))
    ports = {name: int(port) for name, port in started}
    environments = {pid: environ_of(pid) for pid in children}
    commands = {pid: cmdline_of(pid) for pid in children}
    markers = {"services.classifier.app": "classifier", "services.segmenter.app": "segmenter-api",
               "gateway.app": "gateway", "celery": "worker", "redis-server": "redis"}
    by_name: dict[str, list[int]] = {}
    for pid, command in commands.items():
        name = next((name for marker, name in markers.items() if marker in command), "?")
        by_name.setdefault(name, []).append(pid)
    token = environments[by_name["classifier"][0]]["BRAINSCAN_INTERNAL_TOKEN"]
    password = environments[by_name["worker"][0]]["BRAINSCAN_REDIS_PASSWORD"]
    assert token not in EXPORTED.values() and password not in EXPORTED.values() and token != password
    for name, pids in by_name.items():
        for pid in pids:
            assert token not in commands[pid] and password not in commands[pid], name
            assert (environments[pid].get("BRAINSCAN_INTERNAL_TOKEN") == token) is (
                name in ("classifier", "segmenter-api", "gateway")), name
            assert (environments[pid].get("BRAINSCAN_REDIS_PASSWORD") == password) is (
                name in ("segmenter-api", "worker")), name
            assert password not in environments[pid].get("SEGMENTER_BROKER_URL", ""), name

    for service in ("classifier", "segmenter-api"):
        base = f"http://127.0.0.1:{ports[service]}"
        for headers in ({}, {"X-Brainscan-Internal-Token": EXPORTED["BRAINSCAN_INTERNAL_TOKEN"]}):
            refused = httpx.get(f"{base}/v1/models", headers=headers, timeout=10)
            assert refused.status_code == 401 and refused.json()["error"] == "unauthorized", service
        allowed = httpx.get(f"{base}/v1/models", headers={"X-Brainscan-Internal-Token": token}, timeout=10)
        assert allowed.status_code == 200, service
        assert httpx.get(f"{base}/readyz", timeout=10).status_code == 200
    for guess in (None, EXPORTED["BRAINSCAN_REDIS_PASSWORD"]):
        client = redis.Redis(host="127.0.0.1", port=ports["redis"], password=guess, socket_timeout=5)
        with pytest.raises(redis.exceptions.AuthenticationError):
            client.ping()
        client.close()
    assert redis.Redis(host="127.0.0.1", port=ports["redis"], password=password, socket_timeout=5).ping()
    return token, password


def test_each_run_plans_its_own_secrets(store: Path, tmp_path: Path) -> None:
    runs = [plan(host="127.0.0.1", port=free_port(), models_root=store, data_dir=tmp_path, workers=2)
            for _ in range(2)]
    tokens, passwords = [], []
    for services in runs:
        env = {service.name: service.env for service in services}
        token = env["gateway"]["BRAINSCAN_INTERNAL_TOKEN"]
        password = env["segmenter-api"]["BRAINSCAN_REDIS_PASSWORD"]
        assert len(token) >= 32 and len(password) >= 32
        assert env["classifier"]["BRAINSCAN_INTERNAL_TOKEN"] == token
        assert env["segmenter-api"]["BRAINSCAN_INTERNAL_TOKEN"] == token
        assert [env[w]["BRAINSCAN_REDIS_PASSWORD"] for w in ("worker-1", "worker-2")] == [password] * 2
        redis_service = services[0]
        assert redis_service.name == "redis" and redis_service.stdin == f"requirepass {password}\n".encode()
        assert "-" in redis_service.argv and not any(password in arg for arg in redis_service.argv)
        for service in services:
            assert token not in " ".join(service.command()) and password not in " ".join(service.command())
            assert password not in service.env.get("SEGMENTER_BROKER_URL", "")
        tokens.append(token)
        passwords.append(password)
    assert len(set(tokens)) == len(set(passwords)) == 2  # fresh each run
    fresh = RunSecrets.generate()
    assert fresh.internal_token not in repr(fresh) and fresh.redis_password not in repr(fresh)
    assert tokens[0] not in repr(runs[0]) and passwords[0] not in repr(runs[0])


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


def test_restart_delay_doubles_up_to_its_cap() -> None:
    assert [restart_delay(n) for n in range(7)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, RESTART_MAX_DELAY_S]
    assert restart_delay(10_000) == RESTART_MAX_DELAY_S
    with pytest.raises(ValueError, match="restarts must be >= 0"):
        restart_delay(-1)


def exits_at_once(name: str, restart: bool) -> Service:
    return Service(name=name, host="127.0.0.1", port=0, argv=[sys.executable, "-c", "raise SystemExit(3)"],
                   ready_line="never", restart=restart)


def test_supervise_restarts_only_a_restartable_child_after_its_back_off(capsys: pytest.CaptureFixture[str]) -> None:
    child = exits_at_once("flaky", restart=True)
    start(child, echo_logs=False)
    first = child.process
    assert first is not None and first.wait(timeout=30) == 3
    now = time.monotonic()
    supervise(child, echo_logs=False, now=now)  # noticed: a restart is due in 1 s
    assert child.process is first and child.restart_at == pytest.approx(now + 1.0)
    supervise(child, echo_logs=False, now=now + 0.5)
    assert child.process is first  # not before the back-off
    supervise(child, echo_logs=False, now=now + 1.0)
    assert child.process is not first and child.restarts == 1
    assert child.process.wait(timeout=30) == 3
    supervise(child, echo_logs=False, now=now + 2.0)
    assert child.restart_at == pytest.approx(now + 2.0 + restart_delay(1))  # dying again: a longer wait
    printed = capsys.readouterr().out
    assert "flaky stopped unexpectedly (status 3); restarting it in 1 s" in printed
    assert "restarted flaky (restart 1 in a row)" in printed

    fixed = exits_at_once("gateway", restart=False)
    start(fixed, echo_logs=False)
    assert fixed.process is not None and fixed.process.wait(timeout=30) == 3
    with pytest.raises(LaunchError, match="gateway stopped unexpectedly"):
        supervise(fixed, echo_logs=False)


def test_only_the_embedded_redis_is_restarted_and_its_appendonly_file_is_fsynced(store: Path, tmp_path: Path) -> None:
    services = plan(host="127.0.0.1", port=free_port(), models_root=store, data_dir=tmp_path)
    assert [s.name for s in services if s.restart] == ["redis"]
    argv = services[0].argv
    assert argv is not None and argv[argv.index("--appendfsync") + 1] == "always"
    assert argv[argv.index("--appendonly") + 1] == "yes" and argv[argv.index("--dir") + 1] == str(tmp_path / "redis")


def phantom_upload(folder: Path) -> dict[str, tuple[str, bytes, str]]:
    from brainscan.data.phantoms import write_brats_phantoms

    case = write_brats_phantoms(folder, n=1, seed=11, shape=(64, 64, 48))[0]
    return {m: (p.name, p.read_bytes(), "application/gzip")
            for m in ("t1", "t1ce", "t2", "flair") for p in case.glob(f"*_{m}.nii.gz")}


def slice_jpeg() -> bytes:
    from brainscan.data.phantoms import make_kaggle_phantom
    from brainscan.data.phantoms.kaggle import encode_jpeg

    return encode_jpeg(make_kaggle_phantom("glioma", seed=1))
