"""How a segmenter's Dice holds up when its validation cases are acquired otherwise: a proxy for other hospitals.

BraTS cases are co-registered, skull-stripped, 1 mm isotropic and from a few institutions; scans from
another hospital differ in ways that can be simulated on the very cases a bundle was validated on,
with the truth unchanged:

- ``thick slices``: an axial acquisition of 5 mm slices, each modality averaged over 5 mm along the
  slice axis and put back on the 1 mm grid (clinical T1/T2/FLAIR are often so);
- ``bias field``: a smooth multiplicative field, 0.7 to 1.3 across the head, another per modality
  (coil inhomogeneity that a scanner or its correction leaves);
- ``blur``: in-plane Gaussian blur of 1 mm sigma (another reconstruction kernel);
- ``contrast``: each modality through its own gamma (0.7 or 1.4) on its brain intensity range (other
  sequence parameters);
- ``noise``: Gaussian noise at 5 % of each modality's brain intensity spread (a lower field strength);
- ``scale``: every intensity times 3.7 (another scanner's arbitrary units; z-scoring should cancel it).

Prints Dice (WT, TC, ET, mean) per shift, each case segmented by the one prediction path
(:class:`~brainscan.inference.segmenter.Segmenter`, the bundle's own settings) and scored on its
label file. Not a test: it asserts nothing, it prints figures. The cases were the bundle's
validation cases, so the "none" row repeats its manifest; what matters is the drop below it.

Usage:
  .venv/bin/python bench/robustness.py models/segmentation/unet3d/3 --data runs/data/brats19
      [--cases ID ...] [--shifts thick_slices bias_field ...] [--seed 0]
      [--mirror-axes AXIS ...] [--min-enhancing-mm3 V]
Without ``--cases`` it uses the manifest's ``training.validation_case_ids``. ``--mirror-axes`` (none
given: one pass) and ``--min-enhancing-mm3`` try the bundle with other settings than its manifest's, to
compare two bundles at the same mirroring or post-processing; the header line says what was used.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REGIONS = ("WT", "TC", "ET")


def _brain(channels: np.ndarray) -> np.ndarray:
    return np.any(channels != 0, axis=0)


def thick_slices(channels: np.ndarray, rng: np.random.Generator, thickness: int = 5) -> np.ndarray:
    """Average ``thickness`` consecutive axial slices (the last axis) and repeat the mean over them."""
    out = np.array(channels, dtype=np.float32)
    depth = out.shape[-1]
    for start in range(0, depth, thickness):
        block = out[..., start:start + thickness]
        block[...] = block.mean(axis=-1, keepdims=True)
    return out * _brain(channels)


def bias_field(channels: np.ndarray, rng: np.random.Generator, strength: float = 0.3) -> np.ndarray:
    """Multiply each modality by its own smooth field between 1 - strength and 1 + strength."""
    from scipy.ndimage import zoom

    out = np.array(channels, dtype=np.float32)
    shape = out.shape[1:]
    for c in range(out.shape[0]):
        coarse = rng.uniform(-1.0, 1.0, size=(3, 3, 3))
        field = zoom(coarse, [s / 3 for s in shape], order=3)[: shape[0], : shape[1], : shape[2]]
        field = field / max(float(np.abs(field).max()), 1e-6)
        out[c] *= (1.0 + strength * field).astype(np.float32)
    return out


def blur(channels: np.ndarray, rng: np.random.Generator, sigma: float = 1.0) -> np.ndarray:
    """In-plane (first two axes) Gaussian blur of each modality, background kept at 0."""
    from scipy.ndimage import gaussian_filter

    out = np.stack([gaussian_filter(c, sigma=(sigma, sigma, 0.0)) for c in np.asarray(channels, np.float32)])
    return out * _brain(channels)


def contrast(channels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each modality through a gamma of 0.7 or 1.4 on its brain range."""
    out = np.array(channels, dtype=np.float32)
    brain = _brain(channels)
    for c in range(out.shape[0]):
        values = out[c][brain]
        low, high = float(values.min()), float(values.max())
        gamma = float(rng.choice([0.7, 1.4]))
        out[c][brain] = ((values - low) / max(high - low, 1e-6)) ** gamma * (high - low) + low
    return out


def noise(channels: np.ndarray, rng: np.random.Generator, fraction: float = 0.05) -> np.ndarray:
    """Gaussian noise of ``fraction`` of each modality's brain standard deviation, in the brain."""
    out = np.array(channels, dtype=np.float32)
    brain = _brain(channels)
    for c in range(out.shape[0]):
        spread = float(out[c][brain].std())
        out[c][brain] += rng.normal(0.0, fraction * spread, size=int(brain.sum())).astype(np.float32)
    return out


def scale(channels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.asarray(channels, dtype=np.float32) * np.float32(3.7)


SHIFTS: dict[str, Callable[[np.ndarray, np.random.Generator], np.ndarray]] = {
    "none": lambda channels, rng: channels, "thick_slices": thick_slices, "bias_field": bias_field, "blur": blur,
    "contrast": contrast, "noise": noise, "scale": scale,
}


def main(argv: list[str] | None = None) -> int:
    from brainscan.data.brats import find_cases, load_case
    from brainscan.inference.segmenter import Segmenter
    from brainscan.metrics.segmentation import segmentation_metrics
    from brainscan.models.bundle import load_bundle

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path, help="a segmentation bundle folder")
    parser.add_argument("--data", type=Path, required=True, help="BraTS folder holding the cases")
    parser.add_argument("--cases", nargs="*", default=None, help="case ids (default: the manifest's validation cases)")
    parser.add_argument("--shifts", nargs="*", default=list(SHIFTS), choices=list(SHIFTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mirror-axes", type=int, nargs="*", default=None, choices=(0, 1, 2),
                        help="test-time mirroring instead of the manifest's (no axis: one pass)")
    parser.add_argument("--min-enhancing-mm3", type=float, default=None,
                        help="post-processing's minimum enhancing tumour instead of the manifest's")
    args = parser.parse_args(argv)

    bundle = load_bundle(args.bundle)
    wanted = args.cases or bundle.manifest["training"].get("validation_case_ids") or []
    cases = [c for c in find_cases(args.data) if c.case_id in set(wanted)]
    if not cases:
        print(f"none of the cases {wanted} is under {args.data}", file=sys.stderr)
        return 2
    segmenter = Segmenter.from_bundle(bundle, None if args.mirror_axes is None
                                      else {"mirror_axes": tuple(sorted(set(args.mirror_axes)))})
    if args.min_enhancing_mm3 is not None:
        segmenter.postprocessing = replace(segmenter.postprocessing, min_enhancing_mm3=args.min_enhancing_mm3)
    print(f"{args.bundle} ({bundle.architecture} {bundle.version}), {len(cases)} cases: "
          f"{', '.join(c.case_id for c in cases)}; mirroring {list(segmenter.mirror_axes)}, "
          f"post-processing {segmenter.postprocessing.to_dict()}")
    print(f"{'shift':<14} " + " ".join(f"{r:>6}" for r in (*REGIONS, "mean")) + "   s/case")
    loaded = [load_case(case) for case in cases]
    for name in args.shifts:
        rng = np.random.default_rng(args.seed)
        scores = {r: [] for r in REGIONS}
        start = time.perf_counter()
        for case in loaded:
            channels = SHIFTS[name](case.channels, rng)
            spacing = tuple(case.reference.spacing[:3])
            mask = segmenter.segment(channels, spacing, affine=case.reference.affine)
            metrics = segmentation_metrics(mask, case.seg, spacing)
            for r in REGIONS:
                scores[r].append(metrics[r]["dice"])
        means = [float(np.mean(scores[r])) for r in REGIONS]
        print(f"{name:<14} " + " ".join(f"{m:6.3f}" for m in (*means, float(np.mean(means))))
              + f"   {(time.perf_counter() - start) / len(loaded):6.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
