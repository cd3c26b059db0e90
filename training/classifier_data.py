"""The classifier's training data: the Kaggle Training split, the tf.data pipeline (decode with the served
preprocessing, cache, augment, batch, prefetch) and the balanced class weights."""

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


def make_dataset(records: list[Any], preprocess_config: Any, *, batch_size: int, training: bool, seed: int):
    """tf.data pipeline: parallel decode + shared preprocessing, cache, (augment), batch, prefetch.

    Returns:
        A ``tf.data.Dataset`` of ``(images (B, S, S, C) float32, labels (B,) int32)``.
    """
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
