"""What TensorFlow's oneDNN kernels are worth on this CPU: the same work with them off and on.

TensorFlow turns oneDNN on by itself only on CPUs with AVX-512 VNNI/BF16 or AMX; ``import brainscan``
turns it on everywhere else too (``TF_ENABLE_ONEDNN_OPTS=1`` unless the environment says otherwise).
This runs each measurement in a fresh process with ``TF_ENABLE_ONEDNN_OPTS=0`` and then ``=1``:

- the small U-Net of the shipped segmenters (random weights, seeded), forward on a batch of two
  48^3 windows, as the worker's sliding window runs it;
- one training step of that U-Net (batch 2 of 48^3, the shipped recipe's patches), as
  ``bench/train_step.py``;
- ResNet50 (the classifier's network) forward, and one training step, on a batch of 32 slices of 128 px;

and prints the medians, the speed-up, and the largest difference between the U-Net's probabilities with
and without oneDNN (float32 round-off only). Not a test: it prints figures. Pin it to compare machines,
e.g. ``taskset -c 0`` with ``OMP_NUM_THREADS=TF_NUM_INTRAOP_THREADS=TF_NUM_INTEROP_THREADS=1``.

Usage:
  .venv/bin/python bench/onednn.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _measure(repeats: int, out: Path) -> dict[str, float | bool]:
    """In this process (TF_ENABLE_ONEDNN_OPTS already set by the parent): seconds per call of each item."""
    sys.path.insert(0, str(REPO))
    import keras
    import numpy as np
    import tensorflow as tf
    from tensorflow.python.util import _pywrap_util_port

    from brainscan.models.registry import build_model
    from training.losses import RegionDiceBCELoss

    def timed(call) -> float:
        call()  # warm-up (tracing)
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            call()
            seconds.append(time.perf_counter() - started)
        return _median(seconds)

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    unet = build_model("unet3d", {"num_classes": 3, "output": "sigmoid", "preset": "small"})
    windows = rng.normal(size=(2, 48, 48, 48, 4)).astype("float32")
    forward = keras.ops.convert_to_tensor(windows)
    unet_fn = tf.function(lambda x: unet(x, training=False))
    figures: dict[str, float | bool] = {"onednn": bool(_pywrap_util_port.IsMklEnabled())}
    figures["unet_forward"] = timed(lambda: unet_fn(forward).numpy())
    np.save(out, unet_fn(forward).numpy())

    unet.compile(optimizer=keras.optimizers.AdamW(1e-3), loss=RegionDiceBCELoss(), jit_compile=False)
    targets = (rng.random((2, 48, 48, 48, 3)) > 0.5).astype("float32")
    figures["unet_train_step"] = timed(lambda: unet.train_on_batch(windows, targets))

    resnet = build_model("resnet50", {"num_classes": 4, "input_size": 128, "channels": 3})
    slices = keras.ops.convert_to_tensor(rng.normal(size=(32, 128, 128, 3)).astype("float32"))
    resnet_fn = tf.function(lambda x: resnet(x, training=False))
    figures["resnet50_forward"] = timed(lambda: resnet_fn(slices).numpy())
    resnet.compile(optimizer=keras.optimizers.AdamW(1e-3), loss="categorical_crossentropy", jit_compile=False)
    labels = np.eye(4, dtype="float32")[rng.integers(0, 4, 32)]
    figures["resnet50_train_step"] = timed(lambda: resnet.train_on_batch(slices, labels))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(_measure(args.repeats, args.child)))
        return

    import numpy as np

    results = {}
    with tempfile.TemporaryDirectory(prefix="brainscan-onednn-") as folder:
        for setting in ("0", "1"):
            out = Path(folder) / f"unet-{setting}.npy"
            env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": setting, "TF_CPP_MIN_LOG_LEVEL": "2"}
            done = subprocess.run(
                [sys.executable, __file__, "--repeats", str(args.repeats), "--child", str(out)],
                env=env, capture_output=True, text=True, check=False,
            )
            if done.returncode:
                sys.exit(f"the TF_ENABLE_ONEDNN_OPTS={setting} run failed:\n{done.stderr[-3000:]}")
            results[setting] = json.loads(done.stdout.strip().splitlines()[-1])
            results[setting]["probabilities"] = np.load(out)
    off, on = results["0"], results["1"]
    print(f"oneDNN as TensorFlow reports it: off run {off['onednn']}, on run {on['onednn']}")
    rows = (
        ("unet_forward", "small U-Net forward, 2 x 48^3 windows"),
        ("unet_train_step", "small U-Net train step, 2 x 48^3"),
        ("resnet50_forward", "ResNet50 forward, 32 x 128 px"),
        ("resnet50_train_step", "ResNet50 train step, 32 x 128 px"),
    )
    for key, label in rows:
        print(f"{label:40s} oneDNN off {off[key]:7.3f} s | on {on[key]:7.3f} s | {off[key] / on[key]:5.2f}x")
    difference = float(np.max(np.abs(off["probabilities"] - on["probabilities"])))
    print(f"U-Net probabilities, oneDNN off against on: max |difference| {difference:.2e}")


if __name__ == "__main__":
    main()
