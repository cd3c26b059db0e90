"""Distillation of a classifier from a teacher bundle (``brainscan train classifier --teacher BUNDLE``).

A hybrid ViT on a few thousand images needs a teacher (Touvron et al. 2021, DeiT): here the training
targets become ``(1 - W) x label + W x teacher`` (``--teacher-weight W``), where ``teacher`` is the
teacher bundle's served probabilities (its test-time augmentation and temperature, through
:class:`~brainscan.inference.classifier.Classifier`) on the very batch the student trains on: after
augmentation, crops and mixing, so that the teacher tells the student what it sees in each augmented
image, not only what the label says. The teacher runs once per training batch (about a third of a
ResNet50 training step on a CPU).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from brainscan.errors import BundleError
from brainscan.labels import KAGGLE_CLASSES

log = logging.getLogger("training.classifier")


def load_teacher(spec: str, models_root: Any, student_preprocessing: Any
                 ) -> tuple[Callable[[np.ndarray], np.ndarray], dict[str, Any]]:
    """The teacher's served probabilities of a batch of the student's preprocessed images, and what the
    student's manifest records of it.

    Args:
        spec: a classifier bundle folder, or ARCH for the current version under ``models_root``.
        models_root: the model store of the run (``--out``).
        student_preprocessing: the student's ``ImagePreprocessConfig``; the teacher must normalise
            images the same way (its input size may differ: batches are resized for it).

    Raises:
        BundleError: not a classifier of the Kaggle classes, or another normalisation or channel count.
    """
    import cv2

    from brainscan.inference.classifier import Classifier
    from brainscan.models.bundle import load_bundle, preprocessor_from_manifest, read_spec
    from brainscan.models.store import resolve_bundle

    path = resolve_bundle(spec, task="classification", models_root=models_root)
    manifest = read_spec(path)  # checked before the weights are read
    name = f"{manifest.architecture.name} version {manifest.version} ({path})"
    if list(manifest.classes or ()) != list(KAGGLE_CLASSES):
        raise BundleError(f"--teacher {name}: classes {list(manifest.classes or ())}, expected {list(KAGGLE_CLASSES)}")
    theirs, ours = preprocessor_from_manifest(manifest)[0], student_preprocessing
    differ = [field for field in ("channels", "normalization", "crop_to_head") if getattr(theirs, field) != getattr(ours, field)]
    if differ:
        raise BundleError(f"--teacher {name}: its images differ from this run's in {', '.join(differ)} "
                          f"({[getattr(theirs, f) for f in differ]} against {[getattr(ours, f) for f in differ]})")
    bundle = load_bundle(path)
    classifier = Classifier.from_bundle(bundle)
    size = int(theirs.input_size)

    def teach(batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch, dtype=np.float32)
        if batch.shape[1:3] != (size, size):
            interpolation = cv2.INTER_AREA if batch.shape[1] > size else cv2.INTER_LINEAR
            batch = np.stack([cv2.resize(image, (size, size), interpolation=interpolation).reshape(size, size, -1)
                              for image in batch])
        return classifier.probabilities(batch).astype(np.float32)

    log.info("distilling from %s (TTA %s, temperature %.3g)", name, list(classifier.tta) or "none",
             classifier.temperature)
    record = {"bundle": str(path), "name": bundle.name, "version": bundle.version,
              "weights_sha256": bundle.spec.weights.sha256, "input_size": size,
              "tta": list(classifier.tta), "temperature": classifier.temperature}
    return teach, record


def distilled_targets(labels: Any, teacher_probabilities: Any, weight: float) -> Any:
    """``(1 - weight) x labels + weight x teacher_probabilities`` (both ``(B, K)``, rows summing to 1)."""
    return (1.0 - weight) * labels + weight * teacher_probabilities


__all__ = ["distilled_targets", "load_teacher"]
