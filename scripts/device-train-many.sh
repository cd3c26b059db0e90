#!/usr/bin/env bash
# Run several `brainscan train segmenter` runs at once on ONE lent GPU (Keras' JAX backend), each
# with its share of the GPU's memory and of the CPU cores that cut patches, and bring back each
# run's bundle, best weights, state and log as one tar file under $OUT (the device tool returns
# at most 8 files).
#
#   scripts/device-train-many.sh JOBS_FILE
#
# JOBS_FILE: one run a line, `NAME WORKERS ARGS...` (NAME names the tar and the log; WORKERS is the
# number of patch-cutting processes; ARGS go to `brainscan train segmenter`, and should hold
# --max-minutes so that every run ends in time and --work-dir runs/device/NAME). Blank lines and
# lines starting with # are skipped. Example: scripts/device-jobs/segmenter-2mm.txt.
#
# Here, once: scripts/device-wheels.sh and `brainscan train pack ...` (see device-train.sh).
# The device tool's run: carry [".whl", "runs/pack"], command `scripts/device-train-many.sh FILE`.
# A run that fails in its first two minutes, or has not ended its first epoch after FIRST_EPOCH_LIMIT_S
# (default 240), stops them all, so that a broken setup costs little.
# HARD_LIMIT_S (default 560) kills what is still running and packs what there is.
set -uo pipefail
cd "$(dirname "$0")/.."
jobs_file=${1:?usage: device-train-many.sh JOBS_FILE}
out=${OUT:-runs/device-out}
hard_limit=${HARD_LIMIT_S:-560}
first_epoch_limit=${FIRST_EPOCH_LIMIT_S:-240}
mkdir -p "$out" runs/device
if [ -d .whl ] && [ "${INSTALL_WHEELS:-1}" = 1 ]; then  # INSTALL_WHEELS=0: a local try with its own venv
    python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD"
else
    export PYTHONPATH="$PWD"
fi
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
nproc

names=() pids=()
while read -r name workers args; do
    [[ -z "$name" || "$name" == \#* ]] && continue
    # shellcheck disable=SC2086  (ARGS are words, as on a command line)
    BRAINSCAN_DATA_WORKERS=$workers BRAINSCAN_DATA_THREADS=${DATA_THREADS:-1} OMP_NUM_THREADS=2 python3 -m brainscan train segmenter $args \
        > "runs/device/$name.log" 2>&1 &
    pids+=($!) names+=("$name")
    echo "started $name (pid $!, $workers patch workers): $args"
done < "$jobs_file"

pack_results() {
    for i in "${!names[@]}"; do
        name=${names[$i]}
        files=("runs/device/$name.log")
        for f in runs/device/"$name"/state.json runs/device/"$name"/best_validation.json; do
            [ -f "$f" ] && files+=("$f")
        done
        # The bundle holds the best weights (float16); without one, bring the checkpoint's float32 copy.
        # Each file that comes back is at most 16 MiB, so never both.
        bundle=$(sed -n 's/^bundle written: //p' "runs/device/$name.log" | tail -1)
        if [ -n "$bundle" ] && [ -d "$bundle" ]; then
            files+=("$bundle")
        elif [ -f "runs/device/$name/best.weights.h5" ]; then
            files+=("runs/device/$name/best.weights.h5")
        fi
        tar -czf "$out/$name.tgz" "${files[@]}" 2>/dev/null
        echo "== $name: $(ls -l "$out/$name.tgz" | awk '{print $5}') bytes; last lines:"
        # The first H200 run's tars were 18 MB: over 16 MiB, so pieces (here: cat NAME.tgz.part* | tar -xz).
        if [ "$(stat -c %s "$out/$name.tgz")" -gt $((15 * 1024 * 1024)) ]; then
            split -b 15M -d "$out/$name.tgz" "$out/$name.tgz.part" && rm "$out/$name.tgz"
        fi
        grep -E "validation|time budget|bundle written|Error|error" "runs/device/$name.log" | tail -6
    done
}

start=$SECONDS
while :; do
    running=0
    for i in "${!pids[@]}"; do
        if kill -0 "${pids[$i]}" 2>/dev/null; then
            running=$((running + 1))
        elif [ $((SECONDS - start)) -lt 120 ] && ! wait "${pids[$i]}"; then
            echo "${names[$i]} failed after $((SECONDS - start)) s; stopping all runs:"
            tail -25 "runs/device/${names[$i]}.log"
            kill "${pids[@]}" 2>/dev/null
            pack_results
            exit 1
        fi
    done
    [ "$running" -eq 0 ] && break
    # A run that has not finished its first epoch by then is stuck (or hopelessly slow): stop all.
    if [ $((SECONDS - start)) -ge "$first_epoch_limit" ] && [ -z "${checked:-}" ]; then
        checked=1
        for i in "${!names[@]}"; do
            if kill -0 "${pids[$i]}" 2>/dev/null \
                    && ! grep -qE "^Epoch 2/|time budget" "runs/device/${names[$i]}.log"; then
                echo "${names[$i]} has not finished an epoch after $first_epoch_limit s; stopping all runs:"
                tail -25 "runs/device/${names[$i]}.log"
                kill "${pids[@]}" 2>/dev/null
                pack_results
                exit 1
            fi
        done
    fi
    if [ $((SECONDS - start)) -ge "$hard_limit" ]; then
        echo "hard limit of $hard_limit s: stopping $running run(s)"
        kill "${pids[@]}" 2>/dev/null
        sleep 2
        break
    fi
    sleep 5
done
echo "all runs ended after $((SECONDS - start)) s"
pack_results
