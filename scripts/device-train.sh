#!/usr/bin/env bash
# Train on a lent GPU machine under Keras' JAX backend (the machine has JAX and no TensorFlow):
#   scripts/device-train.sh segmenter ARGS   (--data: a pack, see below)
#   scripts/device-train.sh classifier ARGS  (--data: a Kaggle-layout folder carried along, e.g. the 160 px
#       copy that `python ../shared/data/make-160.py runs/kaggle160` writes, 47 MB; the run's duplicate-aware
#       split is that copy's, so `evaluate --validation-split` reproduces it on that copy)
# Every further argument goes to `brainscan train TASK`. Before the call: scripts/device-slim-tree.sh on.
#
# Here, once:  scripts/device-wheels.sh
#              brainscan train pack --data BRATS_DIR --preset small --target-spacing 2 --out runs/pack/brats-2mm.npz
# There (the device tool's run, carry [".whl", "runs/pack"]; the bundle comes back under $OUT):
#   scripts/device-train.sh segmenter --data runs/pack/brats-2mm.npz --arch unet3d --preset small \
#       --target-spacing 2 --outputs regions --patch-size 64 --batch-size 8 --mixed-precision bf16 \
#       --epochs 30 --steps-per-epoch 100 --val-every 5 --val-cases 4 --out "$OUT/models" --version 2
# Then here: `brainscan evaluate` the returned bundle (TensorFlow serves JAX-trained weights as they are).
# A file that comes back is at most 16 MiB: a ResNet50 bundle (47 MB in float16) travels as
# `tar -c -C "$OUT/models" . | split -b 15M - "$OUT/bundle.tar."` there and `cat bundle.tar.* | tar -x` here.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH="/tmp/site:$PWD" KERAS_BACKEND=jax PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
task=${1:?usage: device-train.sh segmenter|classifier ARGS}
shift
exec python3 -m brainscan train "$task" "$@"
