"""Choose a classifier's flip TTA and temperature on its validation images; ``brainscan models calibrate``.

The choice is made on the duplicate-aware validation split the bundle was selected on (rebuilt
from the manifest's seed and fraction, refused when the data differ), never on anything called
Testing. Training ends with the same step (:func:`calibrate_batches`), and ``brainscan models
calibrate`` applies it to a bundle trained before it existed, writing a new version with the same
weights: bundles are never edited in place.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def calibrate_batches(classifier: Any, batches: Iterable[np.ndarray], y_true: np.ndarray
                      ) -> tuple[dict[str, Any], np.ndarray]:
    """Measure plain and flipped predictions of preprocessed batches, choose TTA, fit the temperature.

    ``classifier`` (a :class:`~brainscan.inference.classifier.Classifier`) is left with the chosen
    ``tta`` and ``temperature``.

    Returns:
        ``(selection, served probabilities (N, K))``: :func:`select_calibration`'s record and what
        the classifier now serves for these images.
    """
    from brainscan.inference.classifier import apply_temperature, select_calibration

    classifier.tta, classifier.temperature = (), 1.0
    plain, flipped = [], []
    for batch in batches:
        batch = np.asarray(batch, dtype=np.float32)
        plain.append(classifier.forward(batch))
        flipped.append(classifier.forward(batch[:, :, ::-1, :]))
    plain_all, flipped_all = np.concatenate(plain), np.concatenate(flipped)
    selection = select_calibration(plain_all, flipped_all, y_true)
    classifier.tta, classifier.temperature = tuple(selection["tta"]), selection["temperature"]
    chosen = (plain_all + flipped_all) / 2.0 if classifier.tta else plain_all
    log.info("calibration on %d validation images: flip TTA %s (accuracy %.4f -> %.4f), temperature %.3f, "
             "ECE %.4f -> %.4f", len(y_true), "on" if classifier.tta else "off", selection["accuracy_before"],
             selection["accuracy_after"], selection["temperature"], selection["ece_before"], selection["ece_after"])
    return selection, apply_temperature(chosen, classifier.temperature)


def _preprocessed_batches(bundle: Any, paths: list[Path], size: int) -> Iterable[np.ndarray]:
    from brainscan.inference.classifier import preprocess_one

    for start in range(0, len(paths), size):
        yield np.stack([preprocess_one(bundle, p, name=str(p)) for p in paths[start : start + size]])


def calibrate_bundle(bundle_path: Path, data_dir: Path, version: str, *, out: Path | None = None,
                     promote: bool = False, command: str | None = None) -> Path:
    """Write ``version`` of a classifier: the same weights, with TTA and temperature chosen on validation.

    Raises:
        BundleError: not a classification bundle; the version exists already.
        DatasetLayoutError: ``data_dir`` is not the data the bundle was trained on.
    """
    from brainscan.data.kaggle import read_kaggle_folder
    from brainscan.evaluation.report import bundle_validation_records
    from brainscan.inference.classifier import Classifier
    from brainscan.metrics.classification import classification_report
    from brainscan.models.bundle import load_bundle, save_bundle
    from brainscan.models.store import ModelStore

    bundle = load_bundle(bundle_path)
    manifest = bundle.spec
    classifier = Classifier.from_bundle(bundle)
    records = bundle_validation_records(bundle, read_kaggle_folder(data_dir, classes=bundle.classes))
    y_true = np.asarray([r.label_index for r in records], dtype=np.int64)
    selection, served = calibrate_batches(classifier, _preprocessed_batches(bundle, [r.path for r in records],
                                                                         classifier.batch_size), y_true)
    store_root = out or bundle.path.parents[2]
    target = store_root / "classification" / bundle.architecture / version
    training = dict(manifest.training)
    training["calibrated_from"] = {"version": manifest.version, "weights_sha256": manifest.weights.sha256,
                                   "command": command or shlex.join(["brainscan", *sys.argv[1:]])}
    metrics = {**manifest.metrics,
               "validation": classification_report(y_true, served.astype(np.float64), list(bundle.classes)),
               "validation_before_calibration": manifest.metrics.get("validation"),
               "calibration": selection}
    save_bundle(bundle.model, target, task="classification", architecture=bundle.architecture,
                architecture_args=manifest.architecture.args, preprocessing=bundle.preprocess_config,
                classes=list(bundle.classes), version=version, demo=bundle.demo, metrics=metrics, training=training,
                inference=classifier.manifest_inference(), weights_dtype=manifest.weights.dtype)
    if promote:
        ModelStore(store_root).promote("classification", bundle.architecture, version)
    return target


def add_calibrate_parser(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``calibrate`` to the ``brainscan models`` subcommands."""
    parser = commands.add_parser(
        "calibrate", help="choose a classifier's flip TTA and temperature on its validation split (new version)",
        description="Rebuild the duplicate-aware validation split a classification bundle was selected on "
                    "(manifest seed and fraction; refused if DATA is not its training data), measure the "
                    "network with and without left-right flip TTA, keep TTA only if it classifies more images "
                    "right, fit temperature scaling (Guo et al. 2017) on the chosen outputs, and write a new "
                    "version with the same weights whose manifest records the choice, the ECE before and after "
                    "and the served validation metrics. Every prediction path (service, evaluate, predict) "
                    "applies them.")
    parser.add_argument("bundle", help="bundle folder, or ARCH for the current version in the store")
    parser.add_argument("data", type=Path, help="the Kaggle-layout folder the bundle was trained on")
    parser.add_argument("--version", required=True, help="the new version, e.g. 1.1")
    parser.add_argument("--promote", action="store_true", help="make the new version the current one")
    parser.set_defaults(func=run_calibrate)
    return parser


def run_calibrate(args: argparse.Namespace) -> int:
    from brainscan.models.store import resolve_bundle

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    path = resolve_bundle(args.bundle, task="classification", models_root=getattr(args, "root", None))
    target = calibrate_bundle(path, args.data, args.version, promote=args.promote,
                              out=getattr(args, "root", None))
    print(f"bundle written: {target}")
    return 0
