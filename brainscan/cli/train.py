"""``brainscan train``: train the classifiers and the segmenters (code in the ``training`` package)."""

from __future__ import annotations

import argparse

from brainscan.cli.arguments import command_group


def register(subparsers: argparse._SubParsersAction) -> None:
    _, commands = command_group(subparsers, "train",
                                help="train a classifier or a segmenter and write a model bundle",
                                description="Train a model from scratch and write a bundle into the model store.")

    # Each trainer's options are its config dataclass's fields (training.options builds both parsers).
    from training.classifier_cli import add_classifier_parser
    from training.segmenter_cli import (
        add_cv_summary_parser,
        add_ensemble_parser,
        add_pack_parser,
        add_segmenter_parser,
    )

    add_classifier_parser(commands)
    add_segmenter_parser(commands)
    add_pack_parser(commands)
    add_cv_summary_parser(commands)
    add_ensemble_parser(commands)
