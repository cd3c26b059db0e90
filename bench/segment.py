"""3D segmentation timings on one full-size case, measured in one run so that every figure is a ratio.

Prints, for the CURRENT bundle of ``segmentation/<arch>`` in the model store:
  1. end to end through the segmenter API (uvicorn) + a real redis-server + a prefork Celery worker:
     seconds from POST /v1/jobs to the poll that sees ``succeeded``;
  2. the same through the gateway (``/api/v1/segmentations``) when the gateway serves it;
  3. the job's own timings from job.json: reading inputs, inference (segment_case), writing results,
     time in the queue; and the overhead = end to end - inference;
  4. in-process sliding-window seconds: ``segment_case`` with a compiled ``predict_fn`` (warm);
  5. the naive pattern: the same sliding window calling ``model.predict`` on each patch;
  6. peak RSS (VmHWM) of the worker's pool process, which loads the model and segments the case;
  7. float32 against bfloat16 arithmetic (``--precision`` sets the worker's): seconds of each, and
     the Dice of each against the case's segmentation when it has one;
  8. the MONAI peer: the same network ported to PyTorch (bench/monai_peer.py, weights copied and
     checked against Keras) through MONAI's ``sliding_window_inference`` (Gaussian blending) with
     the bundle's window, overlap and mirroring passes, at the bundle's resolution, on the whole
     volume (MONAI's usual use) and on brainscan's brain crop; then one line ``MONAI ... N.Nx``: MONAI's whole-volume
     seconds over brainscan's end-to-end seconds through the gateway. Needs the virtualenv
     ``--monai-venv`` (default <repo>/.venv-monai); without it the row says so and is skipped.

Usage:
  .venv/bin/python bench/segment.py [--models models] [--arch unet3d] [--repeats 2] [--precision auto]
                                    [--case ../shared/data/brats-sample/BraTS2021_00006]
Without --case it writes a 240 x 240 x 155 phantom case (the BraTS grid). Not a test: it asserts
nothing, it prints figures. Needs redis-server (scripts/install-system-deps.sh).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from brainscan.labels import MODALITIES  # noqa: E402
from brainscan.models.precision import PRECISIONS, cpu_has_bf16, resolve_precision  # noqa: E402
from tests.redis_server import start_redis  # noqa: E402
from tests.servers import INTERNAL_HEADERS, start_uvicorn  # noqa: E402

#: a direct call to the segmenter API: the internal token start_uvicorn gave it, and an owner
OWNER = {"X-Brainscan-Owner": "bench", **INTERNAL_HEADERS}


def current_bundle(models: Path, arch: str) -> tuple[Path, dict[str, Any]]:
    from brainscan.models.bundle import read_manifest
    from brainscan.models.store import ModelStore

    path = ModelStore(models).current("segmentation", arch)
    return path, read_manifest(path)


def case_files(case: Path) -> dict[str, tuple[str, bytes]]:
    files = {}
    for modality in MODALITIES:
        found = sorted(case.glob(f"*_{modality}.nii*"))
        if len(found) != 1:
            raise SystemExit(f"{case} needs exactly one *_{modality}.nii[.gz] file, found {found}")
        files[modality] = (found[0].name, found[0].read_bytes())
    return files


def vm_hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def run_job(client: httpx.Client, base: str, files: dict[str, tuple[str, bytes]], arch: str,
            headers: dict[str, str]) -> tuple[float, dict[str, Any]]:
    """Submit, poll every 50 ms until final; (seconds end to end, final body with ``submit_s`` added:
    the seconds until the upload was accepted, 202)."""
    started = time.perf_counter()
    response = client.post(f"{base}", files=files, params={"model": arch}, headers=headers)
    submitted = time.perf_counter() - started
    if response.status_code != 202:
        raise SystemExit(f"submission failed: {response.status_code} {response.text[:500]}")
    url = response.headers["location"]
    origin = str(response.url).split("/", 3)[:3]
    while True:
        body = client.get("/".join(origin) + url, headers=headers).json()
        if body["status"] in ("succeeded", "failed", "cancelled"):
            seconds = time.perf_counter() - started
            if body["status"] != "succeeded":
                raise SystemExit(f"job ended {body['status']}: {body.get('error')}")
            return seconds, {**body, "submit_s": submitted}
        time.sleep(0.05)


def in_process(bundle_path: Path, case: Path, repeats: int, precision: str) -> dict[str, float]:
    """Warm in-process figures: segment_case with the compiled predict_fn, and with model.predict per patch."""
    import numpy as np

    from brainscan.data.brats import find_case, load_case
    from brainscan.inference.segmenter import inference_settings, segment_case
    from brainscan.inference.sliding_window import count_patches, keras_predict_fn
    from brainscan.models.bundle import load_bundle

    bundle = load_bundle(bundle_path, precision=precision)
    loaded = load_case(find_case(case), with_seg=False)
    settings = inference_settings(bundle)
    compiled = keras_predict_fn(bundle.model, batch_size=settings["batch_size"])
    channels = int(bundle.manifest["input"]["channels"])
    warm = np.zeros((1, *settings["patch_size"], channels), np.float32)
    compiled(warm)
    bundle.model.predict(warm, verbose=0)
    volume, _ = bundle.preprocess(loaded.channels, affine=loaded.reference.affine)
    patches = count_patches(volume.shape[:3], volume.shape[:3] if settings["one_pass"] else settings["patch_size"],
                            settings["overlap"], mirror_axes=settings["mirror_axes"])

    def naive(batch: np.ndarray) -> np.ndarray:
        return bundle.model.predict(batch, verbose=0)

    timings: dict[str, list[float]] = {"compiled": [], "naive": []}
    masks = {}
    for _ in range(repeats):
        for name, predict_fn in (("compiled", compiled), ("naive", naive)):
            started = time.perf_counter()
            masks[name] = segment_case(bundle, loaded, predict_fn=predict_fn)
            timings[name].append(time.perf_counter() - started)
    agree = float(np.mean(masks["compiled"] == masks["naive"]))
    return {"compiled_s": statistics.median(timings["compiled"]), "naive_s": statistics.median(timings["naive"]),
            "patches": patches, "agree": agree}


def monai_peer(bundle_path: Path, case: Path, venv: Path, work: Path, repeats: int,
               precision: str = "float32") -> dict[str, Any] | None:
    """The MONAI row: export the bundle's weights and volumes, run bench/monai_peer.py in ``venv``.

    The port is checked against the bundle in float32 (the PyTorch network computes in float32);
    brainscan's own windows on the same volumes run at ``precision``, as the worker serves them.
    PyTorch gets as many threads as this process may use (``taskset`` included), as TensorFlow does.
    """
    import json
    import time as _time

    import numpy as np

    from brainscan.data.brats import find_case, load_case
    from brainscan.inference.segmenter import Segmenter
    from brainscan.models.bundle import load_bundle
    from brainscan.preprocess.volume3d import preprocess_case

    python = venv / "bin" / "python"
    if not python.is_file():
        print(f"MONAI: skipped, no virtualenv at {venv} (python3.11 -m venv {venv} && "
              f"{venv}/bin/pip install torch==2.13.0 monai)")
        return None
    bundle = load_bundle(bundle_path, precision="float32")
    if bundle.architecture != "unet3d":
        print(f"MONAI: skipped, only the plain unet3d is ported to PyTorch (this bundle is {bundle.architecture})")
        return None
    loaded = load_case(find_case(case), with_seg=False)
    segmenter = Segmenter.from_bundle(bundle)
    affine = loaded.reference.affine
    crop, _ = segmenter.preprocess(loaded.channels, affine=affine)
    uncropped_config = type(bundle.preprocess_config)(**{**bundle.preprocess_config.to_dict(), "crop_to_brain": False})
    whole, _ = preprocess_case(loaded.channels, uncropped_config, affine=affine)
    weights = {f"{layer.name}/{i}": np.asarray(w.numpy(), dtype=np.float32)
               for layer in bundle.model.layers for i, w in enumerate(layer.weights)}
    patch = segmenter.patch_size
    check_input = np.random.default_rng(0).normal(size=(1, *patch, crop.shape[-1])).astype(np.float32)
    check_output = np.asarray(bundle.model(check_input, training=False))
    np.savez(work / "monai-weights.npz", **weights)
    np.savez(work / "monai-volumes.npz", whole=whole, crop=crop, check_input=check_input, check_output=check_output)
    args = bundle.manifest["architecture"]["args"]
    from brainscan.models.unet3d import PRESETS

    preset = PRESETS[args.get("preset", "full")]
    spec = {"weights": str(work / "monai-weights.npz"), "volumes": str(work / "monai-volumes.npz"),
            "in_channels": crop.shape[-1], "num_classes": segmenter.num_outputs,
            "base_filters": args.get("base_filters") or preset["base_filters"], "levels": args.get("levels") or
            preset["levels"], "output": args.get("output", "softmax"), "patch_size": list(patch),
            "overlap": segmenter.overlap, "sw_batch_size": segmenter.batch_size, "repeats": repeats,
            "mirror_axes": list(segmenter.mirror_axes),  # the same mirroring passes as brainscan's run
            "run": ["whole", "crop"], "threads": len(os.sched_getaffinity(0))}
    done = subprocess.run([str(python), str(REPO / "bench" / "monai_peer.py"), json.dumps(spec)], capture_output=True,
                          text=True, timeout=1800)
    if done.returncode:
        print(f"MONAI: failed ({done.stderr[-2000:]})")
        return None
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # brainscan's own sliding window on the same two volumes, for the like-for-like ratio
    if precision != "float32":
        segmenter = Segmenter.from_bundle(load_bundle(bundle_path, precision=precision))
    ours = {}
    for name, volume in (("whole", whole), ("crop", crop)):
        segmenter.probabilities(volume)  # warm
        seconds = []
        for _ in range(repeats):
            started = _time.perf_counter()
            segmenter.probabilities(volume)
            seconds.append(_time.perf_counter() - started)
        ours[name] = statistics.median(seconds)
    result["brainscan"] = ours
    return result


def precisions(bundle_path: Path, case: Path, repeats: int) -> dict[str, dict[str, Any]]:
    """Warm seconds of ``segment_case`` in float32 and in bfloat16, and each mask's Dice against the case's
    segmentation when it has one (else against the float32 mask)."""
    import numpy as np

    from brainscan.data.brats import find_case, load_case
    from brainscan.inference.segmenter import segment_case
    from brainscan.metrics.segmentation import segmentation_metrics
    from brainscan.models.bundle import load_bundle

    found = find_case(case)
    loaded = load_case(found, with_seg=found.seg is not None)
    spacing = tuple(loaded.reference.spacing[:3])
    rows: dict[str, dict[str, Any]] = {}
    for precision in ("float32", "bfloat16"):
        bundle = load_bundle(bundle_path, precision=precision)
        mask = segment_case(bundle, loaded)  # warm: traces the graph
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            mask = segment_case(bundle, loaded)
            seconds.append(time.perf_counter() - started)
        truth = loaded.seg if loaded.seg is not None else rows["float32"]["mask"] if rows else mask
        metrics = segmentation_metrics(mask, truth, spacing)
        rows[precision] = {"seconds": statistics.median(seconds), "mask": mask,
                           "dice": {r: metrics[r]["dice"] for r in ("WT", "TC", "ET")},
                           "against": "its segmentation" if loaded.seg is not None else "the float32 mask"}
        del bundle
    rows["bfloat16"]["agree"] = float(np.mean(rows["bfloat16"]["mask"] == rows["float32"]["mask"]))
    return rows


def gateway_serves_segmentations() -> bool:
    """Whether this tree's gateway has the segmentation routes (they came after the classifier's)."""
    import importlib.util

    return importlib.util.find_spec("gateway.segmentations") is not None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=REPO / "models", help="model store (default <repo>/models)")
    parser.add_argument("--arch", default="unet3d", help="segmentation architecture in the store")
    parser.add_argument("--case", type=Path, default=None, help="BraTS case folder (default: full-size phantom)")
    parser.add_argument("--repeats", type=int, default=2, help="jobs per path; medians are printed")
    parser.add_argument("--monai-venv", type=Path, default=REPO / ".venv-monai",
                        help="virtualenv with torch and monai for the MONAI row (default <repo>/.venv-monai)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="the worker's SEGMENTER_PRECISION (default auto: bfloat16 where the CPU has it)")
    args = parser.parse_args()
    precision = resolve_precision(args.precision)
    models = args.models.resolve()
    bundle_path, manifest = current_bundle(models, args.arch)
    work = Path(tempfile.mkdtemp(prefix="brainscan-bench-segment-"))
    if args.case is None:
        from brainscan.data.phantoms import write_brats_phantoms

        case = write_brats_phantoms(work / "cases", n=1, seed=0, full_size=True)[0]
    else:
        case = args.case.resolve()
    files = case_files(case)
    print(f"model: {args.arch} version {manifest['version']} (demo={manifest['demo']}) from {models}")
    print(f"inference settings: {manifest['inference']}; precision {precision} "
          f"(CPU has native bfloat16: {cpu_has_bf16()})")
    print(f"case: {case}; {len(os.sched_getaffinity(0))} of the {os.cpu_count()} CPU cores usable; {sum(len(d) for _, d in files.values()) / 1e6:.1f} MB upload")

    redis = start_redis(work / "redis")
    env = {"BRAINSCAN_MODELS": str(models), "SEGMENTER_BROKER_URL": redis.url, "SEGMENTER_JOBS_DIR": str(work / "jobs"),
           "SEGMENTER_DEFAULT_MODEL": args.arch, "SEGMENTER_PRECISION": precision, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": str(REPO)}
    worker_log = (work / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "services.segmenter.worker", "worker", "-Q", "segmentation", "-c", "1",
         "-P", "prefork", "--without-gossip", "--without-mingle", "--loglevel", "WARNING"],
        cwd=REPO, env={**os.environ, **env}, stdout=worker_log, stderr=subprocess.STDOUT)
    servers = []
    rows: dict[str, list[tuple[float, dict[str, Any]]]] = {}
    try:
        deadline = time.monotonic() + 300
        while "worker process ready" not in (work / "worker.log").read_text(errors="replace"):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("worker did not start:\n" + (work / "worker.log").read_text(errors="replace")[-3000:])
            time.sleep(0.2)
        api = start_uvicorn("services.segmenter.app:app", env=env, ready_path="/readyz", log_dir=work)
        servers.append(api)
        paths = {"segmenter API": (f"{api.url}/v1/jobs", OWNER)}
        if gateway_serves_segmentations():
            gateway = start_uvicorn("gateway.app:app", log_dir=work, ready_path="/api/health", env={
                **env, "GATEWAY_SEGMENTER_URL": api.url, "GATEWAY_CLASSIFIER_URL": "http://127.0.0.1:9"})
            servers.append(gateway)
            paths["gateway -> segmenter"] = (f"{gateway.url}/api/v1/segmentations", {})
        else:
            print("gateway: does not serve /api/v1/segmentations in this tree; skipped")
        with httpx.Client(timeout=600, trust_env=False) as client:
            for name, (url, headers) in paths.items():
                rows[name] = [run_job(client, url, files, args.arch, headers) for _ in range(args.repeats)]
        pool = children_of(worker.pid)
        worker_rss = vm_hwm_mb(pool[0]) if pool else None
        main_rss = vm_hwm_mb(worker.pid)
    finally:
        for server in servers:
            server.stop()
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
        worker_log.close()
        redis.stop()

    print("\n== through the services (median of %d jobs) ==" % args.repeats)
    for name, results in rows.items():
        end_to_end = statistics.median(seconds for seconds, _ in results)
        timing = {key: statistics.median(body["timings"][key] for _, body in results)
                  for key in ("queue_s", "preprocess_s", "inference_s", "write_s")}
        submit = statistics.median(body["submit_s"] for _, body in results)
        rest = end_to_end - submit - sum(timing[k] for k in ("queue_s", "preprocess_s", "inference_s", "write_s"))
        print(f"{name:<22} end to end {end_to_end:7.2f} s | upload until accepted (202) {submit:5.2f} s | in the job: "
              f"inference {timing['inference_s']:6.2f} s, reading inputs {timing['preprocess_s']:5.2f} s, writing "
              f"results {timing['write_s']:5.2f} s, queued {timing['queue_s']:5.2f} s | the rest (task pickup, "
              f"status updates, polling) {rest:5.2f} s | overhead (end to end - inference) "
              f"{end_to_end - timing['inference_s']:6.2f} s")
    print(f"worker pool process peak RSS (VmHWM): {worker_rss:.0f} MB" if worker_rss else
          "worker pool process peak RSS: not found")
    if main_rss:
        print(f"worker main process peak RSS (VmHWM): {main_rss:.0f} MB (no TensorFlow there)")

    print("\n== in this process (warm, median of %d) ==" % args.repeats)
    figures = in_process(bundle_path, case, args.repeats, precision)
    print(f"sliding window, compiled predict_fn (segment_case): {figures['compiled_s']:7.2f} s "
          f"for {figures['patches']} patches")
    print(f"naive model.predict per patch:                      {figures['naive_s']:7.2f} s "
          f"(masks agree on {100 * figures['agree']:.3f} % of voxels)")
    print(f"ratio naive / compiled: {figures['naive_s'] / figures['compiled_s']:.2f}x")

    print("\n== float32 against bfloat16 (segment_case, warm, median of %d) ==" % args.repeats)
    arithmetic = precisions(bundle_path, case, args.repeats)
    for name, row in arithmetic.items():
        dice = " ".join(f"{r} {d:.3f}" for r, d in row["dice"].items())
        agree = f", {100 * row['agree']:.3f} % of voxels as float32's" if "agree" in row else ""
        print(f"{name:<9} {row['seconds']:7.2f} s | Dice against {row['against']}: {dice}{agree}")
    print(f"bfloat16 / float32 speed-up: {arithmetic['float32']['seconds'] / arithmetic['bfloat16']['seconds']:.2f}x")

    print("\n== MONAI peer: the same network, window and mirroring settings in PyTorch (median of %d) =="
          % args.repeats)
    peer = monai_peer(bundle_path, case, args.monai_venv.resolve(), work, args.repeats, precision)
    if peer is not None:
        print(f"port check: PyTorch vs Keras on one window, max |difference| {peer['check_max_abs_diff']:.2e}")
        for name, label in (("whole", "whole volume (no crop)"), ("crop", "brain crop (as brainscan serves)")):
            print(f"{label:<34} {tuple(peer[name]['shape'])}: MONAI sliding_window_inference "
                  f"{statistics.median(peer[name]['seconds']):7.2f} s | brainscan sliding window "
                  f"{peer['brainscan'][name]:7.2f} s")
        gateway_rows = rows.get("gateway -> segmenter") or rows.get("segmenter API")
        end_to_end = statistics.median(seconds for seconds, _ in gateway_rows)
        monai_whole = statistics.median(peer["whole"]["seconds"])
        print(f"MONAI whole-volume {monai_whole:.2f} s / brainscan end to end {end_to_end:.2f} s: "
              f"{monai_whole / end_to_end:.1f}x")


if __name__ == "__main__":
    main()
