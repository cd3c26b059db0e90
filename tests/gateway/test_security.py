"""Throttling of wrong API keys (gateway/security.py), against the REAL gateway and segmenter API.

Both run as uvicorn subprocesses, as deployed: the segmenter API with an empty model store (its
``/v1/models`` needs neither Redis nor TensorFlow), the gateway in front of it with API keys and a
small failure limit. uvicorn trusts ``X-Forwarded-For`` from 127.0.0.1 (``FORWARDED_ALLOW_IPS``'s
default), so each test client names its own address the way a reverse proxy would.

The attack: wrong keys in a row, answered at full speed. Now the client that sends them gets 429
with ``Retry-After`` and a JSON reason once it passes the limit, whatever key it sends; another
client is not affected, requests with a valid key are never counted, and the limit lifts after the
window.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.requests import Request

from gateway.security import FailedKeyThrottle, client_id
from gateway.settings import GatewaySettings
from tests.servers import RunningServer, free_port, serve_uvicorn

API_KEY = "key-one"
MAX_FAILURES = 3
WINDOW_S = 2.0
MODELS_PATH = "/api/v1/segmentation-models"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("throttle")
    (root / "models").mkdir()
    segmenter_env = {"BRAINSCAN_MODELS": str(root / "models"), "SEGMENTER_JOBS_DIR": str(root / "jobs"),
                     "SEGMENTER_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0", "SEGMENTER_LOG_LEVEL": "WARNING"}
    with serve_uvicorn("services.segmenter.app:app", env=segmenter_env, log_dir=root) as segmenter:
        gateway_env = {"GATEWAY_SEGMENTER_URL": segmenter.url,
                       "GATEWAY_CLASSIFIER_URL": f"http://127.0.0.1:{free_port()}", "GATEWAY_API_KEYS": API_KEY,
                       "GATEWAY_API_KEY_MAX_FAILURES": str(MAX_FAILURES),
                       "GATEWAY_API_KEY_FAILURE_WINDOW_S": str(WINDOW_S), "GATEWAY_LOG_LEVEL": "WARNING"}
        with serve_uvicorn("gateway.app:app", env=gateway_env, ready_path="/api/health", log_dir=root) as server:
            yield server


def from_client(gateway: RunningServer, address: str, key: str | None) -> httpx.Response:
    """``GET /api/v1/segmentation-models`` as the client at ``address``, with ``key`` (None: no key)."""
    headers = {"X-Forwarded-For": address, **({"X-API-Key": key} if key is not None else {})}
    return httpx.get(gateway.url + MODELS_PATH, headers=headers, timeout=10)


def test_wrong_keys_are_throttled_per_client(gateway: RunningServer) -> None:
    attacker, neighbour = "203.0.113.7", "198.51.100.9"
    for attempt in range(MAX_FAILURES):
        response = from_client(gateway, attacker, f"guess-{attempt}")
        assert (response.status_code, response.json()["error"]) == (401, "unauthorized")
    for key in ("guess-next", API_KEY):  # over the limit, no key is even compared: the right one neither
        response = from_client(gateway, attacker, key)
        assert response.status_code == 429, response.text
        assert response.json()["error"] == "too_many_requests" and "Wait" in response.json()["detail"]
        assert 1 <= int(response.headers["retry-after"]) <= WINDOW_S
    # one client's failures lock out no other client
    assert from_client(gateway, neighbour, API_KEY).status_code == 200
    assert from_client(gateway, neighbour, "typo").status_code == 401
    time.sleep(int(from_client(gateway, attacker, API_KEY).headers["retry-after"]) + 0.1)
    assert from_client(gateway, attacker, API_KEY).status_code == 200


def test_valid_keys_and_missing_keys_are_never_counted(gateway: RunningServer) -> None:
    client = "192.0.2.44"
    for _ in range(4 * MAX_FAILURES):
        assert from_client(gateway, client, API_KEY).status_code == 200
        assert from_client(gateway, client, None).status_code == 401  # no key yet: a page asking for one
    for _ in range(MAX_FAILURES):
        assert from_client(gateway, client, "wrong").status_code == 401
    assert from_client(gateway, client, "wrong").status_code == 429
    assert httpx.get(gateway.url + "/api/health", headers={"X-Forwarded-For": client}).status_code == 200


def test_throttle_forgets_old_failures_and_idle_clients() -> None:
    throttle = FailedKeyThrottle(max_failures=2, window_s=0.3, max_clients=2)
    assert throttle.record_failure("a") is False and throttle.retry_after("a") == 0.0
    assert throttle.record_failure("a") is True
    assert 0.0 < throttle.retry_after("a") <= 0.3
    time.sleep(0.35)
    assert throttle.retry_after("a") == 0.0
    for client in ("a", "a", "b", "c"):  # "a", locked out, is the longest idle when "c" arrives: forgotten
        throttle.record_failure(client)
    assert throttle.retry_after("a") == 0.0 and throttle.retry_after("b") == 0.0
    off = FailedKeyThrottle(max_failures=0, window_s=60.0)
    assert not any(off.record_failure("x") for _ in range(100)) and off.retry_after("x") == 0.0


@pytest.mark.parametrize("host, expected", [
    ("203.0.113.7", "203.0.113.7"),
    ("::ffff:203.0.113.7", "203.0.113.7"),  # an IPv4 client on a dual-stack socket
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),  # the same /64: the same client
    ("testclient", "testclient"),
])
def test_clients_are_told_apart_by_address(host: str, expected: str) -> None:
    assert client_id(Request({"type": "http", "client": (host, 50000), "headers": []})) == expected


@pytest.mark.parametrize("field, value", [("api_key_max_failures", -1), ("api_key_failure_window_s", 0)])
def test_settings_refuse_bad_throttle_values(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=field):
        GatewaySettings(**{field: value})


def test_throttle_defaults_are_documented() -> None:
    operations = (Path(__file__).resolve().parents[2] / "docs" / "OPERATIONS.md").read_text()
    defaults = {name: field.default for name, field in GatewaySettings.model_fields.items()}
    assert f"GATEWAY_API_KEY_MAX_FAILURES` (default {defaults['api_key_max_failures']})" in operations
    assert f"GATEWAY_API_KEY_FAILURE_WINDOW_S` (default {defaults['api_key_failure_window_s']:g})" in operations
