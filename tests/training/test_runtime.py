"""training.runtime: device strategy and the loss-scaled optimizer under several replicas."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.paths import REPO_ROOT

pytest.importorskip("tensorflow")

# Runs in a fresh interpreter: the CPU must be split into two logical devices before TF starts.
# Replica 1 sees an overflowed (inf) gradient, replica 0 a finite one.
TWO_REPLICA_STEP = """
import json
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
from training.runtime import Runtime, wrap_optimizer

strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    variable = keras.Variable(np.ones(3, np.float32))
    optimizer = wrap_optimizer(keras.optimizers.SGD(learning_rate=0.1),
                               Runtime(strategy=strategy, gpus=0, mixed_precision=True))
    optimizer.build([variable])
scale_before = float(np.asarray(optimizer.dynamic_scale))

@tf.function
def step(overflow_on):
    def replica_fn():
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        grad = tf.where(replica == overflow_on, tf.fill([3], float("inf")), tf.ones([3]))
        optimizer.apply([grad], [variable])
    strategy.run(replica_fn)

step(tf.constant(1))
after_overflow = [float(v) for v in np.asarray(variable)]
step(tf.constant(-1))  # no replica overflows: the step is applied (gradient 2 / scale, summed)
print(json.dumps({"scale_before": scale_before, "scale_after": float(np.asarray(optimizer.dynamic_scale)),
                  "after_overflow": after_overflow, "after_finite": [float(v) for v in np.asarray(variable)]}))
"""


def test_an_overflow_on_any_replica_skips_the_step_on_all() -> None:
    done = subprocess.run([sys.executable, "-c", TWO_REPLICA_STEP], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin",
                                            "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["after_overflow"] == [1.0, 1.0, 1.0], "an inf gradient on replica 1 reached the weights"
    assert result["scale_after"] == result["scale_before"] / 2
    # the finite step is applied: unscaled gradients (1 / scale per replica) summed, times the learning rate
    expected = 1.0 - 0.1 * 2 * (1.0 / result["scale_after"])
    assert result["after_finite"] == pytest.approx([expected] * 3, rel=1e-6)


def test_wrap_optimizer_leaves_float32_training_alone() -> None:
    import keras

    from training.runtime import Runtime, wrap_optimizer

    optimizer = keras.optimizers.SGD()
    assert wrap_optimizer(optimizer, Runtime(strategy=None, gpus=0, mixed_precision=False)) is optimizer


@pytest.mark.parametrize("arch, args", [
    ("resnet50", {"preset": "tiny", "input_size": 32}),
    ("vit_cnn", {"preset": "tiny", "input_size": 32}),
    ("unet3d", {"preset": "tiny"}),
    ("attention_unet3d", {"preset": "tiny"}),
])
def test_checkpoints_load_in_a_fresh_process(arch, args, tmp_path) -> None:
    """What --resume does after a crash: a new interpreter loads last.keras (custom layers, loss, optimizer)."""
    import keras

    from brainscan.models.registry import build_model
    from training.losses import DiceCELoss
    from training.runtime import Runtime, wrap_optimizer

    model = build_model(arch, args)
    loss = DiceCELoss() if "unet" in arch else "sparse_categorical_crossentropy"
    # the mixed-precision wrapper too: a GPU run's checkpoint names it
    optimizer = wrap_optimizer(keras.optimizers.AdamW(1e-3), Runtime(strategy=None, gpus=0, mixed_precision=True))
    model.compile(optimizer=optimizer, loss=loss)
    model.save(tmp_path / "last.keras")
    script = ("import sys; from training.runtime import load_checkpoint; "
              "model = load_checkpoint(sys.argv[1]); print(model.count_params())")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "last.keras")], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.strip().splitlines()[-1]) == model.count_params()
