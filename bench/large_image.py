"""What one very large image costs the classifier, stage by stage, and what the limits refuse.

Prints, for a 7000x7000 8-bit greyscale PNG of a bright disc (about 75 KB: the "small file, huge
image" upload that once took 33 s to answer):
  1. the preprocessing stages on one core: decoding, the head search of ``crop_to_head`` (on the
     shrunk copy it now uses, and with ``--full-search`` also on the full image, as it used to
     run), the crop and the resize to the network input;
  2. the whole classification through the service's own code path (``Predictor.classify``: decode
     and preprocess in an image thread, batched forward pass, Grad-CAM heatmap and its PNGs), with
     the shipped bundle, medians of ``--repeats`` runs;
  3. for each worst case per format at the edge of the decoding budget (16-bit RGBA PNG, 8-bit RGB
     PNG, 16-bit greyscale PNG, lossless WebP), the time to decode and preprocess it, and the time
     to refuse one just past the budget.

Usage:
  .venv/bin/python bench/large_image.py [--models models] [--arch resnet50] [--repeats 3] [--full-search]
Not a test: it asserts nothing, it prints figures. Set OMP_NUM_THREADS=1 to measure one core.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from brainscan.errors import InputTooLargeError  # noqa: E402
from brainscan.preprocess import image2d  # noqa: E402


def disc(height: int, width: int) -> np.ndarray:
    """A dark image with one bright disc: compresses to almost nothing, decodes to H x W pixels."""
    grey = np.zeros((height, width), np.uint8)
    cv2.circle(grey, (width // 2, height // 2), min(height, width) * 5 // 14, 180, -1)
    return grey


def encode(pixels: np.ndarray, ext: str) -> bytes:
    params = {".png": [cv2.IMWRITE_PNG_COMPRESSION, 9], ".webp": [cv2.IMWRITE_WEBP_QUALITY, 101]}.get(ext, [])
    ok, data = cv2.imencode(ext, pixels, params)
    if not ok:
        raise RuntimeError(f"OpenCV cannot encode {ext}")
    return data.tobytes()


def seconds(function: Callable[[], object]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def stages(raw: bytes, input_size: int, full_search: bool) -> None:
    def row(label: str, secs: float, note: str = "") -> None:
        print(f"  {label:38s}{secs:6.2f} s{note}")

    grey = image2d.decode_image(raw)
    row("decode_image", seconds(lambda: image2d.decode_image(raw)))
    factor = -(-min(grey.shape) // image2d.HEAD_SEARCH_SIDE)
    small = cv2.resize(grey, (-(-grey.shape[1] // factor), -(-grey.shape[0] // factor)), interpolation=cv2.INTER_AREA)
    row(f"head search on a {small.shape[1]}x{small.shape[0]} copy", seconds(lambda: image2d._head_box(small, 0.1)))
    if full_search:
        row("head search on the full image", seconds(lambda: image2d._head_box(grey, 0.1)),
            "   (what crop_to_head did before)")
    crop = image2d.crop_to_head(grey)
    row("crop_to_head, all of it", seconds(lambda: image2d.crop_to_head(grey)))
    row(f"resize {crop.shape[1]}x{crop.shape[0]} -> {input_size}",
        seconds(lambda: cv2.resize(crop, (input_size, input_size), interpolation=cv2.INTER_AREA)))


async def through_predictor(models: Path, arch: str, raw: bytes, repeats: int) -> None:
    from services.classifier.metrics import ServiceMetrics
    from services.classifier.predictor import Predictor
    from services.classifier.settings import Settings

    settings = Settings(models_root=models, default_model=arch, expected_models=arch)
    predictor = Predictor(settings, ServiceMetrics())
    predictor.load()
    await predictor.start()
    try:
        runs = [(await predictor.classify(raw, filename="large.png", model=arch, explain=True))["timings"]
                for _ in range(repeats)]
    finally:
        await predictor.close()
    print(f"  {arch}, medians of {repeats} runs: " + ", ".join(
        f"{key} {statistics.median(run[key] for run in runs):.0f}" for key in runs[0]))


def budget_edges() -> None:
    budget = image2d.DEFAULT_MAX_DECODED_BYTES
    cases = {  # name: (bytes per pixel, extension, make pixels of H x W)
        "16-bit RGBA PNG": (8, ".png", lambda g: np.dstack([g.astype(np.uint16) * 257] * 3
                                                           + [np.full(g.shape, 65535, np.uint16)])),
        "8-bit RGB PNG": (3, ".png", lambda g: np.dstack([g] * 3)),
        "16-bit grey PNG": (2, ".png", lambda g: g.astype(np.uint16) * 257),
        "lossless WebP": (4, ".webp", lambda g: g),
    }
    for name, (bytes_per_pixel, ext, make) in cases.items():
        pixels = min(budget // bytes_per_pixel, image2d.DEFAULT_MAX_PIXELS)
        side = int(pixels ** 0.5)
        raw = encode(make(disc(side, side)), ext)
        config = image2d.ImagePreprocessConfig(input_size=224)
        accepted = statistics.median(seconds(lambda: image2d.preprocess_image(raw, config)) for _ in range(2))
        over = encode(make(disc(side + 64, side + 64)), ext)
        start = time.perf_counter()
        try:
            image2d.decode_image(over)
            refused = "ACCEPTED"
        except InputTooLargeError:
            refused = f"refused in {(time.perf_counter() - start) * 1000:.1f} ms"
        print(f"  {name:16s} {side}x{side} ({len(raw) / 1024:.0f} KB): decode + preprocess {accepted:.2f} s; "
              f"{side + 64}x{side + 64}: {refused}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=REPO / "models", help="model store root")
    parser.add_argument("--arch", default="resnet50", help="classification architecture to run")
    parser.add_argument("--repeats", type=int, default=3, help="classifications through the service path")
    parser.add_argument("--side", type=int, default=7000, help="side of the large PNG, in pixels")
    parser.add_argument("--full-search", action="store_true",
                        help="also time the head search on the full image (about 25 s at 7000 px)")
    args = parser.parse_args()
    raw = encode(disc(args.side, args.side), ".png")
    print(f"{args.side}x{args.side} 8-bit grey PNG, {len(raw) / 1024:.0f} KB; {os.cpu_count()} CPU cores, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print("1. preprocessing stages:")
    stages(raw, 224, args.full_search)
    print("2. through the classifier's code path (timings in ms):")
    asyncio.run(through_predictor(args.models, args.arch, raw, args.repeats))
    print(f"3. worst cases at the decoding budget ({image2d.DEFAULT_MAX_DECODED_BYTES / 1e6:.0f} MB decoded, "
          f"{image2d.DEFAULT_MAX_PIXELS / 1e6:.0f} Mpx):")
    budget_edges()


if __name__ == "__main__":
    main()
