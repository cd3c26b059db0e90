"""Rigid registration of a clinical-like DICOM study at several registration spacings: time and error.

The study is the real case BraTS2021_00006 acquired as ``tests/dicom/studies.py``'s clinical protocol
(0.9 mm in plane, 3-5 mm slices, axial, sagittal and oblique series; t2 acquired after a known patient
movement). For each spacing this registers t1, t2 and flair to t1ce (``align_volumes``, the DICOM and
the NIfTI path's step) and prints the time and, for t2, the largest and mean error of the transform
found at the corners of the brain's bounding box against the known movement. ``own`` registers on
the series' own grids. Not a test: it asserts nothing, it prints figures.

Usage:
  .venv/bin/python bench/registration.py [--spacing own 2 3] [--case DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    from tests.paths import BRATS_SAMPLE

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spacing", nargs="+", default=["own", "2", "3"], help="mm, or 'own'")
    parser.add_argument("--case", type=Path, default=BRATS_SAMPLE, help="BraTS case folder (default: the sample)")
    args = parser.parse_args()

    from brainscan.dicom.reader import read_study
    from brainscan.dicom.registration import align_volumes
    from brainscan.dicom.sequences import identify_series
    from brainscan.dicom.volume import LPS_TO_RAS, series_volume
    from tests.dicom.studies import CLINICAL_PROTOCOL, brats_source, motion_matrix, write_study

    source = brats_source(args.case)
    folder = Path(tempfile.mkdtemp(prefix="brainscan-registration-"))
    write_study(folder, source)
    volumes = {m: series_volume(s) for m, s in identify_series(read_study(folder), None).items()}
    for modality, volume in volumes.items():
        print(f"{modality:<6} {volume.shape} spacing {[round(s, 2) for s in volume.spacing]} mm")
    (moved,) = [a for a in CLINICAL_PROTOCOL if a.motion is not None]
    expected = np.linalg.inv(motion_matrix(moved.motion, source.brain_centre_lps()))
    inside = np.argwhere(source.volumes["t1ce"] > 0)
    low, high = inside.min(axis=0), inside.max(axis=0)
    corners = np.array([[x, y, z, 1.0]
                        for x in (low[0], high[0]) for y in (low[1], high[1]) for z in (low[2], high[2])])
    corners = (LPS_TO_RAS @ source.affine @ corners.T).T
    pairs = {m: (v.data, v.affine) for m, v in volumes.items()}
    for spacing in args.spacing:
        mm = None if spacing == "own" else float(spacing)
        started = time.perf_counter()
        _, transforms = align_volumes(pairs, registration_spacing_mm=mm)
        seconds = time.perf_counter() - started
        found = next(t for t in transforms if t["modality"] == moved.modality)
        error = np.linalg.norm((corners @ np.asarray(found["matrix_lps"]).T - corners @ expected.T)[:, :3], axis=1)
        print(f"registration at {spacing:>4} mm: t1, t2, flair in {seconds:.1f} s; {moved.modality} "
              f"({found['method']}) error at the brain's corners max {error.max():.2f} mm, mean {error.mean():.2f} mm",
              flush=True)


if __name__ == "__main__":
    main()
