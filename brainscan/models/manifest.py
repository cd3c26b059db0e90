"""The typed manifest of a model bundle: a frozen :class:`Manifest` and its sections.

``manifest.json`` is read into a :class:`Manifest` by :meth:`Manifest.from_dict`, which validates
it (:func:`validate_manifest`), and written back by :meth:`Manifest.to_dict`, which gives the same
JSON: keys the JSON lacks stay absent, and keys this brainscan does not know (in older or newer
bundles) are kept in each section's ``extra`` and written back unchanged. Nothing heavy is imported
(no TensorFlow, no NumPy), so TF-free services can read manifests.

Schema (``schema_version: 1``; ``null`` in a shape means "any size")::

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
    preprocessing   {kind: "image2d" | "volume3d", params: <config>.to_dict(), algorithm_version: int}
    inference       segmentation: {patch_size: [x, y, z], overlap, batch_size, mirror_axes, one_pass,
                    outputs: "classes" | "regions", postprocessing: {...}};
                    classification: {batch_size, tta: ["flip_lr"], temperature}; extra keys allowed
    training        {data_fingerprint, data_description, command, epochs, seed, ...free-form}
    metrics         free-form, e.g. {"val_accuracy": 0.93}
    weights         {file: "weights.npz", dtype: "float32" | "float16", sha256, num_parameters}

``preprocessing.algorithm_version`` is the version of the preprocessing code
(``brainscan/preprocess/image2d.py`` or ``volume3d.py``) the network was trained with. Bundles
written before the field existed lack it and read as the current version
(:data:`PREPROCESSING_ALGORITHM_VERSION`); their JSON is written back without it.

Example:
    >>> spec = Manifest.from_dict(json.loads(Path("models/segmentation/unet3d/2/manifest.json").read_text()))
    >>> spec.inference.patch_size, spec.inference.mirror_axes, spec.label_map[3]
    ((48, 48, 48), (0,), 4)
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import brainscan
from brainscan.errors import BundleError
from brainscan.labels import BRATS_LABELS, REGION_ORDER
from brainscan.models.registry import TASKS

SCHEMA_VERSION = 1
WEIGHTS_DTYPES = ("float32", "float16")
#: the preprocessing kind each task uses
PREPROCESSING_KIND = {"classification": "image2d", "segmentation": "volume3d"}
#: The current version of each preprocessing algorithm. Bump it when a change to
#: ``brainscan/preprocess/image2d.py`` or ``volume3d.py`` feeds a network differently for the same
#: params, and teach ``bundle.preprocessor_from_manifest`` the older version (or to refuse it).
PREPROCESSING_ALGORITHM_VERSION = {"image2d": 1, "volume3d": 1}
#: version strings double as folder names in the model store
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")

_REQUIRED = ("schema_version", "name", "task", "architecture", "version", "demo", "created_at",
             "code_version", "input", "preprocessing", "inference", "training", "metrics", "weights")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
#: fields of the section dataclasses that are bookkeeping, not JSON keys
_META = ("extra", "present", "version_recorded")


def _plain(value: Any) -> Any:
    """A JSON-ready deep copy: mappings become dicts and tuples lists."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def _keys(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in fields(cls) if f.name not in _META)


def _extra(section: Mapping[str, Any], cls: type) -> dict[str, Any]:
    """The keys of ``section`` that ``cls`` does not know (kept so that they survive a round trip)."""
    return {key: _plain(value) for key, value in section.items() if key not in _keys(cls)}


def _section(spec: Any, emit: Any = None) -> dict[str, Any]:
    """The JSON of a section dataclass: its known keys (those ``emit`` accepts, else the non-None
    ones), in field order, then its ``extra`` keys."""
    emit = emit or (lambda key, value: value is not None)
    known = {key: _plain(getattr(spec, key)) for key in _keys(type(spec)) if emit(key, getattr(spec, key))}
    return {**known, **_plain(spec.extra)}


@dataclass(frozen=True)
class ArchitectureSpec:
    """``architecture``: the registered network and its builder's keyword arguments."""

    name: str
    args: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ArchitectureSpec:
        return cls(d["name"], _plain(d["args"]), _extra(d, cls))

    def to_dict(self) -> dict[str, Any]:
        return _section(self)


@dataclass(frozen=True)
class InputSpec:
    """``input``: the network's input shape (``None`` for any size), dtype, channels, modalities."""

    shape: tuple[int | None, ...]
    channels: int
    dtype: str | None = None
    modalities: tuple[str, ...] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InputSpec:
        modalities = d.get("modalities")
        return cls(tuple(d["shape"]), d["channels"], d.get("dtype"),
                   tuple(modalities) if modalities is not None else None, _extra(d, cls))

    def to_dict(self) -> dict[str, Any]:
        order = ("shape", "dtype", "channels", "modalities")  # the order save_bundle writes
        section = _section(self)
        return {**{key: section.pop(key) for key in order if key in section}, **section}


@dataclass(frozen=True)
class PreprocessingSpec:
    """``preprocessing``: the kind, the config's params, and the version of the algorithm.

    ``version_recorded`` is false for manifests written before ``algorithm_version`` existed: they
    read as the current version and are written back without the key.
    """

    kind: str
    params: dict[str, Any]
    algorithm_version: int = 1
    extra: dict[str, Any] = field(default_factory=dict)
    version_recorded: bool = True

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PreprocessingSpec:
        kind, recorded = d["kind"], "algorithm_version" in d
        version = d["algorithm_version"] if recorded else PREPROCESSING_ALGORITHM_VERSION.get(kind, 1)
        return cls(kind, _plain(d["params"]), version, _extra(d, cls), recorded)

    def to_dict(self) -> dict[str, Any]:
        return _section(self, lambda key, value: key != "algorithm_version" or self.version_recorded)


@dataclass(frozen=True)
class InferenceSpec:
    """``inference``: how the network is run and its output turned into an answer.

    Attributes:
        patch_size, overlap, batch_size, mirror_axes, one_pass: segmentation window settings
            (``one_pass``: the whole preprocessed volume in one call); ``batch_size`` is also the
            classifier's images per call. ``None``: not recorded (callers choose the default).
        outputs: ``"classes"`` (softmax, label map) or ``"regions"`` (sigmoids WT/TC/ET).
        postprocessing: ``PostprocessConfig`` keywords (``None``: defaults).
        tta: classification test-time augmentations, e.g. ``("flip_lr",)``.
        temperature: classification temperature scaling (1: none).
        present: the keys the JSON holds; only those are written back (default: the non-default ones).
    """

    patch_size: tuple[int, ...] | None = None
    overlap: float = 0.5
    batch_size: int | None = None
    mirror_axes: tuple[int, ...] = ()
    one_pass: bool = False
    outputs: str = "classes"
    postprocessing: dict[str, Any] | None = None
    tta: tuple[str, ...] = ()
    temperature: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)
    present: frozenset[str] | None = None

    _TUPLES: ClassVar[tuple[str, ...]] = ("patch_size", "mirror_axes", "tta")

    def __post_init__(self) -> None:
        if self.present is None:
            defaults = InferenceSpec.__dataclass_fields__
            changed = {key for key in _keys(InferenceSpec) if getattr(self, key) != defaults[key].default}
            object.__setattr__(self, "present", frozenset(changed))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InferenceSpec:
        given = {key: d[key] for key in _keys(cls) if key in d}
        typed = {key: tuple(value) if key in cls._TUPLES and value is not None else _plain(value)
                 for key, value in given.items()}
        return cls(**typed, extra=_extra(d, cls), present=frozenset(given))

    def to_dict(self) -> dict[str, Any]:
        return _section(self, lambda key, value: key in self.present)


@dataclass(frozen=True)
class WeightsSpec:
    """``weights``: the file, its stored dtype, its sha256 and the number of parameters."""

    file: str
    dtype: str
    sha256: str
    num_parameters: int
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> WeightsSpec:
        return cls(d["file"], d["dtype"], d["sha256"], d["num_parameters"], _extra(d, cls))

    def to_dict(self) -> dict[str, Any]:
        return _section(self)


@dataclass(frozen=True)
class Manifest:
    """A bundle's validated manifest (the schema is in the module docstring).

    ``label_map`` and ``label_names`` have int keys here (``"3"`` in the JSON); ``training``,
    ``metrics`` and ``code_version`` are free-form. Treat the dicts as read-only.
    """

    schema_version: int
    name: str
    task: str
    architecture: ArchitectureSpec
    version: str
    demo: bool
    created_at: str
    code_version: dict[str, Any]
    input: InputSpec
    preprocessing: PreprocessingSpec
    inference: InferenceSpec
    training: dict[str, Any]
    metrics: dict[str, Any]
    weights: WeightsSpec
    classes: tuple[str, ...] | None = None
    label_map: dict[int, int] | None = None
    label_names: dict[int, str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    #: the order of the top-level keys in the JSON save_bundle writes
    _ORDER: ClassVar[tuple[str, ...]] = (
        "schema_version", "name", "task", "architecture", "version", "demo", "created_at", "code_version",
        "input", "classes", "label_map", "label_names", "preprocessing", "inference", "training", "metrics",
        "weights")
    _SECTIONS: ClassVar[dict[str, type]] = {"architecture": ArchitectureSpec, "input": InputSpec,
                                            "preprocessing": PreprocessingSpec, "inference": InferenceSpec,
                                            "weights": WeightsSpec}

    @classmethod
    def from_dict(cls, d: Any, *, source: str | Path = "manifest") -> Manifest:
        """Validate a manifest dict and type it.

        Args:
            d: the parsed ``manifest.json``.
            source: what to name in errors (the file's path).

        Raises:
            BundleError: not a JSON object, an unknown ``schema_version``, or schema problems (all listed).
        """
        if not isinstance(d, Mapping):
            raise BundleError(f"{source} must hold a JSON object, got {type(d).__name__}")
        if d.get("schema_version") != SCHEMA_VERSION:
            raise BundleError(
                f"{source} has schema_version {d.get('schema_version')!r}; brainscan {brainscan.__version__} "
                f"reads schema_version {SCHEMA_VERSION}: upgrade brainscan or re-export the bundle"
            )
        problems = validate_manifest(dict(d))
        if problems:
            raise BundleError(f"invalid manifest {source}: " + "; ".join(problems))
        values = {key: cls._SECTIONS[key].from_dict(d[key]) if key in cls._SECTIONS else _plain(d[key])
                  for key in cls._ORDER if key in d}
        if values.get("classes") is not None:
            values["classes"] = tuple(values["classes"])
        for key in ("label_map", "label_names"):
            if values.get(key) is not None:
                values[key] = {int(index): value for index, value in values[key].items()}
        return cls(**values, extra={key: _plain(value) for key, value in d.items() if key not in cls._ORDER})

    def to_dict(self) -> dict[str, Any]:
        """The manifest's JSON, as ``save_bundle`` writes it (a fresh copy)."""
        out: dict[str, Any] = {}
        for key in self._ORDER:
            value = getattr(self, key)
            if value is None:
                continue
            if key in ("label_map", "label_names"):
                value = {str(index): item for index, item in value.items()}
            out[key] = value.to_dict() if key in self._SECTIONS else _plain(value)
        return {**out, **_plain(self.extra)}

    @property
    def num_outputs(self) -> int:
        """How many output channels the network has: classes, WT/TC/ET regions, or label_map entries."""
        if self.classes is not None:
            return len(self.classes)
        if self.inference.outputs == "regions":
            return len(REGION_ORDER)  # the label_map lists the mask's labels; the channels are the regions
        return len(self.label_map or {})


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
        if get("input").get("modalities") is not None:
            expect("input.modalities", list, get("input").get("modalities"))
    for key in ("training", "metrics"):
        expect(key, dict, get(key))
    if expect("inference", dict, get("inference")):
        problems += _inference_problems(get("inference"))
    if expect("preprocessing", dict, get("preprocessing")):
        kind = get("preprocessing").get("kind")
        if task in PREPROCESSING_KIND and kind != PREPROCESSING_KIND[task]:
            problems.append(f"preprocessing.kind must be {PREPROCESSING_KIND[task]!r} for {task}, got {kind!r}")
        expect("preprocessing.params", dict, get("preprocessing").get("params"))
        if "algorithm_version" in get("preprocessing"):
            expect("preprocessing.algorithm_version", int, get("preprocessing")["algorithm_version"])
    if task == "classification" or "classes" in manifest:
        classes = get("classes")
        if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
            problems.append(f"classes must be a non-empty list of names, got {classes!r}")
    if task == "segmentation" or "label_map" in manifest:
        label_map = get("label_map")
        if not (isinstance(label_map, dict) and label_map
                and sorted(label_map) == [str(i) for i in range(len(label_map))]
                and all(v in BRATS_LABELS for v in label_map.values())):
            problems.append(f"label_map must map output indices '0'..'K-1' to BraTS labels {list(BRATS_LABELS)}, "
                            f"got {label_map!r}")
    if "label_names" in manifest:
        names = get("label_names")
        if not (isinstance(names, dict) and all(k.isdigit() and isinstance(v, str) for k, v in names.items())):
            problems.append(f"label_names must map output indices to names, got {names!r}")
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


def _is_int(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _inference_problems(section: dict[str, Any]) -> list[str]:
    """The typed keys of an ``inference`` section that :class:`InferenceSpec` cannot hold."""
    def number(value: Any) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)

    checks = {
        "patch_size": ("null or 3 positive ints",
                       lambda v: v is None or (isinstance(v, list) and len(v) == 3 and all(_is_int(p, 1) for p in v))),
        "overlap": ("a number in [0, 1)", lambda v: number(v) and 0 <= v < 1),
        "batch_size": ("a positive int", lambda v: _is_int(v, 1)),
        "mirror_axes": ("a list of spatial axes 0-2", lambda v: isinstance(v, list) and set(v) <= {0, 1, 2}
                        and all(_is_int(a) for a in v)),
        "one_pass": ("true or false", lambda v: isinstance(v, bool)),
        "outputs": ("a string", lambda v: isinstance(v, str)),
        "postprocessing": ("null or an object", lambda v: v is None or isinstance(v, dict)),
        "tta": ("a list of augmentation names", lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v)),
        "temperature": ("a finite number > 0", lambda v: number(v) and v > 0),
    }
    return [f"inference.{key} must be {wanted}, got {section[key]!r}"
            for key, (wanted, ok) in checks.items() if key in section and not ok(section[key])]


__all__ = ["PREPROCESSING_ALGORITHM_VERSION", "PREPROCESSING_KIND", "SCHEMA_VERSION", "VERSION_PATTERN",
           "WEIGHTS_DTYPES", "ArchitectureSpec", "InferenceSpec", "InputSpec", "Manifest", "PreprocessingSpec",
           "WeightsSpec", "validate_manifest"]
