"""Classification throughput and latency, measured in one run so that every figure is a ratio.

Prints:
  1. in-process batched inference (the bundle's model through a compiled function, batch 16): images/s;
  2. through the gateway in front of the real classifier service at concurrency 1, 8 and 16:
     images/s and p50/p95/p99 latency (heatmaps off, so that the inference path is compared);
  3. the same through the gateway in front of the naive pattern (``model.predict`` per request,
     bench/naive_classifier.py);
  4. one line with heatmaps on at concurrency 1, for the cost of Grad-CAM.

Usage:
  .venv/bin/python bench/classify.py [--models models] [--arch resnet50] [--requests 96]
                                     [--images ../shared/data/brain-tumor-mri/Training]
Without real images it uses phantom slices. Not a test: it asserts nothing, it prints figures.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Iterator

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(module: str, env: dict[str, str], port: int, ready_path: str) -> Iterator[str]:
    url = f"http://127.0.0.1:{port}"
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", module, "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        # A pipe nobody reads would fill up with the per-request JSON logs and stall the server.
        cwd=REPO, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=log,
    )
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"{module} exited: {log.read().decode(errors='replace')[-2000:]}")
            try:
                if httpx.get(url + ready_path, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise RuntimeError(f"{module} did not become ready")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def load_images(folder: Path | None, count: int) -> list[bytes]:
    if folder and folder.is_dir():
        files = sorted(folder.rglob("*.jpg"))[:: max(1, len(list(folder.rglob("*.jpg"))) // count)][:count]
        return [f.read_bytes() for f in files]
    from brainscan.data.phantoms import make_kaggle_phantom
    from brainscan.data.phantoms.kaggle import encode_jpeg
    from brainscan.labels import KAGGLE_CLASSES

    return [encode_jpeg(make_kaggle_phantom(KAGGLE_CLASSES[i % 4], seed=i)) for i in range(count)]


def in_process(models: Path, arch: str, images: list[bytes], batch: int = 16) -> float:
    import tensorflow as tf

    from brainscan.models.bundle import load_bundle
    from brainscan.models.store import ModelStore

    bundle = load_bundle(ModelStore(models).current("classification", arch))
    x = np.stack([bundle.preprocess(raw) for raw in images]).astype(np.float32)
    forward = tf.function(lambda t: bundle.model(t, training=False), reduce_retracing=True)
    forward(x[:batch])  # trace
    start = time.perf_counter()
    done = 0
    for _ in range(2):
        for i in range(0, len(x) - batch + 1, batch):
            forward(x[i:i + batch]).numpy()
            done += batch
    return done / (time.perf_counter() - start)


def load_test(url: str, images: list[bytes], concurrency: int, requests: int, explain: bool) -> dict[str, float]:
    def one(i: int) -> float:
        t0 = time.perf_counter()
        r = client.post(f"{url}/api/v1/classifications", params={"explain": str(explain).lower()},
                        files={"file": (f"{i}.jpg", images[i % len(images)], "image/jpeg")})
        r.raise_for_status()
        return (time.perf_counter() - t0) * 1000

    with httpx.Client(timeout=120, limits=httpx.Limits(max_connections=concurrency)) as client:
        for i in range(min(concurrency, 4)):
            one(i)  # warm up connections and traces
        start = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            latencies = sorted(pool.map(one, range(requests)))
        wall = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=100)
    return {"img_s": requests / wall, "p50": q[49], "p95": q[94], "p99": q[98]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=REPO / "models")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--images", type=Path, default=REPO.parent / "shared/data/brain-tumor-mri/Training")
    args = parser.parse_args()
    images = load_images(args.images, 64)
    print(f"model: {args.arch} from {args.models}; {len(images)} distinct images; {os.cpu_count()} CPU cores")
    print(f"in-process batched (batch 16, compiled): {in_process(args.models, args.arch, images):.1f} img/s")

    common = {"BRAINSCAN_MODELS": str(args.models), "CLASSIFIER_EXPECTED_MODELS": args.arch,
              "CLASSIFIER_DEFAULT_MODEL": args.arch, "BENCH_ARCH": args.arch,
              "BRAINSCAN_INTERNAL_TOKEN": secrets.token_urlsafe(32)}  # the gateway's and the classifier's
    rows = []
    for name, module in (("service", "services.classifier.app:app"), ("naive", "bench.naive_classifier:app")):
        with serve(module, common, free_port(), "/readyz") as upstream:
            gw_env = {**common, "GATEWAY_CLASSIFIER_URL": upstream, "GATEWAY_SEGMENTER_URL": ""}
            with serve("gateway.app:app", gw_env, free_port(), "/api/health") as gateway:
                for concurrency in (1, 8, 16):
                    r = load_test(gateway, images, concurrency, args.requests, explain=False)
                    rows.append((name, concurrency, r))
                    print(f"{name:<8} via gateway, concurrency {concurrency:>2}: {r['img_s']:6.1f} img/s   "
                          f"p50 {r['p50']:7.1f} ms  p95 {r['p95']:7.1f} ms  p99 {r['p99']:7.1f} ms", flush=True)
                if name == "service":
                    r = load_test(gateway, images, 1, max(16, args.requests // 4), explain=True)
                    print(f"service  via gateway, concurrency  1, with heatmap: {r['img_s']:6.1f} img/s   "
                          f"p50 {r['p50']:7.1f} ms  p95 {r['p95']:7.1f} ms", flush=True)
    by = {(n, c): r for n, c, r in rows}
    for c in (1, 8, 16):
        print(f"ratio service/naive at concurrency {c:>2}: {by[('service', c)]['img_s'] / by[('naive', c)]['img_s']:.2f}x")


if __name__ == "__main__":
    main()
