"""Classifier training options that need no converged model: the weight average and its batch-norm
statistics, mixed precision across two replicas, fitting weights across input sizes, and training under
Keras' JAX backend. The convergence runs are in tests/training/test_classifier_training.py.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from brainscan.cli.main import main  # noqa: E402
from brainscan.labels import KAGGLE_CLASSES  # noqa: E402
from brainscan.data.phantoms.kaggle import write_kaggle_phantoms  # noqa: E402
from tests.training.classifier_common import PHANTOM_SIZE, train_command  # noqa: E402


@pytest.fixture(scope="module")
def kaggle_phantoms(tmp_path_factory) -> Path:
    """50 phantoms a class: every run here takes at most 40 a class (``--max-per-class``)."""
    root = tmp_path_factory.mktemp("kaggle")
    write_kaggle_phantoms(root, n=200, seed=0, size=PHANTOM_SIZE)
    return root


def test_fit_weights_resizes_only_the_position_table() -> None:
    from brainscan.models.registry import build_model
    from training.classifier import architecture_args, fit_weights

    def build(arch: str, size: int):
        return build_model(arch, architecture_args(arch, size, "tiny", len(KAGGLE_CLASSES)))

    small, large = build("vit_cnn", 32), build("vit_cnn", 48)
    weights, resized = fit_weights(large, small)
    assert [w.shape for w in weights] == [tuple(v.shape) for v in large.weights]
    assert len(resized) == 1 and "position_embedding" in resized[0]
    unchanged = [a.shape == b.shape and np.array_equal(a, b) for a, b in zip(weights, small.get_weights())]
    assert unchanged.count(False) == 1
    reason, resized = fit_weights(build("resnet50", 32), small)
    assert isinstance(reason, str) and "variables there" in reason and resized == []


def _batchnorm_model(use_ema: bool) -> Any:
    import keras

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.BatchNormalization(),
                              keras.layers.Dropout(0.1, seed=1), keras.layers.Dense(2, activation="softmax")])
    model.compile(optimizer=keras.optimizers.AdamW(0.1, use_ema=use_ema, ema_momentum=0.9),
                  loss="sparse_categorical_crossentropy")
    return model


def _phantom_xy() -> tuple[np.ndarray, np.ndarray]:
    x = np.random.default_rng(0).normal(2.0, 3.0, size=(32, 4)).astype(np.float32)
    return x, (x[:, 0] > 2.0).astype(np.int64)


def test_averaged_weights_swaps_the_moving_averages_in_and_back() -> None:
    from training.classifier import averaged_weights, batchnorm_statistics

    x, y = _phantom_xy()
    for use_ema in (True, False):
        model = _batchnorm_model(use_ema)
        for _ in range(12):  # not fit(): at its end fit() overwrites the weights with their averages
            model.train_on_batch(x[:8], y[:8])
        statistics = {v.path: np.full(tuple(v.shape), 7.0, np.float32) for v in batchnorm_statistics(model)}
        assert sorted(p.rsplit("/", 1)[-1] for p in statistics) == ["moving_mean", "moving_variance"]
        raw = [w.copy() for w in model.get_weights()]
        with averaged_weights(model, statistics):
            inside = {v.path: v.numpy().copy() for v in model.variables}
        assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), raw))  # put back
        for path, value in statistics.items():
            np.testing.assert_array_equal(inside[path], value)
        seeds = [v for v in model.non_trainable_variables if v.path not in statistics]
        assert seeds and all(np.array_equal(inside[v.path], v.numpy()) for v in seeds)  # not averaged
        trainable = {v.path: v.numpy() for v in model.trainable_variables}
        if use_ema:
            optimizer = model.optimizer
            averages = {v.path: a.numpy() for v, a in zip(optimizer._trainable_variables,
                                                          optimizer._model_variables_moving_average)}
            assert all(np.array_equal(inside[p], a) for p, a in averages.items())
            assert not all(np.allclose(inside[p], trainable[p]) for p in averages)
        else:
            assert all(np.array_equal(inside[p], trainable[p]) for p in trainable)


def test_ema_callback_averages_the_batchnorm_statistics_and_swaps_them_in_for_validation(tmp_path) -> None:
    """The optimizer averages trainable variables only; the --ema callback averages the batch-norm
    statistics with the same momentum, validates on both averages, saves them, and leaves them in the model."""
    import keras

    from training.classifier import _statistics_averaging_callback, batchnorm_statistics

    x, y = _phantom_xy()
    model = _batchnorm_model(True)
    path = tmp_path / "averages.npz"
    averaging = _statistics_averaging_callback(0.9, path, resume=False)
    seen: list[dict[str, np.ndarray]] = []
    validated: list[dict[str, np.ndarray]] = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append({v.path: v.numpy().copy() for v in batchnorm_statistics(self.model)})

        def on_test_begin(self, logs=None):
            validated.append({v.path: v.numpy().copy() for v in self.model.weights})

    model.fit(x, y, batch_size=4, epochs=2, validation_data=(x, y), callbacks=[averaging, Record()], verbose=0)
    expected = dict(seen[0])
    for step in seen[1:]:
        expected = {p: 0.9 * expected[p] + 0.1 * step[p] for p in expected}
    assert len(seen) == 16 and set(expected) == set(averaging.averages)
    for p, value in expected.items():
        np.testing.assert_allclose(averaging.averages[p], value, rtol=1e-5)
        assert not np.allclose(value, seen[-1][p], rtol=1e-3)  # the averages are not the latest statistics
        np.testing.assert_allclose(validated[-1][p], value, rtol=1e-5)  # validation saw the averages
        np.testing.assert_allclose(model.get_weights()[[v.path for v in model.weights].index(p)], value,
                                   rtol=1e-5)  # and the model keeps them after fit
    np.testing.assert_allclose(np.load(path)[p], averaging.averages[p])

    resumed = _statistics_averaging_callback(0.9, path, resume=True)
    resumed.set_model(model)
    resumed.on_train_begin()
    assert all(np.allclose(resumed.averages[p], averaging.averages[p]) for p in expected)


@pytest.mark.slow
def test_ema_run_validates_and_ships_the_averaged_weights(kaggle_phantoms, tmp_path, caplog):
    """--ema: the bundle holds the moving averages (what validation scored), not the raw weights; --resume works."""
    from brainscan.models.bundle import load_bundle
    from training.runtime import load_checkpoint

    out, work = tmp_path / "models", tmp_path / "work"
    command = train_command(kaggle_phantoms, "resnet50", out, work, "--ema", "0.9", "--max-per-class", "40")
    command[command.index("--epochs") + 1] = "1"
    assert main(command) == 0
    bundle = load_bundle(out / "classification" / "resnet50" / "test-1")
    training = bundle.manifest["training"]
    assert training["config"]["ema"] == 0.9 and "--ema 0.9" in training["command"]
    # Keras validated the averaged weights; the bundle's plain network scores the same (the served
    # figure may differ by the flip TTA that calibration chose).
    calibration = bundle.manifest["metrics"]["calibration"]
    assert calibration["accuracy_before"] == pytest.approx(training["history"][0]["val_accuracy"], abs=1e-6)
    assert bundle.manifest["metrics"]["validation"]["accuracy"] == pytest.approx(calibration["accuracy_after"],
                                                                                 abs=1e-6)
    # The checkpoint after epoch 1 holds the raw weights and, in its optimizer, their averages.
    checkpoint = load_checkpoint(work / "last.keras")
    optimizer = checkpoint.optimizer
    averages = {v.path: a.numpy() for v, a in zip(optimizer._trainable_variables,
                                                  optimizer._model_variables_moving_average)}
    shipped = {v.path: w for v, w in zip(bundle.model.weights, bundle.model.get_weights())}
    raw = {v.path: v.numpy() for v in checkpoint.trainable_variables}
    kernels = [path for path in averages if path.endswith("kernel")]
    assert kernels and set(kernels) <= set(shipped)
    for path in kernels:
        np.testing.assert_allclose(shipped[path], averages[path], rtol=2e-3, atol=2e-3)  # float16 bundle
    assert max(float(np.abs(raw[p] - averages[p]).max()) for p in kernels) > 0.01
    # So do the batch-norm statistics: the bundle has their averages (saved for --resume), not the raw ones.
    statistics = dict(np.load(work / "batchnorm-averages.npz"))
    raw_statistics = {v.path: v.numpy() for v in checkpoint.non_trainable_variables
                      if v.path.endswith(("/moving_mean", "/moving_variance"))}
    assert raw_statistics and set(statistics) == set(raw_statistics)
    for path, value in statistics.items():
        np.testing.assert_allclose(shipped[path], value, rtol=2e-3, atol=2e-3)
    assert max(float(np.abs(raw_statistics[p] - statistics[p]).max()) for p in statistics) > 0.01
    # Resumed without --ema, the run still averages as its checkpoint does, says so, and records it.
    command[command.index("--epochs") + 1] = "2"
    command[command.index("--version") + 1] = "test-2"
    resume = [arg for arg in command if arg not in ("--ema", "0.9")]
    with caplog.at_level("WARNING", logger="training.classifier"):
        assert main([*resume, "--resume"]) == 0
    assert "averages the weights with momentum 0.9; --ema None is ignored" in caplog.text
    assert "no batch-norm averages" not in caplog.text
    training = load_bundle(out / "classification" / "resnet50" / "test-2").manifest["training"]
    assert len(training["history"]) == 2 and training["config"]["ema"] == 0.9
    with pytest.raises(SystemExit, match="ema must be in"):
        main(train_command(kaggle_phantoms, "resnet50", out, work, "--ema", "1.5"))


def test_recipe_options_soften_and_crop_the_training_batches_only(kaggle_phantoms):
    """--mixup and --cutmix take turns batch by batch (soft one-hot targets that still sum to 1), validation
    batches stay one-hot, and a random resized crop zooms in with at most (1 - S) / 2 of black border."""
    from brainscan.preprocess.image2d import ImagePreprocessConfig
    from training.classifier_data import Recipe, build_augmentation, make_dataset, training_records

    records = training_records(kaggle_phantoms, 8, 0)
    config = ImagePreprocessConfig(input_size=32, channels=3)
    recipe = Recipe(mixup=0.4, cutmix=1.0)
    plain = [(np.asarray(x), np.asarray(y)) for x, y in make_dataset(records, config, batch_size=8, training=False,
                                                                     seed=0)]
    assert all(set(np.unique(y)) == {0.0, 1.0} and np.allclose(y.sum(axis=1), 1) for _, y in plain)
    mixed = [(np.asarray(x), np.asarray(y)) for x, y in make_dataset(records, config, batch_size=8, training=True,
                                                                     seed=0, recipe=recipe)]
    assert len(mixed) == 4 and all(y.shape == (8, len(KAGGLE_CLASSES)) for _, y in mixed)
    assert all(np.allclose(y.sum(axis=1), 1, atol=1e-5) for _, y in mixed)
    assert any(np.any((y > 0.01) & (y < 0.99)) for _, y in mixed[0::2]), "mixup left every target one-hot"
    assert any(np.any((y > 0.01) & (y < 0.99)) for _, y in mixed[1::2]), "cutmix left every target one-hot"
    # The crop alone (the first two layers): shifted and zoomed in, never past the image's border.
    crop = build_augmentation(0, config.normalization, crop_scale=0.6).layers[:2]
    assert [type(layer).__name__ for layer in crop] == ["RandomTranslation", "RandomZoom"]
    ramp = np.broadcast_to(np.linspace(0.1, 1.0, 64, dtype=np.float32)[None, :, None], (64, 64, 3))
    batch = np.stack([ramp] * 32)
    out = batch
    for layer in crop:
        out = np.asarray(layer(out, training=True))
    filled_columns = (out[:, 32, :, 0] < 0.05).sum(axis=1)
    assert filled_columns.max() <= 0.2 * 64 + 1 and filled_columns.mean() < 0.1 * 64
    # zoomed in onto 0.6..1 of the width: across the image the ramp climbs 0.9 x that (the original's 0.9
    # at most, 0.54 at least), on the part that is not border
    slopes = [np.polyfit(np.flatnonzero(row > 0.05), row[row > 0.05], 1)[0] * 63 for row in out[:, 32, :, 0]]
    assert 0.5 < min(slopes) and max(slopes) < 0.93 and np.median(slopes) < 0.85


def test_distillation_targets_mix_the_label_and_the_teachers_view_of_the_same_batch(kaggle_phantoms):
    from brainscan.preprocess.image2d import ImagePreprocessConfig
    from training.classifier_data import Recipe, make_dataset, training_records

    records = training_records(kaggle_phantoms, 4, 0)
    config = ImagePreprocessConfig(input_size=32, channels=3)
    seen = []

    jitter = iter(np.random.default_rng(0).uniform(0, 0.05, 100))

    def teacher(batch: np.ndarray) -> np.ndarray:  # a stand-in with a known answer, recording what it saw
        time.sleep(next(jitter))  # calls that overlapped (tf.data running them in parallel) would swap order
        seen.append(np.array(batch))
        return np.tile(np.float32([0.1, 0.2, 0.3, 0.4]), (len(batch), 1))

    recipe = Recipe(crop_scale=0.75, teacher=teacher, teacher_weight=0.25)
    batches = [(np.asarray(x), np.asarray(y)) for x, y in make_dataset(records, config, batch_size=8, training=True,
                                                                       seed=0, recipe=recipe)]
    assert len(seen) == len(batches) == 2
    for (images, targets), shown in zip(batches, seen):
        np.testing.assert_array_equal(images, shown)  # the augmented batch itself
        hard = (targets - 0.25 * np.float32([0.1, 0.2, 0.3, 0.4])) / 0.75
        np.testing.assert_allclose(np.sort(hard, axis=1), np.tile([0, 0, 0, 1], (len(hard), 1)), atol=1e-6)
    plain = make_dataset(records, config, batch_size=8, training=False, seed=0, recipe=recipe)
    assert all(set(np.unique(np.asarray(y))) == {0.0, 1.0} for _, y in plain) and len(seen) == 2


def test_a_checkpoint_compiled_for_integer_labels_resumes_on_one_hot_targets(tmp_path):
    """Checkpoints written before labels became one-hot (sparse cross-entropy) are recompiled on --resume,
    optimizer state kept; current ones are left alone."""
    import keras

    from training.classifier_data import upgrade_to_one_hot_loss
    from training.runtime import load_checkpoint

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    model.fit(x, np.arange(8) % 4, verbose=0)
    model.save(tmp_path / "last.keras")
    old = load_checkpoint(tmp_path / "last.keras")
    iterations = int(old.optimizer.iterations.numpy())
    assert upgrade_to_one_hot_loss(old) and iterations == 1
    history = old.fit(x, np.eye(4, dtype="float32")[np.arange(8) % 4], verbose=0).history
    assert np.isfinite(history["loss"][0]) and "accuracy" in history
    assert int(old.optimizer.iterations.numpy()) == iterations + 1
    assert not upgrade_to_one_hot_loss(old)


@pytest.fixture(scope="module")
def shipped_teacher() -> Path:
    """The shipped ResNet50 (128 px, flip TTA and a temperature): the teacher the ViT-CNN is meant to have."""
    from brainscan.models.store import ModelStore
    from tests.paths import REPO_ROOT

    store = ModelStore(REPO_ROOT / "models")
    version = store.current_version("classification", "resnet50")
    return REPO_ROOT / "models" / "classification" / "resnet50" / version


@pytest.mark.slow
def test_a_vit_cnn_distils_from_a_teacher_bundle_and_records_it(kaggle_phantoms, shipped_teacher, tmp_path):
    """--teacher: the run trains on the teacher's outputs (batches resized to its 128 px) and records which
    teacher and weight; a teacher that normalises images otherwise is refused."""
    from brainscan.errors import BundleError
    from brainscan.models.bundle import read_manifest
    from brainscan.preprocess.image2d import ImagePreprocessConfig
    from training.distill import load_teacher

    out = tmp_path / "models"
    command = train_command(kaggle_phantoms, "vit_cnn", out, tmp_path / "work", "--max-per-class", "8",
                            "--teacher", str(shipped_teacher), "--teacher-weight", "0.7")
    command[command.index("--epochs") + 1] = "1"
    command[command.index("--input-size") + 1] = "48"
    assert main(command) == 0
    training = read_manifest(out / "classification" / "vit_cnn" / "test-1")["training"]
    teacher = read_manifest(shipped_teacher)
    assert training["teacher"]["weights_sha256"] == teacher["weights"]["sha256"]
    assert training["teacher"]["input_size"] == 128 and training["config"]["teacher_weight"] == 0.7
    assert training["teacher"]["tta"] == teacher["inference"]["tta"]
    assert f"--teacher {shipped_teacher} --teacher-weight 0.7" in training["command"]
    with pytest.raises(BundleError, match="differ from this run's in normalization"):
        load_teacher(str(shipped_teacher), out, ImagePreprocessConfig(input_size=48, channels=3, normalization="zscore"))


TWO_CPU_MAIN = """
import sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from brainscan.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("arch, extra", [
    ("resnet50", ["--ema", "0.9"]),
    ("vit_cnn", ["--label-smoothing", "0.1", "--mixup", "0.2", "--cutmix", "1.0", "--crop-scale", "0.75"]),
])
def test_mixed_precision_training_across_two_replicas(arch, extra, kaggle_phantoms, tmp_path):
    """The GPU code path on CPU: float16 compute (loss scaling) under a two-replica MirroredStrategy.

    The ResNet50 run also averages its weights (--ema) through the loss-scale wrapper and mirrored variables;
    the ViT-CNN run takes the recipe options (soft targets, crops), which its manifest records.
    """
    import os
    import subprocess
    import sys

    from brainscan.models.bundle import load_bundle
    from tests.paths import REPO_ROOT
    from training.runtime import DEVICES_ENV

    command = train_command(kaggle_phantoms, arch, tmp_path / "models", tmp_path / "work", "--mixed-precision", "on",
                            "--max-per-class", "8", *extra)
    command[command.index("--epochs") + 1] = "2"
    command[command.index("--input-size") + 1] = "32"
    env = {**os.environ, DEVICES_ENV: "/cpu:0,/cpu:1", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-c", TWO_CPU_MAIN, *command], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 replica(s), dtype policy mixed_float16" in done.stderr
    bundle = load_bundle(tmp_path / "models" / "classification" / arch / "test-1")
    assert bundle.manifest["training"]["devices"] == {"gpus": 0, "replicas": 2, "mixed_precision": True}
    history = bundle.manifest["training"]["history"]
    assert len(history) == 2 and all(np.isfinite(h["loss"]) for h in history)
    recorded = bundle.manifest["training"]["config"]
    options = dict(zip(extra[::2], extra[1::2]))
    for flag, value in options.items():
        assert recorded[flag[2:].replace("-", "_")] == float(value) and f"{flag} {value}" in bundle.manifest[
            "training"]["command"]
    probabilities = np.asarray(bundle.model(np.stack([bundle.preprocess(p.read_bytes()) for p in
                                                      sorted((kaggle_phantoms / "Training").glob("*/*.jpg"))[:8]])))
    assert probabilities.dtype == np.float32 and np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-3)



@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("jax") is None,
                    reason="jax is not installed (the dev extra brings it): the JAX-backend run cannot be tried")
def test_training_under_the_jax_backend_gives_a_bundle_tensorflow_serves_as_measured(kaggle_phantoms, tmp_path,
                                                                                    capsys):
    """What a lent GPU machine without TensorFlow runs: batches from memory instead of tf.data (mixed by
    mixup and cutmix in turn), the class weights as sample weights, the weight average's batch-norm
    statistics read from JAX's state.

    The ViT-CNN: its custom layers (patch tokens, position table, attention) are where a backend could
    differ, and its CNN stem has the batch-norm statistics; ResNet50 is stock Keras layers only, and
    XLA compiles its step 8 s longer on one core."""
    from brainscan.models.bundle import read_manifest
    from tests.jax_backend import jax_cpu_env

    env = jax_cpu_env()
    command = [sys.executable, "-m", "brainscan", *train_command(kaggle_phantoms, "vit_cnn", tmp_path / "models",
                                                     tmp_path / "work", "--max-per-class", "16", "--ema", "0.9",
                                                     "--mixup", "0.2", "--cutmix", "1.0")]
    command[command.index("--epochs") + 1] = "2"
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Keras backend jax" in done.stderr
    bundle = tmp_path / "models" / "classification" / "vit_cnn" / "test-1"
    manifest = read_manifest(bundle)
    assert manifest["training"]["epochs_run"] == 2 and manifest["training"]["config"]["ema"] == 0.9
    # TensorFlow, here, serves the JAX-trained weights and measures what the JAX run measured.
    out = tmp_path / "report"
    assert main(["evaluate", str(bundle), str(kaggle_phantoms), "--validation-split", "--out", str(out),
                 "--quiet"]) == 0
    capsys.readouterr()
    section = json.loads((out / "report.json").read_text())["splits"]["Validation"]
    assert section["n_samples"] == manifest["metrics"]["validation_images"]
    assert abs(section["accuracy"] - manifest["metrics"]["validation"]["accuracy"]) <= 2 / section["n_samples"]
