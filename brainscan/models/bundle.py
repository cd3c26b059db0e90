"""Model bundles: weights plus a ``manifest.json`` that says how to rebuild and feed the model.

A bundle is a directory::

    <bundle>/
        manifest.json   what the model is and how to preprocess its input (schema below)
        weights.npz     one array per model variable, keyed by the variable's ``.path``

Training writes a bundle with :func:`save_bundle`; serving calls :func:`load_bundle`, which rebuilds
the network through :func:`brainscan.models.registry.build_model` and returns, with the model, the
preprocess function built from the manifest alone. No service re-types a constant that training
used. :func:`read_manifest` reads and validates the manifest without importing TensorFlow, so
TF-free services (gateway, segmenter API) can describe models.

Manifest schema (``schema_version: 1``; ``null`` in a shape means "any size")::

    schema_version  1
    name            str, display name
    task            "classification" | "segmentation"
    architecture    {name: registered architecture, args: {keyword arguments of its builder}}
    version         str, e.g. "2024-06-01" (also the folder name in the model store)
    demo            bool, true for bundles trained on phantoms / for minutes (never for real use)
    created_at      ISO 8601 UTC, e.g. "2024-06-01T12:00:00.000Z"
    code_version    {brainscan: __version__, git_commit: str | null}
    input           {shape: [S, S, C] or [X, Y, Z, C], dtype: "float32", channels: C,
                     modalities: ["t1", "t1ce", "t2", "flair"] (segmentation only)}
    classes         classification only: class names in output order
    label_map       segmentation only: {"<output index>": <BraTS label>}, e.g. {"3": 4}
    label_names     segmentation only: {"<output index>": name}, e.g. {"3": "ET"}
    preprocessing   {kind: "image2d" | "volume3d", params: <config>.to_dict()}
    inference       segmentation: {patch_size: [x, y, z], overlap, batch_size, mirror_axes};
                    classification: {batch_size}; extra keys allowed
    training        {data_fingerprint, data_description, command, epochs, seed, ...free-form}
    metrics         free-form, e.g. {"val_accuracy": 0.93}
    weights         {file: "weights.npz", dtype: "float32" | "float16", sha256, num_parameters}

Weights are stored as float32, or as float16 to halve the shipped size; they are cast back to each
variable's dtype on load. Variable names are compared after dropping Keras' automatic ``_<n>``
suffixes, because building the same network twice in one process numbers its layers differently.

Example:
    >>> path = save_bundle(model, "models/classification/resnet50/v1", task="classification",
    ...                    architecture="resnet50", architecture_args=args,
    ...                    preprocessing=ImagePreprocessConfig(), classes=KAGGLE_CLASSES, version="v1")
    >>> bundle = load_bundle(path)
    >>> probabilities = bundle.model.predict(bundle.preprocess(png_bytes)[None])
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import uuid
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

import brainscan
from brainscan.errors import BundleError
from brainscan.labels import BRATS_LABEL_NAMES, BRATS_LABELS, MODALITIES, REGION_ORDER
from brainscan.models.registry import TASKS

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.npz"
WEIGHTS_DTYPES = ("float32", "float16")
#: the preprocessing kind each task uses
PREPROCESSING_KIND = {"classification": "image2d", "segmentation": "volume3d"}
#: version strings double as folder names in the model store
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")

_REQUIRED = ("schema_version", "name", "task", "architecture", "version", "demo", "created_at",
             "code_version", "input", "preprocessing", "inference", "training", "metrics", "weights")
_TRAINING_KEYS = ("data_fingerprint", "data_description", "command", "epochs", "seed")
_AUTO_SUFFIX = re.compile(r"_\d+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class Bundle:
    """A loaded bundle: the model, its manifest, and the preprocessing the manifest describes.

    Attributes:
        model: the rebuilt ``keras.Model`` holding the bundle's weights.
        manifest: the validated manifest (see the module docstring).
        path: the bundle directory.
        preprocess_config: ``ImagePreprocessConfig`` (classification) or ``VolumePreprocessConfig``.
        preprocess: classification: ``bytes | (H, W[, C]) array -> float32 (S, S, C)``;
            segmentation: ``(4, X, Y, Z) channels -> ((X', Y', Z', 4) float32, CropInfo)``.
    """

    model: Any
    manifest: dict[str, Any]
    path: Path
    preprocess_config: Any = field(repr=False)
    preprocess: Callable[..., Any] = field(repr=False)

    @property
    def task(self) -> str:
        return self.manifest["task"]

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def demo(self) -> bool:
        return self.manifest["demo"]

    @property
    def architecture(self) -> str:
        return self.manifest["architecture"]["name"]

    @property
    def classes(self) -> tuple[str, ...] | None:
        """Class names in output order (classification), else ``None``."""
        classes = self.manifest.get("classes")
        return tuple(classes) if classes is not None else None

    @property
    def label_map(self) -> dict[int, int] | None:
        """Output index -> BraTS label (segmentation), else ``None``."""
        label_map = self.manifest.get("label_map")
        return {int(k): int(v) for k, v in label_map.items()} if label_map is not None else None

    @property
    def inference(self) -> dict[str, Any]:
        return self.manifest["inference"]


def save_bundle(
    model: Any,
    path: str | Path,
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
    weights_dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as a bundle directory at ``path`` (atomically: temp dir, then rename).

    Args:
        model: a built ``keras.Model`` made by ``build_model(architecture, architecture_args)``.
        path: the bundle directory to create.
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
        metrics, training: free-form JSON dicts (see the module docstring for training keys).
        inference: segmentation: ``patch_size`` (required unless the model input is fixed-size),
            ``overlap`` (0.5), ``batch_size`` (1), ``mirror_axes`` ([]); classification: ``batch_size``.
        weights_dtype: ``"float32"`` or ``"float16"`` (half the size; small rounding error).
        overwrite: replace an existing bundle at ``path``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError / TypeError: a bad argument (named in the message), or ``architecture_args``
            that do not rebuild ``model``.
        FileExistsError: ``path`` exists and ``overwrite`` is false, or it is not a bundle.
    """
    from brainscan.models.registry import build_model, get_architecture

    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if weights_dtype not in WEIGHTS_DTYPES:
        raise ValueError(f"weights_dtype must be one of {WEIGHTS_DTYPES}, got {weights_dtype!r}")
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
    arrays = _variable_arrays(model)
    # A bundle that cannot be loaded is worse than none: rebuild from the args now, not at serving.
    _match_weights(build_model(architecture, architecture_args), arrays, error=ValueError)

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
    return _write_bundle(Path(path), manifest, arrays, weights_dtype, overwrite)


def load_bundle(path: str | Path, *, compile: bool = False) -> Bundle:
    """Rebuild a bundle's model, load its weights and build its preprocess function.

    Args:
        path: the bundle directory (or its ``manifest.json``).
        compile: also ``model.compile()`` (no loss or optimizer; training compiles its own).

    Raises:
        BundleError: missing directory or manifest, invalid JSON or schema, unknown architecture,
            missing or corrupt weights (sha256), or weights that do not fit the architecture args.
    """
    from brainscan.models.registry import build_model, get_architecture

    path = _bundle_dir(path)
    manifest = read_manifest(path)
    weights_path = verify_weights(path, manifest)
    config, preprocess = preprocessor_from_manifest(manifest)
    arch_name, args = manifest["architecture"]["name"], manifest["architecture"]["args"]
    try:
        arch = get_architecture(arch_name)
    except KeyError as exc:
        raise BundleError(f"bundle {path}: {exc.args[0]}; is this brainscan too old for it?") from None
    if arch.task != manifest["task"]:
        raise BundleError(f"bundle {path}: architecture {arch_name!r} is {arch.task}, manifest says {manifest['task']}")
    try:
        model = build_model(arch_name, args)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"bundle {path}: cannot build {arch_name!r} from manifest args {args}: {exc}") from exc
    try:
        with np.load(weights_path, allow_pickle=False) as npz:
            stored = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise BundleError(f"bundle {path}: cannot read {weights_path.name}: {exc}") from exc
    _match_weights(model, stored, error=BundleError, where=f"bundle {path}")
    outputs = model.outputs[0].shape[-1]
    names = manifest.get("classes") or manifest.get("label_map")
    if (manifest.get("inference") or {}).get("outputs") == "regions":
        names = REGION_ORDER  # the label_map lists the mask's labels; the channels are the regions
    if outputs is not None and outputs != len(names):
        raise BundleError(f"bundle {path}: the network has {outputs} outputs but the manifest names {len(names)}")
    model.set_weights([array.astype(variable.dtype) for variable, array in zip(model.weights, stored.values())])
    if compile:
        model.compile()
    return Bundle(model=model, manifest=manifest, path=path, preprocess_config=config, preprocess=preprocess)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read and validate a bundle's manifest without importing TensorFlow.

    Args:
        path: the bundle directory, or its ``manifest.json``.

    Raises:
        BundleError: (code ``bundle_not_found``) no such directory; otherwise a missing manifest,
            invalid JSON, an unknown ``schema_version`` or schema problems (all listed).
    """
    manifest_path = _bundle_dir(path) / MANIFEST_FILE
    if not manifest_path.parent.is_dir():
        raise BundleError(f"model bundle not found: {manifest_path.parent} is not a directory", code="bundle_not_found")
    if not manifest_path.is_file():
        raise BundleError(f"not a model bundle: {manifest_path.parent} has no {MANIFEST_FILE}")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest_path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{manifest_path} must hold a JSON object, got {type(manifest).__name__}")
    schema = manifest.get("schema_version")
    if schema != SCHEMA_VERSION:
        raise BundleError(
            f"{manifest_path} has schema_version {schema!r}; brainscan {brainscan.__version__} reads "
            f"schema_version {SCHEMA_VERSION}: upgrade brainscan or re-export the bundle"
        )
    problems = validate_manifest(manifest)
    if problems:
        raise BundleError(f"invalid manifest {manifest_path}: " + "; ".join(problems))
    return manifest


def validate_manifest(manifest: dict[str, Any]) -> list[str]:
    """Check a manifest's structure (no file access, no TensorFlow). Returns the problems found."""
    if not isinstance(manifest, dict):
        return [f"manifest must be a dict, got {type(manifest).__name__}"]
    problems = [f"missing field {key!r}" for key in _REQUIRED if key not in manifest]
    get = manifest.get

    def expect(key: str, kind: type | tuple[type, ...], value: Any) -> bool:
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if not ok and key.split(".")[0] in manifest:
            problems.append(f"{key} must be {getattr(kind, '__name__', kind)}, got {value!r}")
        return ok

    if "schema_version" in manifest and get("schema_version") != SCHEMA_VERSION:
        problems.append(f"schema_version must be {SCHEMA_VERSION}, got {get('schema_version')!r}")
    expect("name", str, get("name"))
    task = get("task")
    if "task" in manifest and task not in TASKS:
        problems.append(f"task must be one of {TASKS}, got {task!r}")
    if expect("architecture", dict, get("architecture")):
        expect("architecture.name", str, get("architecture").get("name"))
        expect("architecture.args", dict, get("architecture").get("args"))
    if expect("version", str, get("version")) and not VERSION_PATTERN.match(get("version")):
        problems.append(f"version must match {VERSION_PATTERN.pattern}, got {get('version')!r}")
    expect("demo", bool, get("demo"))
    if expect("created_at", str, get("created_at")):
        try:
            datetime.fromisoformat(get("created_at"))
        except ValueError:
            problems.append(f"created_at must be ISO 8601, got {get('created_at')!r}")
    expect("code_version", dict, get("code_version"))
    if expect("input", dict, get("input")):
        expect("input.shape", list, get("input").get("shape"))
        expect("input.channels", int, get("input").get("channels"))
    for key in ("inference", "training", "metrics"):
        expect(key, dict, get(key))
    if expect("preprocessing", dict, get("preprocessing")):
        kind = get("preprocessing").get("kind")
        if task in PREPROCESSING_KIND and kind != PREPROCESSING_KIND[task]:
            problems.append(f"preprocessing.kind must be {PREPROCESSING_KIND[task]!r} for {task}, got {kind!r}")
        expect("preprocessing.params", dict, get("preprocessing").get("params"))
    if task == "classification":
        classes = get("classes")
        if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
            problems.append(f"classes must be a non-empty list of names, got {classes!r}")
    elif task == "segmentation":
        label_map = get("label_map")
        if not (isinstance(label_map, dict) and label_map
                and sorted(label_map) == [str(i) for i in range(len(label_map))]
                and all(v in BRATS_LABELS for v in label_map.values())):
            problems.append(f"label_map must map output indices '0'..'K-1' to BraTS labels {list(BRATS_LABELS)}, "
                            f"got {label_map!r}")
    if expect("weights", dict, get("weights")):
        weights = get("weights")
        file = weights.get("file")
        if not (isinstance(file, str) and file and Path(file).name == file and file not in (".", "..")):
            problems.append(f"weights.file must be a file name inside the bundle, got {file!r}")
        if weights.get("dtype") not in WEIGHTS_DTYPES:
            problems.append(f"weights.dtype must be one of {WEIGHTS_DTYPES}, got {weights.get('dtype')!r}")
        if not (isinstance(weights.get("sha256"), str) and _SHA256.match(weights["sha256"])):
            problems.append(f"weights.sha256 must be 64 lowercase hex digits, got {weights.get('sha256')!r}")
        expect("weights.num_parameters", int, weights.get("num_parameters"))
    return problems


def verify_weights(path: str | Path, manifest: dict[str, Any] | None = None) -> Path:
    """Check that the weights file exists and matches the manifest's sha256 (no TensorFlow).

    Args:
        path: the bundle directory (or its ``manifest.json``).
        manifest: its manifest, if already read.

    Returns:
        the weights file path.

    Raises:
        BundleError: missing weights file, or a checksum mismatch (corrupt or modified file).
    """
    path = _bundle_dir(path)
    manifest = manifest if manifest is not None else read_manifest(path)
    weights_path = path / manifest["weights"]["file"]
    if not weights_path.is_file():
        raise BundleError(f"bundle {path}: weights file {weights_path.name} is missing")
    actual = _sha256(weights_path)
    if actual != manifest["weights"]["sha256"]:
        raise BundleError(
            f"bundle {path}: {weights_path.name} is corrupt or was modified (sha256 {actual[:12]}..., "
            f"manifest says {manifest['weights']['sha256'][:12]}...); copy the bundle again"
        )
    return weights_path


def preprocessor_from_manifest(manifest: dict[str, Any]) -> tuple[Any, Callable[..., Any]]:
    """Build ``(config, preprocess)`` from a manifest's ``preprocessing`` section only.

    Raises:
        BundleError: unknown kind or parameters the config rejects.
    """
    kind, params = manifest["preprocessing"]["kind"], manifest["preprocessing"]["params"]
    try:
        if kind == "image2d":
            from brainscan.preprocess import image2d

            config = image2d.ImagePreprocessConfig.from_dict(params)
            return config, functools.partial(image2d.preprocess_image, config=config)
        if kind == "volume3d":
            from brainscan.preprocess import volume3d

            config = volume3d.VolumePreprocessConfig.from_dict(params)
            return config, functools.partial(volume3d.preprocess_case, config=config)
    except (TypeError, ValueError, KeyError) as exc:
        raise BundleError(f"manifest preprocessing params {params} are invalid for {kind}: {exc}") from exc
    raise BundleError(f"unknown preprocessing kind {kind!r}; expected one of {sorted(PREPROCESSING_KIND.values())}")


# -- helpers ------------------------------------------------------------------------------------


def _bundle_dir(path: str | Path) -> Path:
    """The bundle directory, given it or its ``manifest.json``."""
    path = Path(path)
    return path.parent if path.name == MANIFEST_FILE and path.is_file() else path


def _variable_arrays(model: Any) -> dict[str, np.ndarray]:
    """``{unique variable path: numpy value}`` in ``model.weights`` order (``#n`` marks repeats)."""
    arrays: dict[str, np.ndarray] = {}
    for variable, value in zip(model.weights, model.get_weights()):
        key, n = variable.path, 1
        while key in arrays:
            key, n = f"{variable.path}#{n}", n + 1
        arrays[key] = np.asarray(value)
    return arrays


def _normalise(key: str) -> str:
    return "/".join(_AUTO_SUFFIX.sub("", part) for part in key.split("/"))


def _match_weights(model: Any, stored: dict[str, np.ndarray], *, error: type[Exception],
                   where: str = "architecture_args") -> None:
    """Raise ``error`` listing the variables whose name or shape differs from ``stored``."""
    expected = _variable_arrays(model)
    diffs = []
    for (key, value), (stored_key, array) in zip(expected.items(), stored.items()):
        if _normalise(key) != _normalise(stored_key):
            diffs.append(f"variable {key!r} but weights hold {stored_key!r}")
        elif value.shape != array.shape:
            diffs.append(f"{key} has shape {value.shape} but weights hold {array.shape}")
    if len(expected) != len(stored):
        diffs.insert(0, f"the network has {len(expected)} variables but the weights hold {len(stored)}")
    if diffs:
        more = f" (and {len(diffs) - 5} more)" if len(diffs) > 5 else ""
        raise error(f"{where}: weights do not match the architecture built from its args: "
                    + "; ".join(diffs[:5]) + more)


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
    return {"kind": kind, "params": config.to_dict()}


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_write(path: Path, data: bytes) -> None:
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _write_bundle(path: Path, manifest: dict[str, Any], arrays: dict[str, np.ndarray], weights_dtype: str,
                  overwrite: bool) -> Path:
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} already exists; pass overwrite=True to replace the bundle")
        if not path.is_dir() or (any(path.iterdir()) and not (path / MANIFEST_FILE).is_file()):
            raise FileExistsError(f"{path} exists and is not a model bundle; refusing to replace it")
    cast = {}
    for key, array in arrays.items():
        with np.errstate(over="ignore"):  # overflow is reported below, naming the variable
            cast[key] = array.astype(weights_dtype) if np.issubdtype(array.dtype, np.floating) else array
        if not np.all(np.isfinite(cast[key])):
            raise ValueError(f"variable {key} is not finite when stored as {weights_dtype}; use float32")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old: Path | None = None
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; services may run as another user
        weights_path = tmp / WEIGHTS_FILE
        with weights_path.open("wb") as handle:
            np.savez(handle, **cast)
            handle.flush()
            os.fsync(handle.fileno())
        manifest["weights"] = {"file": WEIGHTS_FILE, "dtype": weights_dtype, "sha256": _sha256(weights_path),
                               "num_parameters": int(sum(a.size for a in arrays.values()))}
        problems = validate_manifest(manifest)
        if problems:
            raise ValueError("refusing to write an invalid manifest: " + "; ".join(problems))
        _fsync_write(tmp / MANIFEST_FILE, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
        if path.exists():
            old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(path, old)
        try:
            os.rename(tmp, path)
        except OSError:
            if old is not None:
                os.rename(old, path)
                old = None
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path
