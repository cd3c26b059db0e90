#!/usr/bin/env bash
# Download, here, the Python wheels that a lent GPU machine lacks for `brainscan train segmenter`
# (it has Python 3.12, JAX, NumPy, SciPy, h5py, OpenCV and httpx, but no Keras, nibabel, isal or TensorFlow,
# and cannot reach PyPI). They land in .whl/ (git-ignored); carry it with the pack. See
# scripts/device-train.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    platforms+=(--platform "$p")
done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl keras==3.15.1 namex==0.1.0 optree==0.20.0 nibabel==5.4.2 isal==1.9.1
ls -l .whl
