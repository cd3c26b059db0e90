"""What the classifier training tests share: the phantom data set, its sizes and the training command.

Imported by tests/training/test_classifier_training.py (the convergence runs and what builds on them)
and tests/training/test_classifier_options.py (option plumbing); two files so that two test workers
can run them at once.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from brainscan.data.phantoms.kaggle import write_kaggle_phantoms

# Phantoms are written larger than the network's input, as real slices are larger than the input.
# 48 px converges as well as 64 px did, on fewer pixels a step (`bench/test_epochs.py --input-size`).
INPUT_SIZE, PHANTOM_SIZE = 48, 128
TRAIN_IMAGES, HELD_OUT_IMAGES = 800, 400
# Per architecture: epochs and peak learning rate of the convergence runs (under a minute each on one core).
# Held-out accuracy (`python bench/test_epochs.py`, one core; bar: 0.36), at 48 px: resnet50 0.525
# after 15 epochs (2026-12-06), 0.505 (2026-12-07); vit_cnn 0.470 after 20 and 0.465 after 30
# (2026-12-06), 0.463 after 20 in 35 s (2026-12-07). ResNet50's run is fixed cost (10 epochs: 19 s,
# 15: 21 s), so it keeps its 15.
EPOCHS = {"resnet50": 15, "vit_cnn": 20}
LEARNING_RATES = {"resnet50": "0.005", "vit_cnn": "0.003"}


@pytest.fixture(scope="module")
def kaggle_phantoms(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kaggle")
    write_kaggle_phantoms(root, n=TRAIN_IMAGES, seed=0, size=PHANTOM_SIZE)
    return root


def train_command(data: Path, arch: str, out: Path, work: Path, *extra: str) -> list[str]:
    return ["train", "classifier", "--data", str(data), "--arch", arch, "--preset", "tiny",
            "--input-size", str(INPUT_SIZE), "--epochs", str(EPOCHS[arch]), "--batch-size", "16",
            "--learning-rate", LEARNING_RATES[arch], "--patience", str(EPOCHS[arch]), "--out", str(out),
            "--work-dir", str(work), "--version", "test-1", "--promote", *extra]
