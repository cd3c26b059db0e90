"""Do the classifier's heatmaps mark the tumour? Measured on real BraTS slices with their label maps.

The Kaggle slices carry no lesion masks, so this takes axial slices through the tumour of the
BraTS cases in ``../shared/data/brats-train`` (T1ce by default, the contrast of most Kaggle
gliomas), scales each volume to 8 bits the way the Kaggle JPEGs are (0 .. its 99.5th brain
percentile), runs them through the bundle's own preprocessing (head crop, resize) and explains the
glioma class. The whole-tumour label (BraTS labels 1, 2 and 4) is carried through the same crop and
resize and is the ground truth.

Prints, per explanation method:
  - pointing game: the share of slices whose heatmap maximum lies inside the tumour;
  - energy: the mean share of the heatmap's mass that lies inside the tumour;
  - both again on the slices the model calls glioma;
  - explain_ms: median time of one explanation plus its PNG rendering, one image, one thread.
A centred Gaussian (a map that ignores the image) and the tumour's share of the brain give the
chance levels. ``--figure PATH`` writes a montage of slices with the old and the new map.

Usage:
  .venv/bin/python bench/heatmap_localisation.py [--bundle models/classification/resnet50/CURRENT]
      [--data ../shared/data/brats-train] [--modality t1ce] [--slices-per-case 5] [--figure runs/heatmaps.png]
Not a test: it asserts nothing, it prints figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from brainscan.preprocess.image2d import _head_box, crop_to_head  # noqa: E402


def resolve_bundle(path: Path) -> Path:
    """A folder holding ``CURRENT`` (a version name) resolves to that version."""
    current = path / "CURRENT" if path.is_dir() else path
    if current.name == "CURRENT" and current.is_file():
        return current.parent / current.read_text().strip()
    return path


def through_tumour(volume: np.ndarray, tumour: np.ndarray, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` evenly spaced axial ``(uint8 slice, bool tumour)`` pairs among the slices whose
    tumour area is at least half the largest, in display orientation (anterior up)."""
    brain = volume[volume > 0]
    top = float(np.percentile(brain, 99.5)) if brain.size else 1.0
    scaled = np.clip(np.rint(volume.astype(np.float32) * (255.0 / top)), 0, 255).astype(np.uint8)
    areas = tumour.sum(axis=(0, 1))
    candidates = np.flatnonzero(areas >= 0.5 * areas.max())
    picks = candidates[np.linspace(0, len(candidates) - 1, min(count, len(candidates))).round().astype(int)]
    return [(np.ascontiguousarray(np.rot90(scaled[:, :, z])), np.rot90(tumour[:, :, z])) for z in picks]


def crop_like_head(grey: np.ndarray, mask: np.ndarray, *, threshold: float = 0.1, margin: float = 0.02) -> np.ndarray:
    """``mask`` cropped and padded exactly as :func:`crop_to_head` crops ``grey`` (checked)."""
    height, width = grey.shape
    x0, y0, x1, y1, background = _head_box(grey, threshold)
    pad = int(round(margin * max(x1 - x0, y1 - y0)))
    x0, y0, x1, y1 = max(0, x0 - pad), max(0, y0 - pad), min(width, x1 + pad), min(height, y1 + pad)
    side = max(y1 - y0, x1 - x0)
    top, left = (side - (y1 - y0)) // 2, (side - (x1 - x0)) // 2
    squares = []
    for image, fill in ((grey, background), (mask.astype(np.uint8), 0)):
        square = np.full((side, side), fill, dtype=image.dtype)
        square[top:top + y1 - y0, left:left + x1 - x0] = image[y0:y1, x0:x1]
        squares.append(square)
    if not np.array_equal(squares[0], crop_to_head(grey, threshold=threshold, margin=margin)):
        raise RuntimeError("the mask crop no longer matches crop_to_head: update crop_like_head")
    return squares[1]


def load_slices(data: Path, modality: str, per_case: int, size: int) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    import nibabel as nib

    greys, masks, names = [], [], []
    for case in sorted(p for p in data.iterdir() if p.is_dir()):
        image_path, seg_path = case / f"{case.name}_{modality}.nii.gz", case / f"{case.name}_seg.nii.gz"
        if not (image_path.is_file() and seg_path.is_file()):
            continue
        volume = np.asarray(nib.load(image_path).dataobj)
        tumour = np.asarray(nib.load(seg_path).dataobj) > 0
        for index, (grey, mask) in enumerate(through_tumour(volume, tumour, per_case)):
            square = crop_like_head(grey, mask)
            greys.append(grey)
            masks.append(cv2.resize(square, (size, size), interpolation=cv2.INTER_NEAREST).astype(bool))
            names.append(f"{case.name}#{index}")
    return greys, masks, names


def centre_prior(size: int) -> np.ndarray:
    axis = np.linspace(-1, 1, size, dtype=np.float32)
    return np.exp(-(axis[:, None] ** 2 + axis[None, :] ** 2) / (2 * 0.35**2))


def scores(heat: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per slice: is the maximum inside the tumour, and the share of the heat inside it."""
    flat = heat.reshape(len(heat), -1)
    hits = masks.reshape(len(masks), -1)[np.arange(len(flat)), flat.argmax(axis=1)]
    total = flat.sum(axis=1)
    energy = np.where(total > 0, (heat * masks).sum(axis=(1, 2)) / np.maximum(total, 1e-12), 0.0)
    return hits.astype(float), energy


def explain_ms(explainer, image: np.ndarray, repeats: int) -> float:
    from brainscan.explain import heatmap_pngs, model_view

    view = model_view(image, value_range=(0.0, 1.0))
    explainer(image, 0)  # trace
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        heatmap_pngs(explainer(image, 0), view)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def montage(images: np.ndarray, masks: np.ndarray, maps: dict[str, np.ndarray], path: Path, rows: int) -> None:
    from brainscan.explain import colorize, model_view

    tiles = []
    for index in np.linspace(0, len(images) - 1, rows).round().astype(int):
        grey = cv2.cvtColor(model_view(images[index], value_range=(0.0, 1.0)), cv2.COLOR_GRAY2BGR)
        outline = grey.copy()
        contours, _ = cv2.findContours(masks[index].astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(outline, contours, -1, (0, 255, 0), 1)
        row = [outline]
        for heat in maps.values():
            rgba = colorize(heat[index]).astype(np.float32)
            alpha = rgba[:, :, 3:] / 255.0
            blended = (grey * (1 - alpha) + rgba[:, :, :3] * alpha).astype(np.uint8)
            cv2.drawContours(blended, contours, -1, (0, 255, 0), 1)
            row.append(blended)
        tiles.append(np.hstack(row))
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.vstack(tiles))
    print(f"montage: {path} (columns: tumour outline, {', '.join(maps)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=REPO / "models/classification/resnet50")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared/data/brats-train")
    parser.add_argument("--modality", default="t1ce", choices=["t1ce", "flair", "t1", "t2"])
    parser.add_argument("--slices-per-case", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=15, help="timed explanations per method")
    parser.add_argument("--figure", type=Path, default=None, help="write a montage PNG here (keep it out of git)")
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(f"no BraTS cases at {args.data}; pass --data")

    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from brainscan.explain import GradCam, LayerCam, explainer_for, stage_outputs
    from brainscan.models.bundle import load_bundle

    bundle = load_bundle(resolve_bundle(args.bundle))
    size = bundle.preprocess_config.input_size
    greys, masks, names = load_slices(args.data, args.modality, args.slices_per_case, size)
    images = np.stack([bundle.preprocess(grey) for grey in greys])
    masks_array = np.stack(masks)
    glioma = bundle.manifest["classes"].index("glioma")
    predicted = np.asarray(bundle.model(images, training=False)).argmax(axis=1)
    called = predicted == glioma
    print(f"bundle {bundle.path.name} ({bundle.manifest['name']}), {size} px; {len(images)} {args.modality} slices "
          f"from {len(set(n.split('#')[0] for n in names))} BraTS cases; called glioma: {called.sum()}/{len(images)}")
    print(f"tumour share of the image: {masks_array.mean():.3f}")

    model = bundle.model
    stages = stage_outputs(model)
    old, new = f"grad-cam {stages[-1]} (old)", f"grad-cam {stages[-3]} (served)"
    explainers = {
        old: GradCam(model),
        f"grad-cam {stages[-2]}": GradCam(model, layer_name=stages[-2]),
        new: explainer_for(model),
        f"layer-cam {stages[-2]}": LayerCam(model, layer_names=[stages[-2]]),
        f"layer-cam {stages[-3]}": LayerCam(model, layer_names=[stages[-3]]),
        "layer-cam last 2 stages": LayerCam(model, stages=2),
        "layer-cam last 3 stages": LayerCam(model, stages=3),
    }
    maps = {name: np.concatenate([cam(images[i:i + 8], glioma) for i in range(0, len(images), 8)])
            for name, cam in explainers.items()}
    maps["centred Gaussian (no image)"] = np.broadcast_to(centre_prior(size), images.shape[:3])

    print(f"{'method':36s} {'pointing':>9s} {'energy':>7s} | glioma-called: {'pointing':>9s} {'energy':>7s} | explain_ms")
    for name, heat in maps.items():
        hits, energy = scores(heat, masks_array)
        timing = f"{explain_ms(explainers[name], images[0], args.repeats):9.1f}" if name in explainers else "        -"
        glioma_part = (f"{hits[called].mean():9.3f} {energy[called].mean():7.3f}" if called.any() else f"{'-':>9s} {'-':>7s}")
        print(f"{name:36s} {hits.mean():9.3f} {energy.mean():7.3f} |                {glioma_part} | {timing}")
    if args.figure is not None:
        montage(images, masks_array, {old: maps[old], new: maps[new]}, args.figure, rows=6)


if __name__ == "__main__":
    main()
