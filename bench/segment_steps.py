"""Where one case's time goes inside the segmentation worker, step by step, in this process (warm).

Times, for the CURRENT bundle of ``segmentation/<arch>`` (or ``--bundle``) on one BraTS case: reading
the four files (``load_case``), preprocessing (crop, z-score, 2 mm resampling), the sliding window
(the compiled ``predict_fn`` the worker builds once), decoding the mask on the input grid (with
post-processing), writing it as NIfTI, the region volumes and the three preview PNGs; then
``segment_case`` as a whole. Medians of ``--repeats`` runs after one warm-up. ``bench/segment.py``
measures the same job through the services; this splits its "inference" and "writing" figures.
Not a test: it asserts nothing, it prints figures.

Usage:
  .venv/bin/python bench/segment_steps.py [--arch unet3d] [--bundle DIR] [--precision auto]
                                          [--case ../shared/data/brats-sample/BraTS2021_00006] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="unet3d", help="segmentation architecture in the model store")
    parser.add_argument("--models", type=Path, default=REPO / "models", help="model store (default <repo>/models)")
    parser.add_argument("--bundle", type=Path, default=None, help="a bundle folder instead of the store's current")
    parser.add_argument("--case", type=Path, default=REPO.parent / "shared/data/brats-sample/BraTS2021_00006")
    parser.add_argument("--precision", default="auto", help="float32, bfloat16 or auto (as the worker)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from brainscan.data.brats import find_case, load_case
    from brainscan.inference.segmenter import Segmenter, inference_settings, segment_case
    from brainscan.inference.sliding_window import keras_predict_fn
    from brainscan.io.nifti import save_like
    from brainscan.metrics.segmentation import volumes_ml
    from brainscan.models.bundle import load_bundle
    from brainscan.models.precision import resolve_precision
    from brainscan.models.store import ModelStore
    from services.segmenter.previews import render_previews

    path = args.bundle or ModelStore(args.models).current("segmentation", args.arch)
    precision = resolve_precision(args.precision)
    bundle = load_bundle(path, precision=precision)
    predict_fn = keras_predict_fn(bundle.model, batch_size=inference_settings(bundle)["batch_size"])
    segmenter = Segmenter.from_bundle(bundle, predict_fn=predict_fn)
    found = find_case(args.case)
    out = Path(tempfile.mkdtemp(prefix="brainscan-segment-steps-"))
    seconds: dict[str, list[float]] = {}

    def timed(name: str, call):
        started = time.perf_counter()
        result = call()
        seconds.setdefault(name, []).append(time.perf_counter() - started)
        return result

    for run in range(args.repeats + 1):
        loaded = timed("read the four files (load_case)", lambda: load_case(found, with_seg=False))
        reference = loaded.reference
        volume, info = timed("preprocess (crop, z-score, resample)",
                             lambda: segmenter.preprocess(loaded.channels, affine=reference.affine))
        probabilities = timed("sliding window (network)", lambda: segmenter.probabilities(volume))
        mask = timed("decode to the input grid + post-process",
                     lambda: segmenter.decode(probabilities, info, reference.spacing))
        timed("write the mask (NIfTI, gzip)", lambda: save_like(mask, reference, out / "mask.nii.gz"))
        timed("region volumes", lambda: volumes_ml(mask, reference.spacing))
        timed("previews (3 PNGs)", lambda: render_previews(loaded.channels[3], mask, reference.affine,
                                                            reference.spacing))
        whole = timed("segment_case (all of inference)",
                      lambda: segment_case(bundle, loaded, predict_fn=predict_fn))
        if run == 0:  # the warm-up: traces the graph, touches the memory
            seconds.clear()
            if not (whole == mask).all():
                raise SystemExit("segment_case and the steps gave different masks")
    print(f"bundle {path} ({bundle.architecture}), precision {precision}, case {found.case_id}, "
          f"network input {volume.shape}; median of {args.repeats} warm runs:")
    for name, values in seconds.items():
        print(f"{name:<42} {statistics.median(values):6.3f} s")


if __name__ == "__main__":
    main()
