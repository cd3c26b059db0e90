"""``brainscan train classifier``: the command around :func:`training.classifier.train_classifier`.

The options are the fields of :class:`~training.classifier_config.ClassifierTrainConfig` (help texts
included), turned into a parser by :mod:`training.options` exactly as the segmenter's
(:mod:`training.segmenter_cli`); this module adds the command's description. Nothing here imports
TensorFlow, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse

from training.classifier_config import ClassifierTrainConfig
from training.options import add_trainer_parser, run_trainer

_DESCRIPTION = (
    "Train a 4-class tumour classifier (glioma, meningioma, notumor, pituitary) from scratch on "
    "the Training split of a Kaggle Brain Tumor MRI folder, with a duplicate-aware stratified "
    "validation split, and write the bundle to OUT/classification/ARCH/VERSION/. A checkpoint is "
    "written after every epoch into --work-dir; rerun with --resume to continue an interrupted "
    "run. Uses every GPU present (mixed precision) and runs unchanged on CPU."
)


def add_classifier_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``classifier`` to the ``brainscan train`` subcommands; returns its parser."""
    return add_trainer_parser(
        commands, "classifier", ClassifierTrainConfig, run_classifier,
        help="train ResNet50 or the hybrid ViT-CNN on a Kaggle-layout folder", description=_DESCRIPTION,
    )


def run_classifier(args: argparse.Namespace) -> int:
    from training.classifier import train_classifier

    return run_trainer(args, ClassifierTrainConfig, train_classifier, "classifier")
