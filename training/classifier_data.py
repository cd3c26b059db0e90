"""The classifier's training data: the Kaggle Training split, the tf.data pipeline (decode with the served
preprocessing, cache, augment, batch, prefetch), its in-memory twin for Keras backends without tf.data
(JAX on a GPU machine), and the balanced class weights."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from brainscan.errors import DatasetLayoutError
from brainscan.labels import KAGGLE_CLASSES

log = logging.getLogger("training.classifier")  # the trainer's: its dataset warnings read as before


def training_records(data: Path, max_per_class: int | None, seed: int) -> list[Any]:
    """Records of the Training split of a Kaggle-layout folder (never Testing)."""
    from brainscan.data.kaggle import read_kaggle_folder
    from brainscan.data.kaggle import training_records as select

    dataset = read_kaggle_folder(data)
    for problem in dataset.problems:
        log.warning("dataset: %s", problem)
    return select(dataset, max_per_class=max_per_class, seed=seed)


def make_dataset(records: list[Any], preprocess_config: Any, *, batch_size: int, training: bool, seed: int,
                 weights: dict[int, float] | None = None):
    """tf.data pipeline: parallel decode + shared preprocessing, cache, (augment), batch, prefetch.

    Under another Keras backend (JAX on a GPU machine without TensorFlow) the same batches come from
    :func:`array_batches` instead, with ``weights`` (the class weights) as per-image sample weights.

    Returns:
        A ``tf.data.Dataset`` of ``(images (B, S, S, C) float32, labels (B,) int32)``.
    """
    import keras

    if keras.backend.backend() != "tensorflow":
        return array_batches(records, preprocess_config, batch_size=batch_size, training=training, seed=seed,
                             weights=weights if training else None)
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
    labels = np.asarray([r.label_index for r in records], dtype=np.int32)
    dataset = tf.data.Dataset.from_tensor_slices((paths, labels))
    dataset = dataset.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).cache()
    if training:
        dataset = dataset.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
        augment = build_augmentation(seed, preprocess_config.normalization)
        dataset = dataset.batch(batch_size).map(
            lambda x, y: (augment(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE
        )
    else:
        dataset = dataset.batch(batch_size)
    return dataset.prefetch(tf.data.AUTOTUNE)


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
                  weights: dict[int, float] | None = None) -> Any:
    """The batches of :func:`make_dataset` without tf.data, as a ``keras.utils.PyDataset``.

    The images are preprocessed once, in memory; training batches are reshuffled every epoch (seeded)
    and augmented by the same Keras layers (:func:`build_augmentation`). Training batches carry the
    class weights as sample weights (Keras takes ``class_weight`` only with tf.data or arrays).
    Iterating it yields ``(images, labels)`` (and ``sample weights`` when ``weights`` is given).
    """
    import keras

    images = preprocess_all(records, preprocess_config)
    labels = np.asarray([r.label_index for r in records], dtype=np.int32)
    augment = build_augmentation(seed, preprocess_config.normalization) if training else None
    per_image = (np.asarray([weights[int(label)] for label in labels], dtype=np.float32)
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
            batch = images[chosen]
            if augment is not None:
                batch = np.asarray(augment(batch, training=True), dtype=np.float32)
            if per_image is None:
                return batch, labels[chosen]
            return batch, labels[chosen], per_image[chosen]

        def on_epoch_end(self) -> None:
            self.epoch += 1
            self.order = self._order()

    return ArrayBatches()


def build_augmentation(seed: int, normalization: str):
    """Flips, small rotations (+-10 degrees) and zoom (+-10 %), brightness and contrast jitter."""
    import keras

    layers = [
        keras.layers.RandomFlip("horizontal", seed=seed),
        keras.layers.RandomRotation(10 / 360, fill_mode="constant", seed=seed + 1),
        keras.layers.RandomZoom(0.1, fill_mode="constant", seed=seed + 2),
        keras.layers.RandomContrast(0.2, seed=seed + 3),
    ]
    if normalization == "zero_one":
        layers.append(keras.layers.RandomBrightness(0.1, value_range=(0.0, 1.0), seed=seed + 4))
    return keras.Sequential(layers, name="augmentation")


def class_weights(records: list[Any], num_classes: int) -> dict[int, float]:
    """Balanced class weights ``n / (K * n_k)`` from the training records."""
    counts = np.bincount([r.label_index for r in records], minlength=num_classes).astype(np.float64)
    if np.any(counts == 0):
        missing = [KAGGLE_CLASSES[i] for i in np.flatnonzero(counts == 0)]
        raise DatasetLayoutError(f"the training split has no images of class(es) {missing}")
    return {i: float(counts.sum() / (num_classes * c)) for i, c in enumerate(counts)}
