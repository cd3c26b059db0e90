"""The classifier's training data: the Kaggle Training split, the tf.data pipeline (decode with the served
preprocessing, cache, augment, batch, mix, prefetch), its in-memory twin for Keras backends without tf.data
(JAX on a GPU machine), and the balanced class weights.

Labels are one-hot, so that the recipe options that make targets soft (label smoothing in the loss,
mixup and cutmix here: :class:`Recipe`) train through the same loss as plain runs."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from brainscan.errors import DatasetLayoutError
from brainscan.labels import KAGGLE_CLASSES
from training.distill import distilled_targets
from training.runtime import without_autotune

log = logging.getLogger("training.classifier")  # the trainer's: its dataset warnings read as before


@dataclass(frozen=True)
class Recipe:
    """The data side of a training recipe (``brainscan train classifier`` options of the same names).

    Attributes:
        crop_scale: random resized crops: shift, then zoom in on S..1 of the side, per axis.
        mixup: Beta parameter of mixup (Zhang et al. 2018), or ``None``.
        cutmix: box-size factor of cutmix (Yun et al. 2019), or ``None``; with mixup, batches alternate.
        teacher: ``batch -> probabilities`` of a teacher (:func:`training.distill.load_teacher`), or ``None``.
        teacher_weight: the teacher's share of each target (the last step, after mixing).
    """

    crop_scale: float | None = None
    mixup: float | None = None
    cutmix: float | None = None
    teacher: Callable[[np.ndarray], np.ndarray] | None = None
    teacher_weight: float = 0.0


def training_records(data: Path, max_per_class: int | None, seed: int) -> list[Any]:
    """Records of the Training split of a Kaggle-layout folder (never Testing)."""
    from brainscan.data.kaggle import read_kaggle_folder
    from brainscan.data.kaggle import training_records as select

    dataset = read_kaggle_folder(data)
    for problem in dataset.problems:
        log.warning("dataset: %s", problem)
    return select(dataset, max_per_class=max_per_class, seed=seed)


def make_dataset(records: list[Any], preprocess_config: Any, *, batch_size: int, training: bool, seed: int,
                 weights: dict[int, float] | None = None, recipe: Recipe | None = None):
    """tf.data pipeline: parallel decode + shared preprocessing, cache, (augment, mix), batch, prefetch.

    Under another Keras backend (JAX on a GPU machine without TensorFlow) the same batches come from
    :func:`array_batches` instead, with ``weights`` (the class weights) as per-image sample weights.

    Returns:
        A ``tf.data.Dataset`` of ``(images (B, S, S, C) float32, one-hot labels (B, K) float32)``.
    """
    import keras

    recipe = recipe or Recipe()
    if keras.backend.backend() != "tensorflow":
        return array_batches(records, preprocess_config, batch_size=batch_size, training=training, seed=seed,
                             weights=weights if training else None, recipe=recipe)
    import tensorflow as tf

    from brainscan.preprocess.image2d import preprocess_image

    size, channels = preprocess_config.input_size, preprocess_config.channels

    def load(path: bytes) -> np.ndarray:
        return preprocess_image(Path(path.decode()).read_bytes(), preprocess_config).astype(np.float32)

    def decode(path: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        image = tf.numpy_function(load, [path], tf.float32, stateful=False)
        image.set_shape((size, size, channels))
        return image, label

    paths = [str(r.path) for r in records]
    labels = one_hot_labels(records)
    dataset = tf.data.Dataset.from_tensor_slices((paths, labels))
    dataset = dataset.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).cache()
    if training:
        dataset = dataset.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
        augment = build_augmentation(seed, preprocess_config.normalization, recipe.crop_scale)
        dataset = dataset.batch(batch_size).map(
            lambda x, y: (augment(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE
        )
        mix = build_mixing(seed, recipe)
        if mix is not None:  # batch n gets mixer n % 2 when both are on
            dataset = dataset.enumerate().map(
                lambda n, batch: tf.cond(n % 2 == 0, lambda: mix(*batch, 0), lambda: mix(*batch, 1)),
                num_parallel_calls=tf.data.AUTOTUNE)
        if recipe.teacher is not None:  # one teacher call at a time, on the batch as the student sees it
            def distil(x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
                # stateful: a stateless function would let tf.data's map parallelisation run teacher calls
                # concurrently, out of order
                taught = tf.numpy_function(recipe.teacher, [x], tf.float32, stateful=True)
                taught.set_shape(y.shape)
                return x, distilled_targets(y, taught, recipe.teacher_weight)

            dataset = dataset.map(distil)
    else:
        dataset = dataset.batch(batch_size)
    return without_autotune(dataset.prefetch(tf.data.AUTOTUNE))


def one_hot_labels(records: list[Any]) -> np.ndarray:
    """``(N, K)`` float32 one-hot labels of the records (K = the Kaggle classes)."""
    return np.eye(len(KAGGLE_CLASSES), dtype=np.float32)[[r.label_index for r in records]]


def preprocess_all(records: list[Any], preprocess_config: Any, workers: int = 8) -> np.ndarray:
    """Every record's image through the served preprocessing, ``(N, S, S, C)`` float32 (OpenCV
    releases the GIL, so threads decode in parallel)."""
    from concurrent.futures import ThreadPoolExecutor

    from brainscan.preprocess.image2d import preprocess_image

    def load(record: Any) -> np.ndarray:
        return preprocess_image(Path(record.path).read_bytes(), preprocess_config).astype(np.float32)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return np.stack(list(pool.map(load, records)))


def array_batches(records: list[Any], preprocess_config: Any, *, batch_size: int, training: bool, seed: int,
                  weights: dict[int, float] | None = None, recipe: Recipe | None = None) -> Any:
    """The batches of :func:`make_dataset` without tf.data, as a ``keras.utils.PyDataset``.

    The images are preprocessed once, in memory; training batches are reshuffled every epoch (seeded)
    and augmented by the same Keras layers (:func:`build_augmentation`). Training batches carry the
    class weights as sample weights (Keras takes ``class_weight`` only with tf.data or arrays).
    Iterating it yields ``(images, labels)`` (and ``sample weights`` when ``weights`` is given).
    """
    import keras

    recipe = recipe or Recipe()
    images = preprocess_all(records, preprocess_config)
    labels = one_hot_labels(records)
    augment = build_augmentation(seed, preprocess_config.normalization, recipe.crop_scale) if training else None
    mix = build_mixing(seed, recipe) if training else None
    per_image = (np.asarray([weights[r.label_index] for r in records], dtype=np.float32)
                 if weights is not None else None)

    class ArrayBatches(keras.utils.PyDataset):
        def __init__(self) -> None:
            super().__init__()
            self.epoch = 0
            self.order = self._order()

        def _order(self) -> np.ndarray:
            if not training:
                return np.arange(len(labels))
            return np.random.default_rng([seed, self.epoch]).permutation(len(labels))

        def __len__(self) -> int:
            return -(-len(labels) // batch_size)

        def __getitem__(self, number: int) -> tuple[np.ndarray, ...]:
            if not 0 <= number < len(self):
                raise IndexError(number)  # ends a plain `for` over the batches
            chosen = self.order[number * batch_size:(number + 1) * batch_size]
            batch, targets = images[chosen], labels[chosen]
            if augment is not None:
                batch = np.asarray(augment(batch, training=True), dtype=np.float32)
            if mix is not None:
                batch, targets = (np.asarray(a, dtype=np.float32) for a in mix(batch, targets, number % 2))
            if recipe.teacher is not None and training:
                targets = distilled_targets(targets, recipe.teacher(batch), recipe.teacher_weight)
            if per_image is None:
                return batch, targets
            return batch, targets, per_image[chosen]

        def on_epoch_end(self) -> None:
            self.epoch += 1
            self.order = self._order()

    return ArrayBatches()


def build_augmentation(seed: int, normalization: str, crop_scale: float | None = None):
    """Flips, small rotations (+-10 degrees) and zoom (+-10 %), brightness and contrast jitter; with
    ``crop_scale`` S first a random resized crop: a shift of up to (1 - S) / 2 of the side, then a zoom
    in onto S..1 of it per axis (aspect ratio included). Where the shift is larger than the zoom's
    margin the border fills with black, the slice's own background (as after a rotation)."""
    import keras

    crop = []
    if crop_scale is not None:
        margin = 1.0 - crop_scale
        crop = [keras.layers.RandomTranslation(margin / 2, margin / 2, fill_mode="constant", seed=seed + 5),
                keras.layers.RandomZoom((-margin, 0.0), (-margin, 0.0), fill_mode="constant", seed=seed + 6)]
    layers = [
        *crop,
        keras.layers.RandomFlip("horizontal", seed=seed),
        keras.layers.RandomRotation(10 / 360, fill_mode="constant", seed=seed + 1),
        keras.layers.RandomZoom(0.1, fill_mode="constant", seed=seed + 2),
        keras.layers.RandomContrast(0.2, seed=seed + 3),
    ]
    if normalization == "zero_one":
        layers.append(keras.layers.RandomBrightness(0.1, value_range=(0.0, 1.0), seed=seed + 4))
    return keras.Sequential(layers, name="augmentation")


def build_mixing(seed: int, recipe: Recipe) -> Callable[[Any, Any, int], tuple[Any, Any]] | None:
    """``mix(images, one_hot_labels, n) -> (images, soft labels)`` with mixup and/or cutmix (Keras' layers),
    the n-th of them (mod their number) when both are on; ``None`` when neither is."""
    import keras

    # float32 whatever the policy: under mixed precision their sampling and the targets stay exact.
    mixers = [*([keras.layers.MixUp(alpha=recipe.mixup, seed=seed + 7, dtype="float32")] if recipe.mixup else []),
              *([keras.layers.CutMix(factor=recipe.cutmix, seed=seed + 8, dtype="float32")] if recipe.cutmix else [])]
    if not mixers:
        return None

    def mix(images: Any, labels: Any, n: int) -> tuple[Any, Any]:
        out = mixers[n % len(mixers)]({"images": images, "labels": labels}, training=True)
        return out["images"], out["labels"]

    return mix


def upgrade_to_one_hot_loss(model: Any) -> bool:
    """Recompile a checkpoint that an older brainscan compiled for integer labels (sparse cross-entropy)
    for the one-hot targets the data now yields, keeping its optimizer and its state; returns whether it
    did. The loss is the same number for one-hot targets, so a resumed run goes on as it would have."""
    import keras

    if model.loss not in ("sparse_categorical_crossentropy", keras.losses.sparse_categorical_crossentropy) and \
            not isinstance(model.loss, keras.losses.SparseCategoricalCrossentropy):
        return False
    model.compile(optimizer=model.optimizer, loss=keras.losses.CategoricalCrossentropy(), metrics=["accuracy"])
    return True


def class_weights(records: list[Any], num_classes: int) -> dict[int, float]:
    """Balanced class weights ``n / (K * n_k)`` from the training records."""
    counts = np.bincount([r.label_index for r in records], minlength=num_classes).astype(np.float64)
    if np.any(counts == 0):
        missing = [KAGGLE_CLASSES[i] for i in np.flatnonzero(counts == 0)]
        raise DatasetLayoutError(f"the training split has no images of class(es) {missing}")
    return {i: float(counts.sum() / (num_classes * c)) for i, c in enumerate(counts)}
