"""The manifest of a new bundle, built from the model and ``save_bundle``'s arguments, which it checks.

:func:`new_manifest` returns every section but ``weights`` (written with the weights file by
:func:`brainscan.models.bundle.save_bundle`). It names the argument at fault in each error.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

import brainscan
from brainscan.labels import BRATS_LABEL_NAMES, BRATS_LABELS, MODALITIES, REGION_ORDER
from brainscan.models.manifest import (
    PREPROCESSING_ALGORITHM_VERSION,
    PREPROCESSING_KIND,
    SCHEMA_VERSION,
    VERSION_PATTERN,
)
from brainscan.models.registry import TASKS

_TRAINING_KEYS = ("data_fingerprint", "data_description", "command", "epochs", "seed")


def new_manifest(
    model: Any,
    *,
    task: str,
    architecture: str,
    architecture_args: dict[str, Any],
    preprocessing: Any,
    version: str,
    classes: Sequence[str] | None = None,
    label_map: dict[int, int] | None = None,
    modalities: Sequence[str] = MODALITIES,
    demo: bool = False,
    name: str | None = None,
    metrics: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    inference: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest dict (without ``weights``) of ``model`` saved with these arguments.

    Args:
        model: a built ``keras.Model`` made by ``build_model(architecture, architecture_args)``.
        task: ``"classification"`` or ``"segmentation"``.
        architecture: registered architecture name, e.g. ``"resnet50"``.
        architecture_args: keyword arguments that rebuild ``model`` (JSON-serialisable).
        preprocessing: ``ImagePreprocessConfig`` (classification) or ``VolumePreprocessConfig``.
        version: version string, also the model-store folder name (letters, digits, ``._+-``).
        classes: classification only: class names in output order.
        label_map: segmentation only: output index -> BraTS label; default ``enumerate(BRATS_LABELS)``.
        modalities: segmentation only: input channel order.
        demo: mark bundles that must not be mistaken for real models.
        name: display name; default ``"<architecture>-<version>"``.
        metrics, training: free-form JSON dicts (see :mod:`brainscan.models.manifest` for training keys).
        inference: segmentation: ``patch_size`` (required unless the model input is fixed-size),
            ``overlap`` (0.5), ``batch_size`` (1), ``mirror_axes`` ([]), ``one_pass``, ``outputs``,
            ``postprocessing``; classification: ``batch_size`` (32), ``tta``, ``temperature``.

    Raises:
        ValueError / TypeError: a bad argument, named in the message.
    """
    from brainscan.models.registry import get_architecture

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if not isinstance(version, str) or not VERSION_PATTERN.match(version):
        raise ValueError(f"version must match {VERSION_PATTERN.pattern} (a folder name), got {version!r}")
    try:
        arch = get_architecture(architecture)
    except KeyError as exc:
        raise ValueError(exc.args[0]) from None
    if arch.task != task:
        raise ValueError(f"architecture {architecture!r} is a {arch.task} network, not {task}")
    if not isinstance(architecture_args, dict):
        raise TypeError(f"architecture_args must be a dict, got {type(architecture_args).__name__}")
    input_spec = _input_spec(model)
    sections: dict[str, Any] = {
        "preprocessing": _preprocessing_section(task, preprocessing, input_spec),
        "inference": _inference_section(task, inference, input_spec),
        "training": {**{key: None for key in _TRAINING_KEYS}, **(training or {})},
        "metrics": dict(metrics or {}),
        "architecture": {"name": architecture, "args": architecture_args},
    }
    outputs = model.outputs[0].shape[-1]
    if task == "classification":
        if label_map is not None:
            raise ValueError("label_map is for segmentation bundles; pass classes for classification")
        sections["classes"] = _check_classes(classes, outputs)
    else:
        if classes is not None:
            raise ValueError("classes is for classification bundles; pass label_map for segmentation")
        regions = sections["inference"].get("outputs") == "regions"
        if regions and outputs != len(REGION_ORDER):
            raise ValueError(f"a region model has {len(REGION_ORDER)} outputs {REGION_ORDER}, this one has {outputs}")
        # A region model's label_map describes the labels of the mask it writes, not its channels.
        sections.update(_label_sections(label_map, None if regions else outputs))
        input_spec["modalities"] = _check_modalities(modalities, input_spec["channels"])
    sections = {key: _jsonable(value, key) for key, value in sections.items()}
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "name": name or f"{architecture}-{version}",
        "task": task,
        "architecture": sections["architecture"],
        "version": version,
        "demo": bool(demo),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "code_version": {"brainscan": brainscan.__version__, "git_commit": _git_commit()},
        "input": input_spec,
    }
    for key in ("classes", "label_map", "label_names", "preprocessing", "inference", "training", "metrics"):
        if key in sections:
            manifest[key] = sections[key]
    return manifest


def _input_spec(model: Any) -> dict[str, Any]:
    if len(model.inputs) != 1:
        raise ValueError(f"bundles hold single-input models, this one has {len(model.inputs)} inputs")
    shape = list(model.inputs[0].shape[1:])
    return {"shape": shape, "dtype": str(model.inputs[0].dtype), "channels": shape[-1]}


def _preprocessing_section(task: str, config: Any, input_spec: dict[str, Any]) -> dict[str, Any]:
    kind = PREPROCESSING_KIND[task]
    if kind == "image2d":
        from brainscan.preprocess.image2d import ImagePreprocessConfig as expected_type
    else:
        from brainscan.preprocess.volume3d import VolumePreprocessConfig as expected_type
    if not isinstance(config, expected_type):
        raise TypeError(f"preprocessing for {task} must be {expected_type.__name__}, got {type(config).__name__}")
    if kind == "image2d":
        wanted = [config.input_size, config.input_size, config.channels]
        if any(have is not None and have != want for have, want in zip(input_spec["shape"], wanted)):
            raise ValueError(f"preprocessing makes {tuple(wanted)} images but the model takes "
                             f"{tuple(input_spec['shape'])}")
    return {"kind": kind, "params": config.to_dict(), "algorithm_version": PREPROCESSING_ALGORITHM_VERSION[kind]}


def _inference_section(task: str, inference: dict[str, Any] | None, input_spec: dict[str, Any]) -> dict[str, Any]:
    given = dict(inference or {})
    if task == "classification":
        section = {"batch_size": 32, **given}
    else:
        spatial = input_spec["shape"][:3]
        section = {"patch_size": None if None in spatial else spatial, "overlap": 0.5, "batch_size": 1,
                   "mirror_axes": [], **given}
        patch = section["patch_size"]
        if not (isinstance(patch, Sequence) and len(patch) == 3 and all(isinstance(p, int) and p > 0 for p in patch)):
            raise ValueError(f"inference['patch_size'] must be 3 positive ints, got {patch!r}")
        if not 0 <= section["overlap"] < 1:
            raise ValueError(f"inference['overlap'] must be in [0, 1), got {section['overlap']}")
        if not set(section["mirror_axes"]) <= {0, 1, 2}:
            raise ValueError(f"inference['mirror_axes'] must be spatial axes 0-2, got {section['mirror_axes']}")
        if section.get("outputs", "classes") not in ("classes", "regions"):
            raise ValueError(f"inference['outputs'] must be classes or regions, got {section['outputs']!r}")
    if not (isinstance(section["batch_size"], int) and section["batch_size"] >= 1):
        raise ValueError(f"inference['batch_size'] must be a positive int, got {section['batch_size']!r}")
    return section


def _check_classes(classes: Sequence[str] | None, outputs: int | None) -> list[str]:
    if classes is None or isinstance(classes, str) or not all(isinstance(c, str) and c for c in classes):
        raise ValueError(f"classes must be a sequence of class names, got {classes!r}")
    if len(set(classes)) != len(classes) or not classes:
        raise ValueError(f"classes must be non-empty and unique, got {list(classes)}")
    if outputs is not None and outputs != len(classes):
        raise ValueError(f"the model has {outputs} outputs but {len(classes)} classes were given: {list(classes)}")
    return list(classes)


def _label_sections(label_map: dict[int, int] | None, outputs: int | None) -> dict[str, Any]:
    label_map = dict(enumerate(BRATS_LABELS)) if label_map is None else dict(label_map)
    if sorted(label_map) != list(range(len(label_map))) or not set(label_map.values()) <= set(BRATS_LABELS):
        raise ValueError(f"label_map must map indices 0..K-1 to BraTS labels {BRATS_LABELS}, got {label_map}")
    if outputs is not None and outputs != len(label_map):
        raise ValueError(f"the model has {outputs} output channels but label_map has {len(label_map)} entries")
    return {
        "label_map": {str(i): int(label) for i, label in sorted(label_map.items())},
        "label_names": {str(i): BRATS_LABEL_NAMES[label] for i, label in sorted(label_map.items())},
    }


def _check_modalities(modalities: Sequence[str], channels: int | None) -> list[str]:
    modalities = list(modalities)
    if len(set(modalities)) != len(modalities) or not set(modalities) <= set(MODALITIES):
        raise ValueError(f"modalities must be distinct names from {MODALITIES}, got {modalities}")
    if channels is not None and channels != len(modalities):
        raise ValueError(f"the model takes {channels} channels but {len(modalities)} modalities were given")
    return modalities


def _jsonable(value: Any, section: str) -> Any:
    """Round-trip through strict JSON: numpy scalars -> Python, tuples -> lists, NaN refused."""
    def default(obj: Any) -> Any:
        if isinstance(obj, np.generic | np.ndarray):
            return obj.tolist()
        if isinstance(obj, Path):
            return str(obj)
        raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")

    try:
        return json.loads(json.dumps(value, default=default, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"manifest section {section!r} cannot be written as JSON: {exc}") from None


def _git_commit() -> str | None:
    """The commit of the source checkout, ``$BRAINSCAN_GIT_COMMIT`` in images; never fails."""
    if os.environ.get("BRAINSCAN_GIT_COMMIT"):
        return os.environ["BRAINSCAN_GIT_COMMIT"]
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(brainscan.__file__).parent,
                                capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit) else None
