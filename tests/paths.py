"""Paths to optional real data, and skip markers for tests that need it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BRAINSCAN_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
KAGGLE_TRAINING = SHARED_DATA / "brain-tumor-mri" / "Training"
BRATS_SAMPLE = SHARED_DATA / "brats-sample" / "BraTS2021_00006"

needs_kaggle = pytest.mark.skipif(
    not KAGGLE_TRAINING.is_dir(), reason=f"real Kaggle data not found at {KAGGLE_TRAINING}"
)
needs_brats_sample = pytest.mark.skipif(
    not BRATS_SAMPLE.is_dir(), reason=f"real BraTS case not found at {BRATS_SAMPLE}"
)
