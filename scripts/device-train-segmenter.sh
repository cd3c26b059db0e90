#!/usr/bin/env bash
# Train a segmenter on a lent GPU machine, from a pack, under Keras' JAX backend (the machine has
# JAX and no TensorFlow). Every argument goes to `brainscan train segmenter`; --data is the pack.
#
# Here, once:  scripts/device-wheels.sh
#              brainscan train pack --data BRATS_DIR --preset small --target-spacing 2 --out runs/pack/brats-2mm.npz
# There (the device tool's run, carry [".whl", "runs/pack"]; the bundle comes back under $OUT):
#   scripts/device-train-segmenter.sh --data runs/pack/brats-2mm.npz --arch unet3d --preset small \
#       --target-spacing 2 --outputs regions --patch-size 64 --batch-size 8 --mixed-precision bf16 \
#       --epochs 30 --steps-per-epoch 100 --val-every 5 --val-cases 4 --out "$OUT/models" --version 2
# Then here: `brainscan evaluate` the returned bundle (TensorFlow serves JAX-trained weights as they are).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" KERAS_BACKEND=jax PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
exec python3 -m brainscan train segmenter "$@"
