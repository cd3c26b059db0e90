"""Bounded image work (issue #15, item 3), attacked through the real stack: the classifier service
and the gateway as uvicorn subprocesses, the classifier serving tiny real bundles.

The attack: a PNG of about 75 KB that declares 7000x7000 pixels (under the 50 Mpx cap). It took
33 s to answer, four at once all got the gateway's 504 at 60 s, and the classifier kept computing
for minutes after the gateway had given up. Shown here to fail safely:

- a burst of them through the gateway is answered within seconds, and the service still answers
  a small slice at once;
- a heavier variant past the decoding budget (16-bit RGBA, 4400x4400) is refused with a 413 that
  says why, at once;
- when the callers go away (they hang up on the classifier or on the gateway, or the gateway's own
  timeout fires), the classifier drops the queued work: the requests end as 499, most image tasks
  are removed unstarted, and the classifier is idle (no image task queued or running, almost no
  CPU) within seconds.

The time bounds are generous (this machine shares two cores with other work); the figures they
guard are in bench/large_image.py (about 0.7 s for one such PNG through the classifier's path).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.bundles import make_classifier_store
from tests.servers import INTERNAL_HEADERS, RunningServer, serve_uvicorn

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Path("/proc/self/stat").exists(),
                                                   reason="reads the classifier's CPU time from /proc")]

SIDE = 7000
BURST = 4
#: the old behaviour was 33 s for one and 504 at 60 s for four; measured now: about 1-3 s for four
BURST_BOUND_S = 30.0
#: a deep queue: at ~0.5 s an image and two image threads, about 8 s of work if nobody drops it
ABANDONED = 32
PATIENCE_S = 0.5
IDLE_BOUND_S = 10.0
CPU_WINDOW_S = 2.0


def disc_png(height: int, width: int, *, rgba16: bool = False) -> bytes:
    """A dark image with one bright disc: a few dozen KB that decode to ``height x width`` pixels."""
    grey = np.zeros((height, width), np.uint8)
    cv2.circle(grey, (width // 2, height // 2), min(height, width) * 5 // 14, 180, -1)
    pixels = grey
    if rgba16:
        wide = grey.astype(np.uint16) * 257
        pixels = np.dstack([wide, wide, wide, np.full_like(wide, 65535)])
    ok, data = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    assert ok
    return data.tobytes()


@pytest.fixture(scope="module")
def huge_png() -> bytes:
    raw = disc_png(SIDE, SIDE)
    assert len(raw) < 100_000  # the attack: a small upload, a huge image
    return raw


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> RunningServer:
    store = make_classifier_store(tmp_path_factory.mktemp("models"))
    env = {"BRAINSCAN_MODELS": str(store), "CLASSIFIER_LOG_LEVEL": "WARNING", "CLASSIFIER_IMAGE_WORKERS": "2"}
    with serve_uvicorn("services.classifier.app:app", env=env, ready_path="/readyz",
                       log_dir=tmp_path_factory.mktemp("classifier-logs")) as server:
        yield server


def start_gateway(classifier: RunningServer, log_dir: Path, timeout_s: float):
    env = {"GATEWAY_CLASSIFIER_URL": classifier.url, "GATEWAY_SEGMENTER_URL": "",
           "GATEWAY_TIMEOUT_S": str(timeout_s), "GATEWAY_LOG_LEVEL": "WARNING"}
    return serve_uvicorn("gateway.app:app", env=env, ready_path="/api/health", log_dir=log_dir)


@pytest.fixture(scope="module")
def gateway(classifier: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> RunningServer:
    with start_gateway(classifier, tmp_path_factory.mktemp("gateway-logs"), timeout_s=60.0) as server:
        yield server


@pytest.fixture(scope="module")
def impatient_gateway(classifier: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> RunningServer:
    """A gateway whose upstream timeout fires before a heavy image can be answered."""
    with start_gateway(classifier, tmp_path_factory.mktemp("impatient-logs"), timeout_s=PATIENCE_S) as server:
        yield server


# -- observing the classifier ---------------------------------------------------------------------


def metric(server: RunningServer, name: str, **labels: str) -> float:
    """The sum of the classifier's samples called ``name`` whose labels include ``labels``."""
    text = httpx.get(f"{server.url}/metrics", headers=INTERNAL_HEADERS, timeout=10, trust_env=False).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and labels.items() <= sample.labels.items())


def image_tasks(server: RunningServer) -> float:
    """Image tasks queued for or holding one of the classifier's image threads."""
    return metric(server, "classifier_image_tasks")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_until_idle(server: RunningServer, timeout_s: float) -> float:
    """Seconds until no image task is queued or running; fails after ``timeout_s``."""
    started = time.monotonic()
    while (waited := time.monotonic() - started) < timeout_s:
        if image_tasks(server) == 0:
            return waited
        time.sleep(0.1)
    pytest.fail(f"the classifier still had {image_tasks(server):g} image tasks {timeout_s:g} s after the "
                f"callers left\n{server.log_tail()}")


def post_images(url: str, raw: bytes, count: int, timeout_s: float) -> list[tuple[int | str, float]]:
    """``count`` concurrent uploads of ``raw``; each gives (status or exception name, seconds).

    They carry the internal token, needed when ``url`` is the classifier's (the gateway ignores it).
    """

    def one(index: int) -> tuple[int | str, float]:
        started = time.monotonic()
        try:
            response = httpx.post(url, files={"file": (f"huge-{index}.png", raw, "image/png")},
                                  headers=INTERNAL_HEADERS, timeout=timeout_s, trust_env=False)
            return response.status_code, time.monotonic() - started
        except httpx.TimeoutException as exc:
            return type(exc).__name__, time.monotonic() - started

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def small_slice_answers(server: RunningServer, path: str) -> float:
    """Classify a 96x96 slice; returns the seconds it took (fails unless 200)."""
    grey = np.zeros((96, 96), np.uint8)
    cv2.ellipse(grey, (48, 48), (32, 40), 0, 0, 360, 170, -1)
    started = time.monotonic()
    response = httpx.post(f"{server.url}{path}", files={"file": ("slice.png", cv2.imencode(".png", grey)[1].tobytes(),
                                                                 "image/png")}, headers=INTERNAL_HEADERS, timeout=60,
                          trust_env=False)
    assert response.status_code == 200, response.text
    return time.monotonic() - started


# -- the attack -----------------------------------------------------------------------------------


def test_a_burst_of_huge_pngs_is_answered_within_seconds(gateway: RunningServer, classifier: RunningServer,
                                                         huge_png: bytes) -> None:
    results = post_images(f"{gateway.url}/api/v1/classifications", huge_png, BURST, timeout_s=120)
    print(f"burst of {BURST} {SIDE}x{SIDE} PNGs through the gateway: answered in "
          + ", ".join(f"{seconds:.1f}" for _, seconds in results) + " s")
    assert [status for status, _ in results] == [200] * BURST, results
    assert max(seconds for _, seconds in results) < BURST_BOUND_S, results
    body = httpx.post(f"{gateway.url}/api/v1/classifications", files={"file": ("huge.png", huge_png, "image/png")},
                      params={"explain": "false"}, timeout=120, trust_env=False).json()
    assert (body["image"]["width"], body["image"]["height"]) == (SIDE, SIDE)
    assert small_slice_answers(gateway, "/api/v1/classifications") < 10.0
    wait_until_idle(classifier, IDLE_BOUND_S)


def test_past_the_decoding_budget_is_refused_at_once(gateway: RunningServer) -> None:
    raw = disc_png(4400, 4400, rgba16=True)  # 4400 x 4400 x 8 bytes = 155 MB once decoded
    started = time.monotonic()
    response = httpx.post(f"{gateway.url}/api/v1/classifications", files={"file": ("rgba16.png", raw, "image/png")},
                          timeout=60, trust_env=False)
    assert time.monotonic() - started < 5.0
    assert response.status_code == 413, response.text
    body = response.json()
    assert body["error"] == "too_large"
    assert "4400x4400 PNG with 8 bytes per pixel" in body["detail"]
    assert "decoding limit" in body["detail"] and "8-bit greyscale" in body["detail"]


@pytest.mark.parametrize("how", ["callers hang up on the classifier", "callers hang up on the gateway",
                                 "the gateway times out"])
def test_the_classifier_drops_work_whose_callers_left(how: str, classifier: RunningServer, gateway: RunningServer,
                                                      impatient_gateway: RunningServer, huge_png: bytes) -> None:
    wait_until_idle(classifier, IDLE_BOUND_S)
    dropped_before = metric(classifier, "classifier_image_tasks_dropped_total")
    gone_before = metric(classifier, "classifier_requests_total", status="499")
    gateway_gone_before = metric(gateway, "gateway_requests_total", status="499")
    if how == "callers hang up on the classifier":
        url, patience, expected = f"{classifier.url}/v1/classify", PATIENCE_S, "ReadTimeout"
    elif how == "callers hang up on the gateway":
        url, patience, expected = f"{gateway.url}/api/v1/classifications", PATIENCE_S, "ReadTimeout"
    else:
        url, patience, expected = f"{impatient_gateway.url}/api/v1/classifications", 60.0, 504

    results = post_images(url, huge_png, ABANDONED, timeout_s=patience)
    assert sum(status == expected for status, _ in results) >= ABANDONED - 4, results

    idle_after = wait_until_idle(classifier, IDLE_BOUND_S)
    cpu_start = cpu_seconds(classifier.process.pid)
    time.sleep(CPU_WINDOW_S)
    cpu_spent = cpu_seconds(classifier.process.pid) - cpu_start
    dropped = metric(classifier, "classifier_image_tasks_dropped_total") - dropped_before
    gone = metric(classifier, "classifier_requests_total", status="499") - gone_before
    gateway_gone = metric(gateway, "gateway_requests_total", status="499") - gateway_gone_before
    report = (f"{how}: idle {idle_after:.1f} s after the callers left, {dropped:g} tasks dropped, {gone:g} x 499 "
              f"({gateway_gone:g} at the gateway), then {cpu_spent:.2f} s CPU in {CPU_WINDOW_S:g} s")
    print(report)
    assert cpu_spent < 0.25 * CPU_WINDOW_S, report
    if how == "callers hang up on the gateway":
        # A caller may leave while the gateway still reads its upload (a loaded machine reads slowly):
        # the classifier then never hears of it, and the gateway alone answers its 499. Of those the
        # classifier did hear of, it drops the work of most.
        assert gateway_gone >= ABANDONED - 4 and gone <= gateway_gone, report
        assert dropped >= gone // 2, report
    else:
        assert dropped >= ABANDONED // 2, report
        assert gone >= ABANDONED - 4, report
    assert small_slice_answers(classifier, "/v1/classify") < 10.0
    assert httpx.get(f"{classifier.url}/healthz", timeout=5, trust_env=False).status_code == 200
