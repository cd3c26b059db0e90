"""The segmentation bundles a worker pool process keeps loaded, by ``(arch, version)``.

Loading imports TensorFlow: a pool process fills its cache after the fork (``worker_process_init``),
never the worker's main process (see :mod:`services.segmenter.worker`).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from brainscan.errors import BundleError
from services.segmenter.settings import Settings

log = logging.getLogger("services.segmenter.worker")

SEGMENTATION = "segmentation"
#: bundles a pool process keeps loaded (current versions plus those older jobs asked for)
MODEL_CACHE_SIZE = 4


@dataclass
class LoadedSegmenter:
    """A bundle ready to serve: the bundle and its compiled ``predict_fn`` (one trace per process)."""

    bundle: Any
    predict_fn: Callable[[Any], Any]


class ModelCache:
    """The segmentation bundles of one pool process, keyed by ``(arch, version)``.

    Args:
        settings: where the model store is.
        size: most bundles kept; the least recently used is dropped.
    """

    def __init__(self, settings: Settings, size: int = MODEL_CACHE_SIZE) -> None:
        self.settings = settings
        self.size = size
        self._models: OrderedDict[tuple[str, str], LoadedSegmenter] = OrderedDict()

    def load_current(self) -> dict[str, str]:
        """Load the current version of every segmentation architecture in the store.

        Returns:
            architecture -> version loaded, or ``"error: <reason>"`` (logged; the others still load).
        """
        from brainscan.models.store import ModelStore

        store = ModelStore(self.settings.store_root())
        task_dir = store.root / SEGMENTATION
        archs = sorted(d.name for d in task_dir.iterdir() if d.is_dir() and not d.name.startswith(".")) \
            if task_dir.is_dir() else []
        loaded: dict[str, str] = {}
        for arch in archs:
            try:
                version = store.current_version(SEGMENTATION, arch)
                self.get(arch, version)
                loaded[arch] = version
            except Exception as exc:  # noqa: BLE001 - one bad bundle must not stop the worker
                loaded[arch] = f"error: {getattr(exc, 'message', exc)}"
                log.error("cannot load segmentation model %s: %s", arch, exc, extra={"model": arch})
        if not archs:
            log.warning("no segmentation bundle in the model store %s", store.root)
        return loaded

    def get(self, arch: str, version: str) -> LoadedSegmenter:
        """The bundle ``segmentation/<arch>/<version>``, loaded (and warmed up) on first use.

        Raises:
            BundleError: missing or invalid bundle, or not a segmentation bundle.
        """
        key = (arch, version)
        if key in self._models:
            self._models.move_to_end(key)
            return self._models[key]
        from brainscan.inference.segmenter import inference_settings
        from brainscan.inference.sliding_window import keras_predict_fn
        from brainscan.models.bundle import load_bundle
        from brainscan.models.store import ModelStore

        path = ModelStore(self.settings.store_root()).arch_dir(SEGMENTATION, arch) / version
        started = time.perf_counter()
        bundle = load_bundle(path, precision=self.settings.precision)
        if bundle.task != SEGMENTATION:
            raise BundleError(f"bundle {path} is a {bundle.task} bundle, not a segmentation one")
        settings = inference_settings(bundle)
        predict_fn = keras_predict_fn(bundle.model, batch_size=settings["batch_size"])
        if self.settings.warmup:
            import numpy as np

            channels = bundle.spec.input.channels
            predict_fn(np.zeros((1, *settings["patch_size"], channels), np.float32))  # traces the graph
        self._models[key] = LoadedSegmenter(bundle, predict_fn)
        while len(self._models) > self.size:
            self._models.popitem(last=False)
        log.info("loaded segmentation model %s version %s in %.1f s (%s)", arch, version,
                 time.perf_counter() - started, bundle.precision,
                 extra={"model": arch, "version": version, "precision": bundle.precision})
        return self._models[key]
