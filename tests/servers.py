"""Start real HTTP servers for integration tests: uvicorn in a subprocess, or an ASGI app in a thread.

Every server gets a free port on 127.0.0.1 (never the default ports of the project) and the
helpers return only once it answers its readiness path, so tests never sleep blindly. Subprocess
output goes to a log file whose tail is put into the error when a server fails to start.

Every uvicorn server gets the test session's :data:`INTERNAL_TOKEN` as ``BRAINSCAN_INTERNAL_TOKEN``
(an ``env`` entry overrides it; ``""`` leaves it unset), as a deployment would: the gateway sends
it, the classifier and the segmenter API require it. A test that calls an internal service
directly sends :data:`INTERNAL_HEADERS`.

Example::

    with serve_uvicorn("services.classifier.app:app", env={"BRAINSCAN_MODELS": str(store)},
                       ready_path="/readyz", log_dir=tmp_path) as classifier:
        httpx.get(f"{classifier.url}/v1/models", headers=INTERNAL_HEADERS)
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from serving.internal_auth import INTERNAL_TOKEN_HEADER, TOKEN_VARIABLE

REPO_ROOT = Path(__file__).resolve().parents[1]
#: the internal token of every server this session starts (random: no test may depend on its value)
INTERNAL_TOKEN = "test-internal-" + secrets.token_urlsafe(24)
#: what a test sends to call the classifier or the segmenter API directly, as the gateway does
INTERNAL_HEADERS = {INTERNAL_TOKEN_HEADER: INTERNAL_TOKEN}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process(process: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """Terminate ``process`` if it still runs: SIGTERM, then SIGKILL after ``timeout_s``."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=timeout_s)


def log_tail(path: Path, chars: int) -> str:
    """The last ``chars`` characters of the log file at ``path`` ("" when it cannot be read)."""
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def wait_until_ready(url: str, *, timeout_s: float, is_alive=lambda: True, expect_status: int = 200) -> None:
    """Poll ``url`` until it answers ``expect_status``.

    Raises:
        RuntimeError: ``is_alive()`` turned false (the server died) or ``timeout_s`` passed.
    """
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    while time.monotonic() < deadline:
        if not is_alive():
            raise RuntimeError(f"server died before {url} was ready ({last})")
        try:
            response = httpx.get(url, timeout=2.0, trust_env=False)
            if response.status_code == expect_status:
                return
            last = f"HTTP {response.status_code}"
        except httpx.TransportError as exc:
            last = type(exc).__name__
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout_s:g} s ({last})")


@dataclass
class RunningServer:
    """A uvicorn subprocess serving on ``url``."""

    url: str
    port: int
    process: subprocess.Popen
    log_path: Path
    _log_file: object = field(repr=False, default=None)

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server's combined stdout/stderr."""
        return log_tail(self.log_path, chars)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Terminate the process (SIGTERM, then SIGKILL after ``timeout_s``)."""
        stop_process(self.process, timeout_s)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def start_uvicorn(target: str, *, env: dict[str, str] | None = None, factory: bool = False,
                  ready_path: str = "/healthz", ready_timeout_s: float = 90.0,
                  log_dir: Path | None = None) -> RunningServer:
    """Run ``uvicorn target`` in a subprocess on a free port and wait until it is ready.

    Args:
        target: ``"module:attribute"``, e.g. ``"gateway.app:app"``.
        env: extra environment variables (added to this process's environment and
            ``BRAINSCAN_INTERNAL_TOKEN``=:data:`INTERNAL_TOKEN`; the repository root is put on ``PYTHONPATH``).
        factory: ``target`` is an app factory (uvicorn ``--factory``).
        ready_path: path that must answer 200 before this returns.
        ready_timeout_s: how long to wait for it (servers that load TensorFlow need seconds).
        log_dir: folder for the log file (a temporary folder when None).

    Returns:
        The running server; call :meth:`RunningServer.stop` (or use :func:`serve_uvicorn`).

    Raises:
        RuntimeError: the server exited or was not ready in time; the message holds its log tail.
    """
    if not target or ":" not in target:
        raise ValueError(f"target must look like 'module:attribute', got {target!r}")
    port = free_port()
    log_dir = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="brainscan-server-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{target.replace(':', '_').replace('.', '_')}-{port}.log"
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2", TOKEN_VARIABLE: INTERNAL_TOKEN,
                **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), full_env.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "uvicorn", target, "--host", "127.0.0.1", "--port", str(port),
               "--log-level", "warning", *(["--factory"] if factory else [])]
    log_file = open(log_path, "wb")  # noqa: SIM115 - closed by RunningServer.stop
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=full_env, stdout=log_file, stderr=subprocess.STDOUT)
    server = RunningServer(f"http://127.0.0.1:{port}", port, process, log_path, log_file)
    try:
        wait_until_ready(server.url + ready_path, timeout_s=ready_timeout_s,
                         is_alive=lambda: process.poll() is None)
    except RuntimeError as exc:
        server.stop()
        raise RuntimeError(f"{target}: {exc}\n--- server log ---\n{server.log_tail()}") from exc
    return server


@contextlib.contextmanager
def serve_uvicorn(target: str, **kwargs) -> Iterator[RunningServer]:
    """:func:`start_uvicorn` as a context manager that always stops the server."""
    server = start_uvicorn(target, **kwargs)
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def serve_in_thread(app, *, ready_path: str = "/", ready_status: int = 200,
                    ready_timeout_s: float = 15.0) -> Iterator[str]:
    """Serve an ASGI ``app`` with uvicorn in a background thread of this process; yields its URL.

    Meant for tiny stand-ins (e.g. a deliberately slow upstream), not for the real services:
    those run in subprocesses so that their imports and threads never leak into the test process.
    """
    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off",
                            timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url + ready_path, timeout_s=ready_timeout_s, is_alive=thread.is_alive,
                         expect_status=ready_status)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def launch_brainscan_up(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """``brainscan up ARGS`` in a subprocess (stdout and stderr merged into a text pipe)."""
    return subprocess.Popen([sys.executable, "-m", "brainscan.cli.main", "up", *args], cwd=REPO_ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})


def wait_for_launcher(process: subprocess.Popen[str], timeout_s: float = 240.0) -> list[str]:
    """Read the launcher's output until it prints "brainscan is running"; returns the lines read.

    Fails the test (with the output so far) when the launcher exits or is not ready in time.
    """
    import pytest

    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        assert line or process.poll() is None, "launcher exited:\n" + "".join(lines)
        lines.append(line)
        if "brainscan is running" in line:
            return lines
    pytest.fail("launcher never became ready:\n" + "".join(lines))


def stop_launcher(process: subprocess.Popen[str], timeout_s: float = 60.0) -> str:
    """Ctrl-C the launcher (SIGINT) and return the rest of its output; SIGKILL if it hangs."""
    import signal

    process.send_signal(signal.SIGINT)
    try:
        return process.communicate(timeout=timeout_s)[0]
    except subprocess.TimeoutExpired:
        process.kill()
        return process.communicate()[0]
