"""What a perfect network at a coarser spacing could score at 1 mm: the ceiling a 2 mm stage puts on Dice.

A segmenter that works at 2 mm (``--target-spacing 2``) sees each case resampled to 2 mm and its
probabilities interpolated back to the 1 mm grid. Even a network that predicted the truth perfectly
at 2 mm would lose the detail 2 mm cannot hold: the thin enhancing rim above all. This bench takes
each case's own truth through that same round trip (the preprocessing's crop, resampling and
:func:`~brainscan.preprocess.volume3d.restore_to_original`) and scores it against itself, twice:

- ``soft``: the truth's region masks resampled trilinearly to the coarse grid (each coarse voxel
  holds the fraction of tumour it covers), back, thresholded at 0.5 -- the best calibrated network;
- ``nearest``: the coarse training targets as the trainer builds them (nearest-neighbour labels,
  :func:`~brainscan.preprocess.volume3d.crop_like`), back the same way -- a network that learned
  its targets exactly.

The gap between 1.0 and these is what a 1 mm refinement stage could win at most; the gap between
these and a bundle's Dice is the network's. Not a test: it prints figures.

Usage:
  .venv/bin/python bench/resolution_ceiling.py --data runs/data/brats19 [--spacing 2 1.5] [--cases ID ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REGIONS = ("WT", "TC", "ET")


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(pred, truth).sum()) / total


def round_trip(loaded, spacing: float) -> dict[str, dict[str, float]]:  # noqa: ANN001 (a LoadedCase)
    """Dice per region of the truth after a round trip through ``spacing`` mm, soft and nearest."""
    from brainscan.labels import brats_to_regions
    from brainscan.preprocess.volume3d import VolumePreprocessConfig, crop_like, preprocess_case, restore_to_original

    config = VolumePreprocessConfig(target_spacing=float(spacing), orientation="LPS")
    _, info = preprocess_case(loaded.channels, config, spacing=loaded.reference.spacing,
                              affine=loaded.reference.affine)
    truth = brats_to_regions(loaded.seg)  # (X, Y, Z, 3) uint8 on the input grid
    nearest = crop_like(truth, info).astype(np.float32)
    soft = crop_like(truth.astype(np.float32), info, order=1)  # what --soft-targets trains on
    out: dict[str, dict[str, float]] = {}
    for name, coarse in (("soft", soft), ("nearest", nearest)):
        back = restore_to_original(coarse, info, fill=0.0) > 0.5
        out[name] = {region: _dice(back[..., k], truth[..., k].astype(bool)) for k, region in enumerate(REGIONS)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a folder of labelled BraTS cases")
    parser.add_argument("--spacing", type=float, nargs="+", default=[2.0], help="coarse spacings in mm (default 2)")
    parser.add_argument("--cases", nargs="*", help="case ids (default: every labelled case)")
    args = parser.parse_args(argv)

    from brainscan.data.brats import find_cases, load_case

    cases = [c for c in find_cases(args.data) if c.seg is not None and (not args.cases or c.case_id in args.cases)]
    if not cases:
        print(f"no labelled cases under {args.data}", file=sys.stderr)
        return 2
    results: dict[float, dict[str, list[dict[str, float]]]] = {s: {"soft": [], "nearest": []} for s in args.spacing}
    print(f"{len(cases)} cases under {args.data}; Dice of the truth against itself after the round trip")
    print(f"{'case':28s} {'mm':>4s} {'kind':8s} " + " ".join(f"{r:>6s}" for r in REGIONS))
    for case in cases:
        loaded = load_case(case)
        for spacing in args.spacing:
            for kind, dice in round_trip(loaded, spacing).items():
                results[spacing][kind].append(dice)
                print(f"{case.case_id:28s} {spacing:4.1f} {kind:8s} " + " ".join(f"{dice[r]:6.3f}" for r in REGIONS),
                      flush=True)
    print(f"\nmean over {len(cases)} cases")
    for spacing in args.spacing:
        for kind, rows in results[spacing].items():
            means = [float(np.mean([row[r] for row in rows])) for r in REGIONS]
            print(f"{'':28s} {spacing:4.1f} {kind:8s} " + " ".join(f"{m:6.3f}" for m in means)
                  + f"   mean {np.mean(means):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
