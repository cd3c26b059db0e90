"""Seconds per training step of a 3D U-Net on this machine: pick the CPU recipe from figures.

Builds the registered ``unet3d`` with region outputs (the shipped models' head), compiles it with
the training loss, and times ``train_on_batch`` on random data; the first step includes tracing.
Not a test: it prints figures.

Usage:
  .venv/bin/python bench/train_step.py [--policy float32|mixed_bfloat16] [--preset full|small]
                                       [--patch 64] [--batch 2] [--steps 4]
On CPUs without AVX-512, oneDNN has no bfloat16 kernels and TensorFlow falls back to far slower
ones: compare both policies before choosing (``lscpu | grep avx512``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", default="float32", choices=("float32", "mixed_bfloat16"))
    parser.add_argument("--preset", default="full", choices=("full", "small", "tiny"))
    parser.add_argument("--patch", type=int, default=64, help="cube side in voxels, a multiple of 8")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()

    import brainscan  # noqa: F401, I001  (first: it sets TensorFlow's oneDNN default before keras loads TensorFlow)
    import keras
    import numpy as np

    keras.mixed_precision.set_global_policy(args.policy)
    from brainscan.models.registry import build_model
    from training.losses import RegionDiceBCELoss

    model = build_model("unet3d", {"num_classes": 3, "output": "sigmoid", "preset": args.preset})
    model.compile(optimizer=keras.optimizers.AdamW(1e-3), loss=RegionDiceBCELoss(), jit_compile=False)
    rng = np.random.default_rng(0)
    shape = (args.batch, args.patch, args.patch, args.patch)
    x = rng.normal(size=(*shape, 4)).astype("float32")
    y = (rng.random((*shape, 3)) > 0.5).astype("float32")
    seconds = []
    for _ in range(args.steps):
        started = time.perf_counter()
        model.train_on_batch(x, y)
        seconds.append(time.perf_counter() - started)
    steady = sorted(seconds[1:])[len(seconds[1:]) // 2] if len(seconds) > 1 else seconds[0]
    print(f"unet3d {args.preset} ({model.count_params():,} parameters), {args.policy}, batch {args.batch} of "
          f"{args.patch}^3: first step {seconds[0]:.2f} s (tracing), then median {steady:.2f} s a step")


if __name__ == "__main__":
    main()
