"""Demo segmentation bundles: a tiny U-Net trained in minutes on synthetic BraTS phantoms.

A fresh checkout has no trained segmenter, and a real one needs BraTS data and a GPU. So that the
segmenter service, the web viewer and their tests have something real to load, this module trains
a tiny network (4-32 filters, 32^3 patches) on a dozen phantoms (:mod:`brainscan.data.phantoms`,
96 x 96 x 64 voxels at about 2.5 mm) with the ordinary training loop, and writes bundles marked
``demo: true`` (version ``demo-1``) into the model store. They find the phantoms' tumours, and
say nothing about real scans: never use them for anything but plumbing.

Example:
    >>> ensure_demo_bundles(Path("models"))         # trains only the architectures lacking a bundle
    [PosixPath('models/segmentation/unet3d/demo-1'), PosixPath('models/segmentation/attention_unet3d/demo-1')]

Command line: ``brainscan models ensure-demo [--root DIR] [--force]``.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from brainscan.errors import BundleError
from training.segmenter_config import ARCHITECTURES

log = logging.getLogger(__name__)

DEMO_VERSION = "demo-1"
#: phantoms written for a demo training (``DEMO_VAL_CASES`` of them, a seeded choice, validate)
DEMO_CASES = 12
DEMO_VAL_CASES = 2
DEMO_SHAPE = (96, 96, 64)
# 800 steps of batch 2: about a minute per architecture on 2 busy CPU cores (measured), enough for
# the whole tumour (validation Dice ~0.9) and, with attention gates, the core and enhancing parts.
DEMO_EPOCHS = 16
DEMO_STEPS_PER_EPOCH = 50


def demo_config(data: Path, arch: str, out: Path, work_dir: Path, *, progress: bool = True):
    """The :class:`~training.segmenter_config.SegmenterTrainConfig` of a demo bundle (a few minutes on 2 cores)."""
    from training.segmenter_config import SegmenterTrainConfig

    return SegmenterTrainConfig(
        data=data, arch=arch, out=out, preset="tiny", patch_size=32, batch_size=2, epochs=DEMO_EPOCHS,
        steps_per_epoch=DEMO_STEPS_PER_EPOCH, warmup_epochs=min(1, DEMO_EPOCHS - 1), val_cases=DEMO_VAL_CASES,
        val_every=DEMO_EPOCHS, seed=0,
        work_dir=work_dir, version=DEMO_VERSION, overwrite=True, promote=False, demo=True,
        progress="tqdm" if progress else "none", command="brainscan models ensure-demo",
    )


def _current_bundle(store, arch: str) -> tuple[Path | None, bool]:
    """``(path, is_demo)`` of the current segmentation bundle of ``arch``, or ``(None, False)``."""
    from brainscan.models.bundle import read_manifest

    try:
        path = store.current("segmentation", arch)
        return path, bool(read_manifest(path)["demo"])
    except BundleError:
        return None, False


def ensure_demo_bundles(models_root: str | Path, *, archs: Sequence[str] = ARCHITECTURES, force: bool = False,
                        progress: bool = True) -> list[Path]:
    """Train and promote a demo bundle for each architecture that has no current segmentation bundle.

    Args:
        models_root: the model store folder (created if missing).
        archs: segmentation architectures to cover.
        force: retrain the demo bundles even where a current bundle exists. A current REAL
            (non-demo) bundle is never demoted: the new demo is stored but not promoted.
        progress: print what happens and show a tqdm bar of the training steps (stderr).

    Returns:
        The current bundle of each architecture, in ``archs`` order (new or already there).

    Raises:
        ValueError: an unknown architecture.
    """
    from brainscan.models.store import ModelStore

    unknown = [a for a in archs if a not in ARCHITECTURES]
    if unknown:
        raise ValueError(f"archs must be among {ARCHITECTURES}, got {unknown}")
    store = ModelStore(models_root)
    current = {arch: _current_bundle(store, arch) for arch in archs}
    todo = [arch for arch in archs if force or current[arch][0] is None]
    for arch in archs:
        if arch not in todo:
            log.info("segmentation/%s already has a current bundle: %s", arch, current[arch][0])
    if todo:
        with tempfile.TemporaryDirectory(prefix="brainscan-demo-") as tmp:
            data = _write_phantoms(Path(tmp) / "phantoms", progress)
            for arch in todo:
                start = time.perf_counter()
                bundle = _train_one(data, arch, store, Path(tmp) / f"work-{arch}", progress)
                log.info("demo bundle %s trained in %.0f s", bundle, time.perf_counter() - start)
                path, is_demo = current[arch]
                if path is not None and not is_demo:
                    log.warning("segmentation/%s keeps its real current bundle %s; the demo is stored at %s "
                                "but not promoted", arch, path, bundle)
                else:
                    store.promote("segmentation", arch, DEMO_VERSION)
    return [store.current("segmentation", arch) for arch in archs]


def _write_phantoms(folder: Path, progress: bool) -> Path:
    from brainscan.data.phantoms import write_brats_phantoms

    if progress:
        print(f"writing {DEMO_CASES} BraTS phantoms ({'x'.join(map(str, DEMO_SHAPE))} voxels) to {folder}", flush=True)
    write_brats_phantoms(folder, n=DEMO_CASES, seed=0, shape=DEMO_SHAPE)
    return folder


def _train_one(data: Path, arch: str, store, work_dir: Path, progress: bool) -> Path:
    from training.segmenter import train_segmenter

    return train_segmenter(demo_config(data, arch, store.root, work_dir, progress=progress))


def add_demo_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``ensure-demo`` to the ``brainscan models`` subcommands; returns its parser."""
    parser = commands.add_parser(
        "ensure-demo",
        help="train small demo segmentation bundles on phantoms where none exists (a few minutes on a CPU)",
        description=(
            "Make sure every segmentation architecture (unet3d, attention_unet3d) has a current bundle. "
            f"Where one is missing, write {DEMO_CASES} synthetic BraTS phantoms to a temporary folder, train a "
            f"tiny network on them for a few minutes on the CPU, and store it as version {DEMO_VERSION}, marked "
            "demo (promoted). Demo bundles let the services and the viewer run end to end; they are NOT "
            "models of real tumours. Train real ones with 'brainscan train segmenter'."
        ),
    )
    parser.add_argument("--root", dest="ensure_root", type=Path, default=None,
                        help="model store folder (default: $BRAINSCAN_MODELS or ./models)")
    parser.add_argument("--force", action="store_true",
                        help="retrain the demo bundles even if current bundles exist "
                             "(a real current bundle stays current)")
    parser.add_argument("--arch", dest="demo_archs", action="append", choices=ARCHITECTURES, default=None,
                        help="only this architecture (repeatable; default: all)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(func=run_ensure_demo)
    return parser


def run_ensure_demo(args: argparse.Namespace) -> int:
    from brainscan.models.store import default_root

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = args.ensure_root or getattr(args, "root", None) or default_root()
    paths = ensure_demo_bundles(root, archs=tuple(args.demo_archs or ARCHITECTURES), force=args.force,
                                progress=not args.quiet)
    for path in paths:
        print(f"current bundle: {path}")
    return 0
