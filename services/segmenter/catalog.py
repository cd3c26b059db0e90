"""The segmentation bundles of the model store as the segmenter API sees them: manifests only, no TensorFlow."""

from __future__ import annotations

from typing import Any

from brainscan.errors import BrainscanError, BundleError
from services.segmenter.settings import Settings

SEGMENTATION = "segmentation"


class UnknownModelError(BrainscanError):
    """A ``?model=`` this service has never heard of (404)."""

    code = "unknown_model"
    http_status = 404


class ModelCatalog:
    """The segmentation bundles of the model store, read from manifests (no TensorFlow)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def _store(self) -> Any:
        from brainscan.models.store import ModelStore

        return ModelStore(self.settings.store_root())

    def names(self) -> list[str]:
        """Architectures with a folder under ``<store>/segmentation``."""
        task_dir = self._store().root / SEGMENTATION
        if not task_dir.is_dir():
            return []
        return sorted(d.name for d in task_dir.iterdir() if d.is_dir() and not d.name.startswith("."))

    def resolve(self, name: str | None) -> dict[str, Any]:
        """``{"name", "arch", "version", "demo"}`` of the current bundle of ``name`` (default model if None).

        Raises:
            UnknownModelError: (404) not in the store and not the default model.
            BundleError: (503, ``model_unavailable``) the model's bundle is missing or invalid.
        """
        from brainscan.models.bundle import read_spec

        name = name or self.settings.default_model
        known = self.names()
        if name not in known and name != self.settings.default_model:
            raise UnknownModelError(f"unknown model {name[:64]!r}; choose one of {known} (GET /v1/models lists them)")
        store = self._store()
        try:
            path = store.current(SEGMENTATION, name)
            spec = read_spec(path)
        except (BundleError, ValueError) as exc:
            reason = self.settings.redact_paths(getattr(exc, "message", str(exc)))
            raise BundleError(f"model {name!r} is not available: {reason}", code="model_unavailable") from exc
        return {"name": name, "arch": spec.architecture.name, "version": spec.version, "demo": spec.demo}

    def describe(self) -> list[dict[str, Any]]:
        """One entry per architecture for ``GET /v1/models`` (``error`` set for an unusable one)."""
        from brainscan.models.bundle import read_spec

        store = self._store()
        entries = []
        for name in self.names():
            try:
                path = store.current(SEGMENTATION, name)
                spec = read_spec(path)
            except (BundleError, ValueError) as exc:
                entries.append({"name": name, "error": self.settings.redact_paths(getattr(exc, "message", str(exc)))})
                continue
            manifest = spec.to_dict()  # the JSON as stored, served whole
            entries.append({
                "name": name, "arch": spec.architecture.name, "version": spec.version,
                "demo": spec.demo, "versions": store.versions(SEGMENTATION, name),
                "label_map": manifest.get("label_map"), "label_names": manifest.get("label_names"),
                "modalities": list(spec.input.modalities) if spec.input.modalities else None,
                "inference": manifest.get("inference"), "metrics": spec.metrics, "created_at": spec.created_at,
                "manifest": manifest,
            })
        return entries
