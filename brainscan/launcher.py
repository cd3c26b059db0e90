"""The local launcher behind ``brainscan up`` and ``make run``: every service on one machine.

It starts each service as a child process (uvicorn), waits until each answers its readiness
check, prints the URL to open, and on Ctrl-C (SIGINT) or SIGTERM stops every process it started,
in reverse order, cleanly. Internal services bind to 127.0.0.1 on free ports; only the gateway
listens on ``--host``/``--port``. Children are tied to the launcher (Linux ``PR_SET_PDEATHSIG``), so
they also end if the launcher itself is killed.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from threading import Thread

from brainscan.errors import BrainscanError

REPO_ROOT = Path(__file__).resolve().parents[1]


class LaunchError(BrainscanError):
    """The stack cannot start: a port is taken, a model is missing, a service failed to start."""

    code = "launch_failed"


@dataclass
class Service:
    """One child process: a uvicorn app on a port, with its readiness URL."""

    name: str
    app: str
    host: str
    port: int
    ready_path: str
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    log_tail: deque[str] = field(default_factory=lambda: deque(maxlen=40))

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    os.setsid()  # the terminal's Ctrl-C goes to the launcher, which stops children in order


def _pump(service: Service, echo: bool) -> None:
    assert service.process is not None and service.process.stdout is not None
    for raw in service.process.stdout:
        line = raw.decode(errors="replace").rstrip()
        service.log_tail.append(line)
        if echo:
            print(f"[{service.name}] {line}", flush=True)


def start(service: Service, *, echo_logs: bool) -> None:
    env = {**os.environ, **service.env, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    service.process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", service.app, "--host", service.host, "--port", str(service.port),
         "--no-access-log", "--timeout-graceful-shutdown", "10"],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
    )
    Thread(target=_pump, args=(service, echo_logs), daemon=True).start()


def wait_ready(service: Service, timeout_s: float) -> None:
    """Poll the readiness URL until it answers 200; raise with the log tail if the child dies."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert service.process is not None
        if service.process.poll() is not None:
            tail = "\n".join(service.log_tail)
            raise LaunchError(f"{service.name} exited with status {service.process.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(service.url + service.ready_path, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise LaunchError(f"{service.name} was not ready after {timeout_s:.0f} s ({service.url}{service.ready_path})")


def stop(services: list[Service], grace_s: float = 15.0) -> None:
    """SIGTERM every child (reverse start order), then SIGKILL what is still running after ``grace_s``."""
    for service in reversed(services):
        if service.process and service.process.poll() is None:
            service.process.terminate()
    deadline = time.monotonic() + grace_s
    for service in reversed(services):
        if service.process is None:
            continue
        try:
            service.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            service.process.kill()
            service.process.wait()


def plan(*, host: str, port: int, models_root: Path, api_keys: str | None) -> list[Service]:
    """The services to start, in start order, with their configuration (environment variables)."""
    from brainscan.models.store import ModelStore

    if not port_is_free(host, port):
        raise LaunchError(f"port {port} on {host} is already in use; stop what runs there or pass --port")
    classifiers = [e for e in ModelStore(models_root).list(task="classification") if e.current and not e.error]
    if not classifiers:
        raise LaunchError(
            f"no classifier bundle in {models_root}; train one with 'brainscan train classifier' "
            "(see README) or point --models / BRAINSCAN_MODELS at a model store"
        )
    classifier = Service(
        name="classifier", app="services.classifier.app:app", host="127.0.0.1", port=free_port(),
        ready_path="/readyz",
        env={"BRAINSCAN_MODELS": str(models_root),
             "CLASSIFIER_EXPECTED_MODELS": ",".join(sorted(e.arch for e in classifiers))},
    )
    gateway_env = {"GATEWAY_CLASSIFIER_URL": classifier.url, "GATEWAY_SEGMENTER_URL": ""}
    if api_keys:
        gateway_env["GATEWAY_API_KEYS"] = api_keys
    gateway = Service(name="gateway", app="gateway.app:app", host=host, port=port, ready_path="/api/ready",
                      env=gateway_env)
    return [classifier, gateway]


def run(*, host: str, port: int, models_root: Path, api_keys: str | None = None, echo_logs: bool = False,
        ready_timeout_s: float = 300.0) -> int:
    """Start the stack, block until Ctrl-C / SIGTERM, stop everything. Returns an exit status."""
    services = plan(host=host, port=port, models_root=models_root, api_keys=api_keys)
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        for service in services:
            print(f"starting {service.name} on {service.url} ...", flush=True)
            start(service, echo_logs=echo_logs)
            wait_ready(service, ready_timeout_s)
        shown_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        print(f"\nbrainscan is running: open http://{shown_host}:{port}/  (API docs: /docs)\n"
              "Research software, not for clinical use. Press Ctrl-C to stop.", flush=True)
        while True:
            for service in services:
                assert service.process is not None
                if service.process.poll() is not None:
                    tail = "\n".join(service.log_tail)
                    raise LaunchError(f"{service.name} stopped unexpectedly (status "
                                      f"{service.process.returncode}):\n{tail}")
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 0
    finally:
        stop(services)
        signal.signal(signal.SIGTERM, previous)
        if stopping:
            print("stopped", flush=True)
