"""Registry of model architectures: a manifest names an architecture and its arguments, and
:func:`build_model` rebuilds exactly that network. Training and serving both go through it.

Example:
    >>> model = build_model("resnet50", {"input_size": 224, "num_classes": 4})
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: task names used in manifests and in the model store (``models/<task>/<arch>/<version>/``)
TASKS = ("classification", "segmentation")


@dataclass(frozen=True)
class Architecture:
    """A registered builder: ``builder(**args) -> keras.Model``."""

    name: str
    task: str
    builder: Callable[..., Any]
    description: str


_REGISTRY: dict[str, Architecture] = {}


def register_architecture(name: str, task: str, description: str = "") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator that registers a model builder under ``name`` for ``task``."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")

    def wrap(builder: Callable[..., Any]) -> Callable[..., Any]:
        _REGISTRY[name] = Architecture(name=name, task=task, builder=builder, description=description)
        return builder

    return wrap


def _load_builtin() -> None:
    # Importing the architecture modules registers them; they import Keras, so this happens lazily.
    import importlib

    for module in ("brainscan.models.resnet", "brainscan.models.vit_cnn", "brainscan.models.unet3d"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


def get_architecture(name: str) -> Architecture:
    """Look up a registered architecture.

    Raises:
        KeyError: with the list of known names, if ``name`` is unknown.
    """
    if name not in _REGISTRY:
        _load_builtin()
    if name not in _REGISTRY:
        raise KeyError(f"unknown architecture {name!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def build_model(name: str, args: dict[str, Any] | None = None) -> Any:
    """Build the Keras model registered as ``name`` with keyword ``args``."""
    return get_architecture(name).builder(**(args or {}))


def list_architectures() -> list[Architecture]:
    _load_builtin()
    return sorted(_REGISTRY.values(), key=lambda a: a.name)
