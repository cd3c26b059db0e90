"""Model bundles: weights plus a ``manifest.json`` that says how to rebuild and feed the model.

A bundle is a directory::

    <bundle>/
        manifest.json   what the model is and how to preprocess its input (schema below)
        weights.npz     one array per model variable, keyed by the variable's ``.path``

Training writes a bundle with :func:`save_bundle`; serving calls :func:`load_bundle`, which rebuilds
the network through :func:`brainscan.models.registry.build_model` and returns, with the model, the
preprocess function built from the manifest alone. No service re-types a constant that training
used. :func:`read_spec` (typed) and :func:`read_manifest` (dict) read and validate the manifest
without importing TensorFlow, so TF-free services (gateway, segmenter API) can describe models.

The manifest's schema and its typed form, :class:`~brainscan.models.manifest.Manifest`, are in
:mod:`brainscan.models.manifest`; :attr:`Bundle.spec` holds it (``Bundle.manifest`` is its JSON dict).

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
import tempfile
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from brainscan.errors import BundleError
from brainscan.models.manifest import (
    PREPROCESSING_ALGORITHM_VERSION,
    PREPROCESSING_KIND,
    SCHEMA_VERSION,
    VERSION_PATTERN,
    WEIGHTS_DTYPES,
    Manifest,
    validate_manifest,
)
from brainscan.models.precision import dtype_policy, resolve_precision

MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.npz"

__all__ = ["MANIFEST_FILE", "PREPROCESSING_ALGORITHM_VERSION", "PREPROCESSING_KIND", "SCHEMA_VERSION",
           "VERSION_PATTERN", "WEIGHTS_DTYPES", "WEIGHTS_FILE", "Bundle", "Manifest", "load_bundle",
           "preprocessor_from_manifest", "read_manifest", "read_spec", "save_bundle", "validate_manifest",
           "verify_weights"]

_AUTO_SUFFIX = re.compile(r"_\d+$")


@dataclass
class Bundle:
    """A loaded bundle: the model, its manifest, and the preprocessing the manifest describes.

    Attributes:
        model: the rebuilt ``keras.Model`` holding the bundle's weights.
        manifest: the validated manifest as its JSON dict (see :mod:`brainscan.models.manifest`).
        path: the bundle directory.
        preprocess_config: ``ImagePreprocessConfig`` (classification) or ``VolumePreprocessConfig``.
        preprocess: classification: ``bytes | (H, W[, C]) array -> float32 (S, S, C)``;
            segmentation: ``(4, X, Y, Z) channels -> ((X', Y', Z', 4) float32, CropInfo)``.
        spec: the typed manifest (built from ``manifest`` when not given).
        precision: the arithmetic the model runs in, ``"float32"`` or ``"bfloat16"``
            (:mod:`brainscan.models.precision`; weights are float32 either way).
    """

    model: Any
    manifest: dict[str, Any]
    path: Path
    preprocess_config: Any = field(repr=False)
    preprocess: Callable[..., Any] = field(repr=False)
    spec: Manifest = field(default=None, repr=False)  # type: ignore[assignment]
    precision: str = "float32"

    def __post_init__(self) -> None:
        if self.spec is None:
            self.spec = Manifest.from_dict(self.manifest, source=self.path)

    @property
    def task(self) -> str:
        return self.spec.task

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def version(self) -> str:
        return self.spec.version

    @property
    def demo(self) -> bool:
        return self.spec.demo

    @property
    def architecture(self) -> str:
        return self.spec.architecture.name

    @property
    def classes(self) -> tuple[str, ...] | None:
        """Class names in output order (classification), else ``None``."""
        return self.spec.classes

    @property
    def label_map(self) -> dict[int, int] | None:
        """Output index -> BraTS label (segmentation), else ``None``."""
        return dict(self.spec.label_map) if self.spec.label_map is not None else None

    @property
    def inference(self) -> dict[str, Any]:
        """The manifest's ``inference`` section as a dict (typed: ``spec.inference``)."""
        return self.manifest["inference"]


def save_bundle(model: Any, path: str | Path, *, weights_dtype: str = "float32", overwrite: bool = False,
                **manifest_args: Any) -> Path:
    """Write ``model`` as a bundle directory at ``path`` (atomically: temp dir, then rename).

    Args:
        model: a built ``keras.Model`` made by ``build_model(architecture, architecture_args)``.
        path: the bundle directory to create.
        weights_dtype: ``"float32"`` or ``"float16"`` (half the size; small rounding error).
        overwrite: replace an existing bundle at ``path``.
        manifest_args: what the manifest records, the keywords of
            :func:`brainscan.models.manifest_build.new_manifest`: ``task``, ``architecture``,
            ``architecture_args``, ``preprocessing``, ``version`` (required), ``classes``,
            ``label_map``, ``modalities``, ``demo``, ``name``, ``metrics``, ``training``, ``inference``.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError / TypeError: a bad argument (named in the message), or ``architecture_args``
            that do not rebuild ``model``.
        FileExistsError: ``path`` exists and ``overwrite`` is false, or it is not a bundle.
    """
    from brainscan.models.manifest_build import new_manifest
    from brainscan.models.registry import build_model

    if weights_dtype not in WEIGHTS_DTYPES:
        raise ValueError(f"weights_dtype must be one of {WEIGHTS_DTYPES}, got {weights_dtype!r}")
    manifest = new_manifest(model, **manifest_args)
    architecture = manifest["architecture"]
    arrays = _variable_arrays(model)
    # A bundle that cannot be loaded is worse than none: rebuild from the args now, not at serving.
    _match_weights(build_model(architecture["name"], architecture["args"]), arrays, error=ValueError)
    return _write_bundle(Path(path), manifest, arrays, weights_dtype, overwrite)


def load_bundle(path: str | Path, *, compile: bool = False, precision: str = "auto") -> Bundle:
    """Rebuild a bundle's model, load its weights and build its preprocess function.

    Args:
        path: the bundle directory (or its ``manifest.json``).
        compile: also ``model.compile()`` (no loss or optimizer; training compiles its own).
        precision: ``"float32"``; ``"bfloat16"`` to build the network under Keras' ``mixed_bfloat16``
            policy; or ``"auto"``: for a segmentation bundle bfloat16 where the CPU has it natively
            (:func:`brainscan.models.precision.resolve_precision`), so that every path that loads it on one
            machine (worker, ``evaluate``, ``predict``) computes the same mask; classifiers stay float32,
            the arithmetic their temperature was fitted in.

    Raises:
        BundleError: missing directory or manifest, invalid JSON or schema, unknown architecture,
            missing or corrupt weights (sha256), or weights that do not fit the architecture args.
    """
    from brainscan.models.registry import get_architecture

    path = _bundle_dir(path)
    spec = read_spec(path)
    weights_path = verify_weights(path, spec)
    config, preprocess = preprocessor_from_manifest(spec)
    arch_name, args = spec.architecture.name, spec.architecture.args
    try:
        arch = get_architecture(arch_name)
    except KeyError as exc:
        raise BundleError(f"bundle {path}: {exc.args[0]}; is this brainscan too old for it?") from None
    if arch.task != spec.task:
        raise BundleError(f"bundle {path}: architecture {arch_name!r} is {arch.task}, manifest says {spec.task}")
    if precision == "auto":
        precision = resolve_precision("auto") if spec.task == "segmentation" else "float32"
    model = _build_in(dtype_policy(precision), arch_name, args, path)
    try:
        with np.load(weights_path, allow_pickle=False) as npz:
            stored = {key: npz[key] for key in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise BundleError(f"bundle {path}: cannot read {weights_path.name}: {exc}") from exc
    _match_weights(model, stored, error=BundleError, where=f"bundle {path}")
    outputs = model.outputs[0].shape[-1]
    if outputs is not None and outputs != spec.num_outputs:
        raise BundleError(f"bundle {path}: the network has {outputs} outputs but the manifest names {spec.num_outputs}")
    model.set_weights([array.astype(variable.dtype) for variable, array in zip(model.weights, stored.values())])
    if compile:
        model.compile()
    return Bundle(model=model, manifest=spec.to_dict(), path=path, preprocess_config=config, preprocess=preprocess,
                  spec=spec, precision=precision)


def _build_in(policy: str, arch_name: str, args: dict[str, Any], path: Path) -> Any:
    """``build_model`` under the Keras dtype ``policy`` (the global policy is restored after)."""
    import keras

    from brainscan.models.registry import build_model

    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(policy)
    try:
        return build_model(arch_name, args)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"bundle {path}: cannot build {arch_name!r} from manifest args {args}: {exc}") from exc
    finally:
        keras.mixed_precision.set_global_policy(previous)


def read_spec(path: str | Path) -> Manifest:
    """Read and validate a bundle's manifest as a typed :class:`Manifest` (no TensorFlow).

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
    return Manifest.from_dict(manifest, source=manifest_path)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """:func:`read_spec` as the manifest's JSON dict (what ``manifest.json`` holds)."""
    return read_spec(path).to_dict()


def _spec(manifest: Manifest | dict[str, Any]) -> Manifest:
    return manifest if isinstance(manifest, Manifest) else Manifest.from_dict(manifest)


def verify_weights(path: str | Path, manifest: Manifest | dict[str, Any] | None = None) -> Path:
    """Check that the weights file exists and matches the manifest's sha256 (no TensorFlow).

    Args:
        path: the bundle directory (or its ``manifest.json``).
        manifest: its manifest (typed or dict), if already read.

    Returns:
        the weights file path.

    Raises:
        BundleError: missing weights file, or a checksum mismatch (corrupt or modified file).
    """
    path = _bundle_dir(path)
    weights = (_spec(manifest) if manifest is not None else read_spec(path)).weights
    weights_path = path / weights.file
    if not weights_path.is_file():
        raise BundleError(f"bundle {path}: weights file {weights_path.name} is missing")
    actual = _sha256(weights_path)
    if actual != weights.sha256:
        raise BundleError(
            f"bundle {path}: {weights_path.name} is corrupt or was modified (sha256 {actual[:12]}..., "
            f"manifest says {weights.sha256[:12]}...); copy the bundle again"
        )
    return weights_path


def preprocessor_from_manifest(manifest: Manifest | dict[str, Any]) -> tuple[Any, Callable[..., Any]]:
    """Build ``(config, preprocess)`` from a manifest's ``preprocessing`` section only.

    Raises:
        BundleError: unknown kind, an algorithm version this brainscan does not implement, or
            parameters the config rejects.
    """
    section = _spec(manifest).preprocessing
    kind, params = section.kind, section.params
    if kind not in PREPROCESSING_ALGORITHM_VERSION:
        raise BundleError(f"unknown preprocessing kind {kind!r}; expected one of {sorted(PREPROCESSING_KIND.values())}")
    if section.algorithm_version != PREPROCESSING_ALGORITHM_VERSION[kind]:
        raise BundleError(f"manifest preprocessing {kind} algorithm_version {section.algorithm_version} is not the "
                          f"one this brainscan implements ({PREPROCESSING_ALGORITHM_VERSION[kind]}); "
                          "use the brainscan version the bundle was made with")
    try:
        if kind == "image2d":
            from brainscan.preprocess import image2d

            config = image2d.ImagePreprocessConfig.from_dict(params)
            return config, functools.partial(image2d.preprocess_image, config=config)
        from brainscan.preprocess import volume3d

        config = volume3d.VolumePreprocessConfig.from_dict(params)
        return config, functools.partial(volume3d.preprocess_case, config=config)
    except (TypeError, ValueError, KeyError) as exc:
        raise BundleError(f"manifest preprocessing params {params} are invalid for {kind}: {exc}") from exc


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
        text = json.dumps(Manifest.from_dict(manifest).to_dict(), indent=2) + "\n"
        _fsync_write(tmp / MANIFEST_FILE, text.encode("utf-8"))
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
