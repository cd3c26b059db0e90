"""``brainscan metrics``: score a predicted segmentation against the ground truth."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from brainscan.cli.arguments import command_group
from brainscan.cli.output import fmt, print_json, table
from brainscan.errors import InvalidLabelsError, VolumeMismatchError
from brainscan.labels import BRATS2021, LABEL_CONVENTIONS


_SEGMENTATION_DESCRIPTION = (
    "Compare a predicted mask with the ground-truth segmentation (both NIfTI with BraTS labels "
    "0/1/2/4 on the same grid). Prints, for the regions WT (whole tumour: 1,2,4), TC (tumour "
    "core: 1,4) and ET (enhancing tumour: 4) and for each label: Dice (1.0 when both are "
    "empty, as BraTS scores it), IoU, sensitivity, specificity, HD95 in mm (from the voxel "
    "spacing; n/a when exactly one side is empty) and volumes in mL. Files of the BraTS 2023-2024 "
    "convention (enhancing tumour 3) are scored alike: see --label-convention."
)


def register(subparsers: argparse._SubParsersAction) -> None:
    _, commands = command_group(subparsers, "metrics", help="compute evaluation metrics",
                                description="Compute evaluation metrics for predictions.")
    seg = commands.add_parser(
        "segmentation",
        help="Dice, IoU, HD95 and volumes of a predicted mask against a BraTS seg file",
        description=_SEGMENTATION_DESCRIPTION,
    )
    seg.add_argument("--pred", type=Path, required=True, help="predicted mask (.nii or .nii.gz)")
    seg.add_argument("--truth", type=Path, required=True, help="ground truth, e.g. <case>_seg.nii.gz")
    seg.add_argument("--label-convention", choices=("auto", *LABEL_CONVENTIONS), default="auto",
                     help="labels of both files: brats2021 (0/1/2/4) or brats2023 (0/1/2/3, enhancing tumour 3); "
                          "auto (default): brats2023 when --truth is named like <case>-seg.nii.gz (BraTS "
                          "2023-2024), else brats2021")
    seg.add_argument("--json", action="store_true", help="print JSON instead of a table")
    seg.set_defaults(func=run_segmentation)


def run_segmentation(args: argparse.Namespace) -> int:
    from brainscan.data.brats import match_case_file
    from brainscan.io.nifti import load_nifti
    from brainscan.labels import from_convention
    from brainscan.metrics.segmentation import segmentation_metrics

    pred = load_nifti(args.pred)
    truth = load_nifti(args.truth)
    if pred.shape != truth.shape:
        raise VolumeMismatchError(f"prediction shape {pred.shape} differs from ground truth shape {truth.shape}")
    if not np.allclose(pred.affine, truth.affine, atol=1e-3):
        raise VolumeMismatchError("prediction and ground truth are on different grids (their affines differ)")
    convention = args.label_convention
    if convention == "auto":
        named = match_case_file(args.truth.name)
        convention = named.label_convention if named is not None else BRATS2021
    labels = {}
    for name, path, volume in (("prediction", args.pred, pred), ("ground truth", args.truth, truth)):
        try:
            labels[name] = from_convention(np.rint(volume.data), convention)
        except InvalidLabelsError as exc:
            raise InvalidLabelsError(f"{name} {path.name}: {exc.message}") from exc
    result = segmentation_metrics(labels["prediction"], labels["ground truth"], spacing=truth.spacing)
    result["label_convention"] = convention
    if args.json:
        print_json(result)
        return 0
    rows = []
    for region in ("WT", "TC", "ET"):
        m = result[region]
        rows.append([region, fmt(m["dice"]), fmt(m["iou"]), fmt(m["sensitivity"]), fmt(m["specificity"]),
                     fmt(m["hd95"], 2), fmt(m["volume_ml"], 2), fmt(m["volume_ml_truth"], 2)])
    print(table(["region", "dice", "iou", "sensitivity", "specificity", "hd95_mm", "pred_mL", "truth_mL"], rows))
    print(f"mean IoU: {fmt(result['mean_iou'])}")
    return 0
