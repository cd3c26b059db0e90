"""Train a 2D tumour classifier (ResNet50 or hybrid ViT-CNN) on the Kaggle Brain Tumor MRI layout.

The pipeline, in order: read the Kaggle folder (Training split only: nothing called Testing is ever
used for training or model selection), a duplicate-aware stratified train/validation split, a
tf.data pipeline that decodes and preprocesses with the core package's ``preprocess_image`` (the
exact function the classifier service calls), caches, augments (flips, small rotations and zoom,
brightness/contrast; random resized crops with ``--crop-scale``), batches, mixes (``--mixup``,
``--cutmix``), distils (``--teacher``: :mod:`training.distill`) and prefetches; cross-entropy on
one-hot targets (``--label-smoothing``); AdamW with warm-up and cosine decay, class weights,
early stopping on validation accuracy, a checkpoint after every epoch (``--resume`` continues from
it), optional initial weights from an earlier bundle (``--init-from``: fine-tuning, for example at a
larger input size), optional weight averaging (``--ema``: validation and the bundle use an
exponential moving average of the weights, and of the batch-norm statistics to match them), TensorBoard logs, and finally a model bundle whose manifest holds the validation metrics and
the training data fingerprint. The options live in :mod:`training.classifier_config` (also the
command line), the data pipeline in :mod:`training.classifier_data`.

Example:
    brainscan train classifier --data ../shared/data/brain-tumor-mri --arch resnet50 \\
        --out models --input-size 128 --epochs 18 --promote
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import numpy as np

from brainscan.errors import BundleError
from brainscan.labels import KAGGLE_CLASSES
from training.classifier_config import ClassifierTrainConfig
from training.classifier_data import Recipe, class_weights, make_dataset, training_records, upgrade_to_one_hot_loss
from training.distill import load_teacher

log = logging.getLogger(__name__)


def architecture_args(arch: str, input_size: int, preset: str, num_classes: int) -> dict[str, Any]:
    """The registry arguments of ``arch`` for a classifier of ``num_classes`` at ``input_size`` px.

    The full ViT-CNN stem has stride 16 (14x14 tokens at 224 px). Below 224 px the stem loses its last
    stride-2 block (stride 8), so that the token grid stays at least 14x14 (16x16 at 128 px).
    """
    args: dict[str, Any] = {"input_size": input_size, "num_classes": num_classes, "channels": 3, "preset": preset}
    if arch == "vit_cnn" and preset == "full" and input_size < 224:
        args["stem_filters"] = [32, 64, 128]
    return args


def load_initial_weights(model: Any, spec: str, config: ClassifierTrainConfig, records: list[Any]) -> dict[str, Any]:
    """Copy the weights of the bundle ``spec`` into ``model`` (``--init-from``); returns the manifest record.

    The bundle must be a classifier of the same architecture, preset and classes. Its input size may
    differ: ResNet50's weights do not depend on it (convolutions and global pooling), and a ViT-CNN's
    position table is resized to the new token grid (see :func:`fit_weights`).

    Raises:
        BundleError: the bundle cannot initialise this run, or its validation images would leak: it was
            trained on the same data (same fingerprint) with another split seed or fraction, so this
            run's validation images may have been its training images.
    """
    from brainscan.models.store import resolve_bundle
    from brainscan.data.kaggle import dataset_fingerprint
    from brainscan.models.bundle import load_bundle

    path = resolve_bundle(spec, task="classification", models_root=config.out)
    source = load_bundle(path)
    manifest = source.spec
    name = f"{manifest.architecture.name} version {manifest.version} ({path})"
    if manifest.architecture.name != config.arch:
        raise BundleError(f"--init-from {name}: architecture {manifest.architecture.name!r}, "
                         f"this run trains {config.arch!r}")
    if list(manifest.classes or ()) != list(KAGGLE_CLASSES):
        raise BundleError(f"--init-from {name}: classes {list(manifest.classes or ())}, expected {list(KAGGLE_CLASSES)}")
    if manifest.architecture.args.get("preset") != config.preset:
        raise BundleError(f"--init-from {name}: preset {manifest.architecture.args.get('preset')!r}, "
                         f"this run uses {config.preset!r}")
    weights, resized = fit_weights(model, source.model)
    if isinstance(weights, str):
        raise BundleError(f"--init-from {name}: its weights do not fit this network at {config.input_size} px "
                          f"(input size {manifest.input.shape[0]} px there): {weights}")
    training = manifest.training
    trained_config = training.get("config") or {}
    same_data = training.get("data_fingerprint") == dataset_fingerprint(records)
    split_of_source = (trained_config.get("seed"), trained_config.get("val_fraction"))
    if same_data and split_of_source != (config.seed, config.val_fraction):
        raise BundleError(
            f"--init-from {name}: it was trained on this data with split seed/fraction {split_of_source}, "
            f"this run validates on seed/fraction {(config.seed, config.val_fraction)}: its training images "
            "would be in this run's validation split. Use the same --seed and --val-fraction.")
    if not same_data:
        log.warning("--init-from %s was trained on other data (fingerprint differs): this run's validation "
                    "images may have been among its training images", name)
    model.set_weights(weights)
    log.info("initial weights from %s%s", name, f" (resized: {', '.join(resized)})" if resized else "")
    return {"bundle": str(path), "name": manifest.name, "version": manifest.version,
            "weights_sha256": manifest.weights.sha256, "input_size": manifest.input.shape[0],
            "same_data_and_split": same_data, "resized_variables": resized}


def fit_weights(model: Any, source: Any) -> tuple[list[np.ndarray] | str, list[str]]:
    """``source``'s weights in ``model``'s variable order, or a reason why they do not fit.

    Same architecture at another input size: every variable but a ViT-CNN's position table keeps
    its shape; that table is resized to the new token grid (:func:`resize_position_embedding`).

    Returns:
        ``(weights, names of the resized variables)``, or ``(reason, [])`` when they do not fit.
    """
    from brainscan.models.vit_cnn import resize_position_embedding

    ours, theirs = model.weights, source.weights
    if len(ours) != len(theirs):
        return f"{len(theirs)} variables there, {len(ours)} here", []
    weights, resized, mismatched = [], [], []
    for mine, other, value in zip(ours, theirs, source.get_weights()):
        want, have = tuple(mine.shape), tuple(other.shape)
        if want == have:
            weights.append(value)
        elif "position_embedding" in mine.path and len(want) == len(have) == 3 and want[2] == have[2]:
            side = int(np.sqrt(want[1] - 1))
            weights.append(resize_position_embedding(value, side))
            resized.append(f"{mine.path} {have} -> {want}")
        else:
            mismatched.append(f"{mine.path} {want} here, {have} there")
    if mismatched:
        return "; ".join(mismatched[:3]) + (f" (and {len(mismatched) - 3} more)" if len(mismatched) > 3 else ""), []
    return weights, resized


class _StateWriter:
    """Writes ``state.json`` after each epoch so that ``--resume`` knows where to continue."""

    def __init__(self, path: Path, config: dict[str, Any]) -> None:
        import keras

        outer = self

        class Callback(keras.callbacks.Callback):
            def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
                outer.history.append({"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}})
                state = {"epoch": epoch + 1, "history": outer.history, "config": config}
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(state, indent=2))
                tmp.replace(path)

        self.history: list[dict[str, float]] = []
        if path.exists():
            self.history = json.loads(path.read_text()).get("history", [])
        self.callback = Callback()


BATCHNORM_STATISTICS = ("moving_mean", "moving_variance")


def batchnorm_statistics(model: Any) -> list[Any]:
    """``model``'s batch-norm moving means and variances (not its other non-trainable state, such as seeds)."""
    return [v for v in model.non_trainable_variables if v.path.rsplit("/", 1)[-1] in BATCHNORM_STATISTICS]


def _inner_optimizer(model: Any) -> Any:
    """``model``'s optimizer, unwrapped from a ``LossScaleOptimizer`` (``None`` if not compiled)."""
    optimizer = getattr(model, "optimizer", None)
    return getattr(optimizer, "inner_optimizer", optimizer)


def ema_momentum(model: Any) -> float | None:
    """The momentum with which ``model``'s optimizer averages the weights (``use_ema``), else ``None``."""
    optimizer = _inner_optimizer(model)
    return float(optimizer.ema_momentum) if getattr(optimizer, "use_ema", False) else None


@contextlib.contextmanager
def averaged_weights(model: Any, statistics: dict[str, np.ndarray] | None = None) -> Iterator[None]:
    """Inside the block, ``model`` holds averaged weights: its optimizer's moving averages (``use_ema``)
    in the trainable variables and, in the batch-norm statistics, the arrays of ``statistics``
    (variable path -> array, as kept by the ``--ema`` training callback).

    Both go together: the optimizer averages trainable variables only, and averaged weights with the
    raw statistics of the latest steps do not fit each other (a ResNet50 validated markedly worse that
    way than with matching statistics). What there is nothing to average for is left as it is. The raw
    values are put back on leaving, also on error.
    """
    optimizer = _inner_optimizer(model)
    averages = getattr(optimizer, "_model_variables_moving_average", None) if optimizer is not None else None
    pairs: list[tuple[Any, np.ndarray]] = []
    if getattr(optimizer, "use_ema", False) and averages:
        pairs += [(v, a.numpy()) for v, a in zip(optimizer._trainable_variables, averages)]
    if statistics:
        pairs += [(v, statistics[v.path]) for v in batchnorm_statistics(model) if v.path in statistics]
    if not pairs:
        yield
        return
    raw = [np.asarray(v.numpy()) for v, _ in pairs]
    for variable, average in pairs:
        variable.assign(average)
    try:
        yield
    finally:
        for (variable, _), value in zip(pairs, raw):
            variable.assign(value)


def _statistics_averaging_callback(momentum: float, path: Path, resume: bool) -> Any:
    """With ``--ema``: keeps moving averages of the batch-norm statistics next to the optimizer's
    averages of the weights, and swaps both in for validation (the role of Keras' ``SwapEMAWeights``,
    which swaps the weights only). Like the optimizer's, the averages start at the values after the
    first step. They are saved to ``path`` after every epoch and read back when ``resume``; at the end of
    training they are put into the model, as ``fit`` does with the averaged weights.
    """
    import keras

    class AverageStatistics(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.averages: dict[str, np.ndarray] = {}
            self._variables: list[Any] = []
            self._swap: contextlib.AbstractContextManager[None] | None = None
            self._started = False

        def on_train_begin(self, logs: dict[str, float] | None = None) -> None:
            self._variables = batchnorm_statistics(self.model)
            saved = dict(np.load(path)) if resume and path.exists() else {}
            self._started = bool(saved) and all(
                v.path in saved and saved[v.path].shape == tuple(v.shape) for v in self._variables)
            if resume and not self._started:
                log.warning("no batch-norm averages in %s to resume: they start again from now", path)
            self.averages = {v.path: np.array(saved[v.path] if self._started else v.numpy(), dtype=np.float32)
                             for v in self._variables}

        def on_train_batch_end(self, batch: int, logs: dict[str, float] | None = None) -> None:
            # Under JAX, fit keeps the variables in its own state and leaves the model's empty.
            if (sync := getattr(self.model, "jax_state_sync", None)) is not None:
                sync()
            weight = momentum if self._started else 0.0
            self._started = True
            for variable in self._variables:
                average = self.averages[variable.path]
                average *= weight
                average += (1.0 - weight) * np.asarray(variable.numpy(), dtype=np.float32)

        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            tmp = path.with_name(path.name + ".tmp.npz")
            np.savez(tmp, **self.averages)
            tmp.replace(path)

        def on_test_begin(self, logs: dict[str, float] | None = None) -> None:
            if self._swap is None:
                self._swap = averaged_weights(self.model, self.averages)
                self._swap.__enter__()

        def on_test_end(self, logs: dict[str, float] | None = None) -> None:
            if self._swap is not None:
                swap, self._swap = self._swap, None
                swap.__exit__(None, None, None)

        def on_train_end(self, logs: dict[str, float] | None = None) -> None:
            for variable in self._variables:
                variable.assign(self.averages[variable.path])

    return AverageStatistics()


def _best_weights_callback(path: Path, best: float, averaging: Any = None) -> Any:
    """Saves the weights (averaged ones with ``--ema``: ``averaging`` is the statistics callback)
    whenever validation accuracy improves."""
    import keras

    class BestWeights(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.best = best

        def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
            value = (logs or {}).get("val_accuracy")
            if value is None or value <= self.best:
                return
            self.best = float(value)
            with averaged_weights(self.model, averaging.averages if averaging is not None else None):
                self.model.save_weights(path)

    return BestWeights()


def train_classifier(config: ClassifierTrainConfig) -> Path:
    """Run a whole training and write the bundle; returns the bundle's path."""
    import keras

    from brainscan.data.kaggle import dataset_fingerprint, split_train_validation
    from brainscan.metrics.classification import classification_report
    from brainscan.models.bundle import save_bundle
    from brainscan.models.registry import build_model
    from brainscan.models.store import ModelStore
    from brainscan.preprocess.image2d import ImagePreprocessConfig
    from training.runtime import (build_metrics, build_optimizer, cosine_schedule, load_checkpoint, setup_runtime,
                                  wrap_optimizer)

    runtime = setup_runtime(config.seed, mixed_precision=config.mixed_precision)
    work = config.work_dir
    assert work is not None
    work.mkdir(parents=True, exist_ok=True)
    records = training_records(config.data, config.max_per_class, config.seed)
    train, val = split_train_validation(records, val_fraction=config.val_fraction, seed=config.seed)
    classes = list(KAGGLE_CLASSES)
    log.info("training images: %d, validation images: %d (duplicate-aware split)", len(train), len(val))
    preprocess_config = ImagePreprocessConfig(input_size=config.input_size, channels=3)
    global_batch = config.batch_size * runtime.replicas
    weights = class_weights(train, len(classes))
    teacher, teacher_record = (load_teacher(config.teacher, config.out, preprocess_config) if config.teacher
                               else (None, None))
    recipe = Recipe(crop_scale=config.crop_scale, mixup=config.mixup, cutmix=config.cutmix, teacher=teacher,
                    teacher_weight=config.teacher_weight)
    train_ds = make_dataset(train, preprocess_config, batch_size=global_batch, training=True, seed=config.seed,
                            weights=weights, recipe=recipe)
    val_ds = make_dataset(val, preprocess_config, batch_size=global_batch, training=False, seed=config.seed)

    arch_args = architecture_args(config.arch, config.input_size, config.preset, len(classes))
    steps_per_epoch = math.ceil(len(train) / global_batch)
    state_path, last_path = work / "state.json", work / "last.keras"
    best_path = work / "best.weights.h5"
    initial_epoch = 0
    init_record: dict[str, Any] | None = None
    with runtime.strategy.scope():
        if config.resume and last_path.exists() and state_path.exists():
            model = load_checkpoint(last_path)
            if upgrade_to_one_hot_loss(model):
                log.info("the checkpoint was compiled for integer labels: recompiled for one-hot targets")
            initial_epoch = int(json.loads(state_path.read_text())["epoch"])
            log.info("resuming from %s at epoch %d", last_path, initial_epoch)
        else:
            if config.resume:
                log.warning("--resume given but no checkpoint in %s: starting from scratch", work)
            model = build_model(config.arch, arch_args)
            if config.init_from:
                init_record = load_initial_weights(model, config.init_from, config, train + val)
            schedule = cosine_schedule(
                initial_learning_rate=config.learning_rate / 100,
                decay_steps=max(1, steps_per_epoch * (config.epochs - config.warmup_epochs)),
                warmup_target=config.learning_rate,
                warmup_steps=steps_per_epoch * config.warmup_epochs,
                alpha=0.01,
            )
            optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=config.weight_decay,
                                               clipnorm=1.0, use_ema=config.ema is not None,
                                               ema_momentum=config.ema or 0.99)
            # One-hot targets (soft with mixup or cutmix), smoothed by --label-smoothing.
            loss = keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing)
            model.compile(optimizer=wrap_optimizer(optimizer, runtime), loss=loss, metrics=["accuracy"])
            build_optimizer(model)

    # A resumed run averages as its checkpoint's optimizer does, whatever --ema says now.
    ema = ema_momentum(model)
    if ema != config.ema:
        log.warning("the checkpoint's optimizer %s; --ema %s is ignored",
                    f"averages the weights with momentum {ema}" if ema else "does not average the weights",
                    config.ema)
    config_dict = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}
    config_dict["ema"] = ema  # what the run did
    state = _StateWriter(state_path, config_dict)
    # The best checkpoint starts blind after a resume unless seeded with the past.
    best_so_far = -np.inf
    if best_path.exists() and initial_epoch > 0:
        best_so_far = max((h.get("val_accuracy", 0.0) for h in state.history), default=0.0)
    # With --ema, validation runs on the averaged weights and batch-norm statistics (swapped in for it,
    # then back); the best checkpoint holds them too.
    averaging = (_statistics_averaging_callback(ema, work / "batchnorm-averages.npz", initial_epoch > 0)
                 if ema is not None else None)
    callbacks = [
        *([averaging] if averaging is not None else []),
        keras.callbacks.ModelCheckpoint(last_path),
        _best_weights_callback(best_path, best_so_far, averaging),
        keras.callbacks.EarlyStopping(monitor="val_accuracy", mode="max", patience=config.patience),
        *([keras.callbacks.TensorBoard(log_dir=str(work / "tensorboard"))]
          if keras.backend.backend() == "tensorflow" else []),  # its summary writer is TensorFlow's
        state.callback,
    ]
    # Without tf.data (another Keras backend) the batches carry the class weights themselves.
    fit_class_weight = weights if keras.backend.backend() == "tensorflow" else None
    start = time.perf_counter()
    if initial_epoch < config.epochs:
        build_metrics(model, train_ds)
        model.fit(train_ds, validation_data=val_ds, epochs=config.epochs, initial_epoch=initial_epoch,
                  class_weight=fit_class_weight, callbacks=callbacks, shuffle=False,
                  verbose=1 if sys.stdout.isatty() else 2)
    train_seconds = time.perf_counter() - start
    if best_path.exists():
        model.load_weights(best_path)

    # The served path: the Classifier's compiled forward pass, with the flip TTA and temperature chosen
    # here on the validation images (TTA only if it classifies more of them right).
    from brainscan.inference.classifier import DEFAULT_BATCH_SIZE
    from brainscan.inference.classifier import Classifier
    from training.calibrate import calibrate_batches

    classifier = Classifier(model, preprocess=None, classes=classes, batch_size=DEFAULT_BATCH_SIZE)
    y_true = np.asarray([r.label_index for r in val], dtype=np.int64)
    calibration, probabilities = calibrate_batches(classifier, (np.asarray(x) for x, *_ in val_ds), y_true)
    report = classification_report(y_true, probabilities.astype(np.float64), classes)
    log.info("validation accuracy %.4f on %d images (as served)", report["accuracy"], len(val))

    store = ModelStore(config.out)
    bundle_dir = config.out / "classification" / config.arch / str(config.version)
    history = state.history
    save_bundle(
        model,
        bundle_dir,
        task="classification",
        architecture=config.arch,
        architecture_args=arch_args,
        preprocessing=preprocess_config,
        classes=classes,
        version=str(config.version),
        demo=config.preset == "tiny" or config.max_per_class is not None,
        metrics={"validation": report, "validation_images": len(val), "training_images": len(train),
                 "calibration": calibration},
        inference=classifier.manifest_inference(),
        training={
            "data_fingerprint": dataset_fingerprint(train + val),
            "data_description": f"Kaggle Brain Tumor MRI layout at {config.data} (Training split only)",
            "command": config.command,
            "epochs": config.epochs,
            "seed": config.seed,
            "config": config_dict,
            **({"init_from": init_record} if init_record else {}),
            **({"teacher": teacher_record} if teacher_record else {}),
            "epochs_run": len(history),
            "best_epoch": int(np.argmax([h.get("val_accuracy", 0.0) for h in history]) + 1) if history else None,
            "history": history,
            "train_seconds_this_run": round(train_seconds, 1),
            "devices": {"gpus": runtime.gpus, "replicas": runtime.replicas,
                        "mixed_precision": runtime.mixed_precision},
        },
        weights_dtype=config.weights_dtype,
    )
    if config.promote:
        store.promote("classification", config.arch, str(config.version))
    return bundle_dir
