"""What the classifier training tests share: the phantom data set, its sizes and the training command.

Imported by tests/training/test_classifier_training.py (the convergence runs and what builds on them)
and tests/training/test_classifier_options.py (option plumbing); two files so that two test workers
can run them at once.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from brainscan.data.phantoms.kaggle import write_kaggle_phantoms

# Phantoms are written at twice the network's input size, as real slices are larger than the input.
INPUT_SIZE, PHANTOM_SIZE = 64, 128
TRAIN_IMAGES, HELD_OUT_IMAGES = 800, 400
EPOCHS = 30
# Per architecture: peak learning rate that learns within EPOCHS on 2 CPU cores (about 1-2 min each).
LEARNING_RATES = {"resnet50": "0.005", "vit_cnn": "0.003"}


@pytest.fixture(scope="module")
def kaggle_phantoms(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kaggle")
    write_kaggle_phantoms(root, n=TRAIN_IMAGES, seed=0, size=PHANTOM_SIZE)
    return root


def train_command(data: Path, arch: str, out: Path, work: Path, *extra: str) -> list[str]:
    return ["train", "classifier", "--data", str(data), "--arch", arch, "--preset", "tiny",
            "--input-size", str(INPUT_SIZE), "--epochs", str(EPOCHS), "--batch-size", "16",
            "--learning-rate", LEARNING_RATES[arch], "--patience", str(EPOCHS), "--out", str(out),
            "--work-dir", str(work), "--version", "test-1", "--promote", *extra]
