"""Validation Dice against the number of training cases: is more data what the segmenter needs?

Reads the manifests of segmentation bundles trained with one recipe on different numbers of cases
(``brainscan train segmenter ... --train-cases N``, or data folders of N cases) and prints, per
bundle, the number of training cases, the validation cases, and the validation Dice (WT, TC, ET and
their mean) at every epoch where it was measured. Not a test: it asserts nothing, it prints what the
manifests recorded. It refuses bundles that were validated on different cases, which would not be
comparable. ``--matched-from EPOCH`` prints instead, per bundle, the mean Dice over the validated
epochs from EPOCH on that every bundle has (an A/B of two recipes on one split, at matched epochs).
``--final`` prints each bundle's recorded validation Dice as served (post-processing and mirroring
chosen, ``metrics.dice``) and per case, and pools the cases of the bundles trained on the same
number of cases; there the bundles may be folds with different validation cases (compare a fold's
bundles trained on N and on all of its training cases).

Example::

    python bench/learning_curve.py runs/models-lc/segmentation/unet3d/lc5 \\
        runs/models-lc/segmentation/unet3d/lc10 models/segmentation/unet3d/1
    python bench/learning_curve.py staging/segmentation/unet3d/cv5-0 staging/segmentation/unet3d/soft-f0 \\
        --matched-from 80
    python bench/learning_curve.py --final staging/segmentation/unet3d/soft-ds-f0 \\
        staging/segmentation/unet3d/soft-ds-lc8-f0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from brainscan.models.bundle import read_spec  # noqa: E402

REGIONS = ("WT", "TC", "ET", "mean")


def curve_rows(bundle: Path) -> tuple[int, list[str], list[tuple[int, dict[str, float]]]]:
    """``(training cases, validation case ids, [(epoch, {region: Dice})])`` of one bundle."""
    spec = read_spec(bundle)
    training = spec.training
    rows = []
    for entry in training.get("history") or []:
        if "val_dice_mean" in entry:
            rows.append((int(entry["epoch"]), {r: float(entry[f"val_dice_{r}"]) for r in REGIONS}))
    return len(training.get("training_case_ids") or []), sorted(training.get("validation_case_ids") or []), rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundles", nargs="+", type=Path, help="segmentation bundle folders")
    parser.add_argument("--matched-from", type=int, default=None, metavar="EPOCH",
                        help="print each bundle's mean Dice over the validated epochs >= EPOCH common to all")
    parser.add_argument("--final", action="store_true",
                        help="print each bundle's validation Dice as served, per case, pooled by training cases")
    args = parser.parse_args(argv)
    if args.final:
        return print_final(args.bundles)
    curves = [(path, *curve_rows(path)) for path in args.bundles]
    validation = {tuple(v) for _, _, v, _ in curves}
    if len(validation) != 1:
        print(f"the bundles validate on different cases: {sorted(validation)}", file=sys.stderr)
        return 2
    print(f"validation cases ({len(curves[0][2])}): {', '.join(curves[0][2])}")
    if args.matched_from is not None:
        return print_matched(curves, args.matched_from)
    print(f"{'bundle':<50} {'cases':>5} {'epoch':>5} " + " ".join(f"{r:>6}" for r in REGIONS))
    for path, n_cases, _, rows in sorted(curves, key=lambda c: c[1]):
        for epoch, dice in rows:
            print(f"{str(path):<50} {n_cases:>5} {epoch:>5} " + " ".join(f"{dice[r]:6.3f}" for r in REGIONS))
    return 0


def print_final(bundles: list[Path]) -> int:
    """Per bundle its served validation Dice and per-case Dice; then per number of training cases, pooled."""
    pooled: dict[int, list[dict[str, float]]] = {}
    print(f"{'bundle':<50} {'cases':>5} {'case':<24} " + " ".join(f"{r:>6}" for r in REGIONS))
    for path in bundles:
        spec = read_spec(path)
        n_cases = len(spec.training.get("training_case_ids") or [])
        metrics = spec.metrics or {}
        per_case = metrics.get("validation_per_case") or {}
        if not per_case:
            print(f"{path}: no per-case validation Dice recorded", file=sys.stderr)
            return 2
        for case, dice in sorted(per_case.items()):
            row = {r: float(dice[r]) for r in REGIONS[:3]}
            row["mean"] = sum(row.values()) / 3
            pooled.setdefault(n_cases, []).append(row)
            print(f"{str(path):<50} {n_cases:>5} {case:<24} " + " ".join(f"{row[r]:6.3f}" for r in REGIONS))
        served = metrics.get("dice") or {}
        print(f"{str(path):<50} {n_cases:>5} {'(bundle)':<24} "
              + " ".join(f"{float(served[r]):6.3f}" if r in served else f"{'-':>6}" for r in REGIONS))
    print("pooled over the bundles' validation cases, by number of training cases:")
    for n_cases, rows in sorted(pooled.items()):
        print(f"{n_cases:>5} training cases, {len(rows):>3} validation cases: "
              + " ".join(f"{r} {sum(row[r] for row in rows) / len(rows):.3f}" for r in REGIONS))
    return 0


def print_matched(curves: list, first_epoch: int) -> int:
    """Each bundle's mean validation Dice over the epochs >= ``first_epoch`` that all bundles validated."""
    common = set.intersection(*({e for e, _ in rows if e >= first_epoch} for *_, rows in curves))
    if not common:
        print(f"no validated epoch >= {first_epoch} is common to all bundles", file=sys.stderr)
        return 2
    print(f"mean over the {len(common)} common validated epochs {min(common)}-{max(common)}")
    print(f"{'bundle':<50} " + " ".join(f"{r:>6}" for r in REGIONS))
    for path, _, _, rows in curves:
        kept = [dice for epoch, dice in rows if epoch in common]
        print(f"{str(path):<50} " + " ".join(f"{sum(d[r] for d in kept) / len(kept):6.3f}" for r in REGIONS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
