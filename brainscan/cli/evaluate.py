"""``brainscan evaluate``: run a model bundle on a labelled dataset and write a report folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from brainscan.cli.arguments import overlap_fraction, positive_int
from brainscan.models.precision import PRECISIONS
from brainscan.cli.output import progress_bar
from brainscan.models.store import resolve_bundle


def register(subparsers: argparse._SubParsersAction) -> None:
    evaluate = subparsers.add_parser(
        "evaluate", help="measure a model bundle on a labelled dataset and write a report",
        description=(
            "Run BUNDLE on every labelled item of DATA_DIR and write REPORT_DIR/report.json (all metrics, "
            "the bundle's name, version and demo flag, counts, timings), report.md (tables) and figures. "
            "Classifiers take a Kaggle-layout folder (Training|Testing/<class>/*.jpg; every split present is "
            "reported on its own) and write confusion_matrix.png, per_class_metrics.png and predictions.csv. "
            "Segmenters take a BraTS dataset (or case) folder with <case>_seg files (or BraTS 2023-2024 "
            "<case>-seg files, whose label 3 is read as enhancing tumour) and write "
            "dice_boxplot.png and per_case.csv (Dice, IoU, sensitivity, specificity, HD95, volumes per "
            "region WT/TC/ET). Exit status 2 when DATA_DIR does not fit the bundle's task."
        ),
        epilog="examples: 'brainscan evaluate models/classification/resnet50/1 data/kaggle --out reports/resnet50'; "
               "the figures the README quotes: 'brainscan evaluate resnet50 ../shared/data/brain-tumor-mri "
               "--validation-split --out reports/resnet50-val'",
    )
    evaluate.add_argument("bundle", help="model bundle folder, or ARCH / TASK/ARCH for the current version "
                                         "in the model store")
    evaluate.add_argument("data_dir", type=Path, metavar="DATA_DIR", help="labelled dataset folder")
    evaluate.add_argument("--out", type=Path, required=True, metavar="REPORT_DIR", help="report folder (created)")
    evaluate.add_argument("--batch-size", type=positive_int, default=None,
                          help="classification: images per network call (default: the bundle's)")
    evaluate.add_argument("--limit", type=positive_int, default=None, metavar="N",
                          help="at most N images per split (a fixed random sample) or the first N cases")
    evaluate.add_argument("--validation-split", action="store_true",
                          help="classification: evaluate only the duplicate-aware validation split the bundle was "
                               "selected on, rebuilt from DATA_DIR (its Training data) with the manifest's seed and "
                               "fraction; refused when DATA_DIR is not the data it was trained on")
    evaluate.add_argument("--overlap", type=overlap_fraction, default=None,
                          help="segmentation: sliding-window overlap in [0, 1) (default: the bundle's)")
    evaluate.add_argument("--precision", choices=PRECISIONS, default="auto",
                          help="segmentation: the network's arithmetic (default auto: bfloat16 where the CPU has "
                               "it natively, as the segmenter worker serves it)")
    evaluate.add_argument("--save-masks", action="store_true",
                          help="segmentation: also write each predicted mask to REPORT_DIR/masks/, in the label "
                               "convention of its case (enhancing tumour 3 for BraTS 2023-2024 cases)")
    evaluate.add_argument("--models-root", type=Path, default=None,
                          help="model store for ARCH / TASK/ARCH (default: $BRAINSCAN_MODELS or ./models)")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluate.set_defaults(func=run_evaluate)


class _Progress:
    """tqdm bars on stderr: images for classifiers, cases (with patches as postfix) for segmenters."""

    def __init__(self, quiet: bool) -> None:
        self._bar = progress_bar(quiet=quiet, unit="item")
        self._case = -1

    def images(self, done: int, total: int) -> None:
        self._bar.unit, self._bar.total = "img", total
        self._bar.update(done - self._bar.n)

    def cases(self, index: int, n_cases: int, done: int, total: int) -> None:
        self._bar.unit, self._bar.total = "case", n_cases
        self._bar.set_postfix_str(f"case {index + 1}: patch {done}/{total}", refresh=False)
        self._bar.update(index + (done == total) - self._bar.n)

    def close(self) -> None:
        self._bar.close()


def run_evaluate(args: argparse.Namespace) -> int:
    from brainscan.evaluation.report import evaluate, summary_lines
    from brainscan.models.bundle import read_spec

    bundle_path = resolve_bundle(args.bundle, models_root=args.models_root)
    print(f"evaluating {read_spec(bundle_path).name} ({bundle_path}) on {args.data_dir}", file=sys.stderr)
    progress = _Progress(args.quiet)
    try:
        report: dict[str, Any] = evaluate(
            bundle_path, args.data_dir, args.out, batch_size=args.batch_size, limit=args.limit,
            inference={"overlap": args.overlap}, save_masks=args.save_masks,
            image_progress=progress.images, case_progress=progress.cases, validation_split=args.validation_split,
            precision=args.precision,
        )
    finally:
        progress.close()
    for warning in report["warnings"]:
        print(f"WARNING: {warning}", file=sys.stderr)
    print("\n".join(summary_lines(report)))
    print(f"report written to {args.out}/report.md (report.json, figures)")
    return 0
