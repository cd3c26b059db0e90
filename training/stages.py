"""Training in stages: what ``--init-from BUNDLE`` checks, copies and records.

A segmenter run may start from a committed bundle (:func:`load_initial_weights`); its manifest then
records the source (:func:`initial_bundle_record`: name, version, weights checksum) and the chain
of stages that made it, each with its command, length, learning rate and validation Dice
(:func:`stage_record`), so that the chain can be rerun.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("training.segmenter")


def initial_bundle_record(bundle_path: Path, val_case_ids: list[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """What ``--init-from`` records: the source bundle, and the stages that made it.

    Reads only the manifest (no TensorFlow). The stages are the source's own ``training.stages``
    or, for a bundle trained in one go, one stage built from its training record.

    Raises:
        BundleError: not a segmentation bundle, or one trained on a case this run validates on (its
            validation Dice would then be measured on a training case).
    """
    from brainscan.errors import BundleError
    from brainscan.models.bundle import read_spec

    spec = read_spec(bundle_path)
    if spec.task != "segmentation":
        raise BundleError(f"--init-from {bundle_path}: a {spec.task} bundle cannot start a segmenter")
    training = spec.training
    leaked = sorted(set(training.get("training_case_ids") or []) & set(val_case_ids))
    if leaked:
        raise BundleError(f"--init-from {bundle_path}: it was trained on {', '.join(leaked)}, which this run "
                          "validates on; use the same cases, --seed and --val-cases as its run "
                          f"(validation cases there: {', '.join(training.get('validation_case_ids') or []) or 'unknown'})")
    if not training.get("training_case_ids"):
        log.warning("--init-from %s records no training cases: this run's validation cases may have been "
                    "among its training cases", bundle_path)
    record = {"bundle": str(bundle_path), "name": spec.name, "version": spec.version,
              "weights_sha256": spec.weights.sha256}
    stages = training.get("stages") or [stage_record(spec.version, training, spec.metrics.get("dice"))]
    return record, list(stages)


def stage_record(version: Any, training: dict[str, Any], dice: dict[str, float] | None) -> dict[str, Any]:
    """One stage of a bundle's training history: its command, length and validation Dice."""
    config = training.get("config") or {}
    return {"version": version, "command": training.get("command"), "epochs_run": training.get("epochs_run"),
            "steps_per_epoch": config.get("steps_per_epoch"), "learning_rate": config.get("learning_rate"),
            "best_epoch": training.get("best_epoch"), "train_seconds": training.get("train_seconds_this_run"),
            "init_from": (training.get("init_from") or {}).get("version"),
            "validation_dice": dice}


def load_initial_weights(model: Any, bundle_path: Path) -> None:
    """Copy a bundle's weights into ``model`` (same architecture and arguments), cast to its dtypes.

    Raises:
        BundleError: the bundle is not a segmenter, or its network differs from ``model``.
    """
    from brainscan.errors import BundleError
    from brainscan.models.bundle import load_bundle

    bundle = load_bundle(bundle_path)
    if bundle.task != "segmentation":
        raise BundleError(f"--init-from {bundle_path}: a {bundle.task} bundle cannot start a segmenter")
    source = bundle.model.weights
    if len(source) != len(model.weights) or any(tuple(a.shape) != tuple(b.shape) for a, b in zip(source, model.weights)):
        raise BundleError(f"--init-from {bundle_path}: its network ({bundle.architecture}, "
                          f"{bundle.spec.architecture.args}) does not match this run's")
    for target, weights in zip(model.weights, source):
        target.assign(np.asarray(weights.numpy(), dtype=target.dtype))
    log.info("initial weights from %s (%s %s)", bundle_path, bundle.architecture, bundle.version)


__all__ = ["initial_bundle_record", "load_initial_weights", "stage_record"]
