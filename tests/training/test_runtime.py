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


def test_the_schedule_is_cosine_decay_computed_once_a_traced_step() -> None:
    """cosine_schedule gives CosineDecay's values, eager or traced, and builds them once per graph."""
    import keras
    import numpy as np
    import tensorflow as tf

    from training.runtime import cosine_schedule

    arguments = {"initial_learning_rate": 1e-4, "decay_steps": 20, "warmup_target": 1e-2, "warmup_steps": 5,
                 "alpha": 0.01}
    schedule, reference = cosine_schedule(**arguments), keras.optimizers.schedules.CosineDecay(**arguments)
    steps = np.arange(0, 30, dtype=np.int64)
    assert [float(schedule(s)) for s in steps] == pytest.approx([float(reference(s)) for s in steps], rel=1e-6)
    step = tf.Variable(0, dtype=tf.int64)

    @tf.function
    def read_often():  # as AdamW does: once for every variable it decays
        return tf.stack([schedule(step) * 1.0 for _ in range(50)])

    for value in (3, 12):  # warm-up, then decay: one graph, read anew at each call
        step.assign(value)
        assert np.allclose(read_often().numpy(), float(reference(value)), rtol=1e-6)
    graph = read_often.get_concrete_function().graph
    assert sum(op.type in ("If", "StatelessIf") for op in graph.get_operations()) == 1
    assert schedule.get_config() == reference.get_config()


def _counting_sequential() -> tuple[type, list[int]]:
    """A Sequential subclass whose training step records each trace, and the list it records into."""
    import keras

    traces: list[int] = []

    class Counting(keras.Sequential):
        def train_step(self, data):  # runs once per trace
            traces.append(1)
            return super().train_step(data)

    return Counting, traces


def test_an_optimizer_built_before_fit_gets_its_training_step_traced_once() -> None:
    """Slots created inside the first trace make tf.function trace the step again; build_optimizer creates
    them first, and the run is the same (weights and their moving averages)."""
    import keras
    import numpy as np

    from training.runtime import build_optimizer

    Counting, traces = _counting_sequential()

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 4)).astype(np.float32), rng.normal(size=(12, 2)).astype(np.float32)
    runs = {}
    for early in (True, False):
        keras.utils.set_random_seed(0)
        traces.clear()
        model = Counting([keras.Input((4,)), keras.layers.Dense(2)])
        model.compile(optimizer=keras.optimizers.AdamW(0.05, use_ema=True), loss="mse")
        if early:
            build_optimizer(model)
            assert model.optimizer.built
        model.fit(x, y, batch_size=4, epochs=2, shuffle=False, verbose=0)
        runs[early] = (len(traces), [np.asarray(v) for v in model.optimizer.variables])
    assert runs[True][0] == 1
    assert len(runs[True][1]) == len(runs[False][1])
    for built_first, built_lazily in zip(runs[True][1], runs[False][1]):
        np.testing.assert_array_equal(built_first, built_lazily)
    build_optimizer(model)  # built: left alone
    assert int(model.optimizer.iterations.numpy()) == 6


def test_metrics_built_before_fit_leave_one_trace_of_the_training_step() -> None:
    """Compiled metrics are built inside the first trace of the step unless a strategy was given, and
    tf.function then traces it again; build_metrics builds them from the dataset's spec first, same run."""
    import keras
    import numpy as np
    import tensorflow as tf

    from training.runtime import build_metrics, build_optimizer

    Counting, traces = _counting_sequential()

    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 4)).astype(np.float32)
    y = np.eye(2, dtype=np.float32)[rng.integers(0, 2, 12)]
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(5)  # a last batch of 2: no retrace either
    runs = {}
    for early in (True, False):
        keras.utils.set_random_seed(0)
        traces.clear()
        model = Counting([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
        model.compile(optimizer=keras.optimizers.AdamW(0.05), loss="categorical_crossentropy", metrics=["accuracy"])
        build_optimizer(model)
        if early:
            build_metrics(model, dataset)
            assert model._compile_metrics.built
        history = model.fit(dataset, validation_data=dataset, epochs=2, verbose=0).history
        runs[early] = (len(traces), history, model.get_weights())
    assert runs[True][0] == 1 and runs[False][0] == 2
    assert runs[True][1] == runs[False][1]
    for a, b in zip(runs[True][2], runs[False][2]):
        np.testing.assert_array_equal(a, b)
    build_metrics(model, x)  # no element_spec (arrays, a PyDataset): left to Keras


CHECKPOINTED = {
    "resnet50": {"preset": "tiny", "input_size": 32},
    "vit_cnn": {"preset": "tiny", "input_size": 32},
    "unet3d": {"preset": "tiny"},
    "attention_unet3d": {"preset": "tiny"},
}
LOAD_IN_A_FRESH_PROCESS = """
import json, sys, traceback
from training.runtime import load_checkpoint
for arch, path in json.loads(sys.argv[1]).items():
    try:
        print(json.dumps({arch: load_checkpoint(path).count_params()}))
    except Exception:
        print(json.dumps({arch: traceback.format_exc()[-3000:]}))
"""


@pytest.fixture(scope="module")
def fresh_process_loads(tmp_path_factory) -> tuple[dict[str, tuple[int, object]], int, str]:
    """Each architecture's checkpoint, compiled as its trainer compiles it and saved here, then loaded by one
    new interpreter (one TensorFlow start for the four): ({arch: (parameters saved, parameters loaded or the
    load's traceback)}, the interpreter's exit status, the end of its stderr)."""
    import keras

    from brainscan.models.registry import build_model
    from training.losses import DiceCELoss, ForegroundDice
    from training.runtime import Runtime, build_optimizer, cosine_schedule, wrap_optimizer

    folder = tmp_path_factory.mktemp("checkpoints")
    saved, paths = {}, {}
    for arch, args in CHECKPOINTED.items():
        model = build_model(arch, args)
        segmenter = "unet" in arch
        # the trainers' learning-rate schedule, and the mixed-precision wrapper: a GPU run's checkpoint names it;
        # a classifier's weight average (--ema) and clipping, its label-smoothed loss and accuracy
        schedule = cosine_schedule(initial_learning_rate=1e-5, decay_steps=10, warmup_target=1e-3, warmup_steps=2)
        optimizer = keras.optimizers.AdamW(schedule, clipnorm=1.0, use_ema=not segmenter, ema_momentum=0.9)
        model.compile(optimizer=wrap_optimizer(optimizer, Runtime(strategy=None, gpus=0, mixed_precision=True)),
                      loss=DiceCELoss() if segmenter else keras.losses.CategoricalCrossentropy(label_smoothing=0.1),
                      metrics=[ForegroundDice()] if segmenter else ["accuracy"])
        build_optimizer(model)  # its slots (and averages) are in the checkpoint, as after fit
        paths[arch] = str(folder / arch / "last.keras")
        (folder / arch).mkdir()
        model.save(paths[arch])
        saved[arch] = model.count_params()
    done = subprocess.run([sys.executable, "-c", LOAD_IN_A_FRESH_PROCESS, json.dumps(paths)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "2"})
    loaded = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            loaded.update(json.loads(line))
    results = {arch: (saved[arch], loaded.get(arch, f"not loaded: {done.stderr[-3000:]}")) for arch in saved}
    return results, done.returncode, done.stderr[-3000:]


@pytest.mark.parametrize("arch", list(CHECKPOINTED))
def test_checkpoints_load_in_a_fresh_process(arch, fresh_process_loads) -> None:
    """What --resume does after a crash: a new interpreter loads last.keras (custom layers, loss, optimizer)."""
    results, returncode, stderr = fresh_process_loads
    saved, loaded = results[arch]
    assert loaded == saved, loaded
    assert returncode == 0, stderr
