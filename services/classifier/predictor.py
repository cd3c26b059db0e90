"""The classifier service's model side: load bundles once, classify one upload, explain it.

:class:`Predictor` loads the current bundle of every classification architecture in the model
store (``ModelStore.current`` then ``load_bundle``), wraps each in the one prediction path,
:class:`~brainscan.inference.classifier.Classifier` (compiled forward pass, flip TTA and temperature
from the manifest), behind a :class:`~services.classifier.batching.MicroBatcher`, and builds its
explainer (:func:`brainscan.explain.explainer_for`). Preprocessing is the bundle's own
(``bundle.preprocess``): no constant of training is re-typed here.

Blocking work (decoding, preprocessing, explanation) runs in a small pool of image threads
(``CLASSIFIER_IMAGE_WORKERS``) and the forward pass in the single inference thread; the coroutines
here only await them. Work waits in those executors' queues, so a request cancelled while it waits
(its caller went away) never starts, and a burst of heavy uploads cannot take more threads than
the machine has cores.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool

from brainscan.errors import BrainscanError, BundleError
from brainscan.preprocess.image2d import decode_image, sniff_format
from services.classifier.batching import MicroBatcher
from services.classifier.metrics import ServiceMetrics
from services.classifier.settings import Settings

log = logging.getLogger("services.classifier")
TASK = "classification"


class UnknownModelError(BrainscanError):
    """``?model=`` names no classification architecture this service knows (404)."""

    code = "unknown_model"
    http_status = 404


@dataclass
class LoadedModel:
    """One served model: its bundle, batcher and explainer."""

    name: str
    bundle: Any
    batcher: MicroBatcher
    explainer: Any
    classifier: Any = None  # brainscan.inference.classifier.Classifier

    def describe(self) -> dict[str, Any]:
        """The model's entry in ``GET /v1/models``."""
        spec = self.bundle.spec
        return {
            "name": self.name,
            "arch": self.bundle.architecture,
            "version": self.bundle.version,
            "demo": self.bundle.demo,
            "classes": list(self.bundle.classes),
            "input_size": self.bundle.preprocess_config.input_size,
            "metrics": spec.metrics,
            "created_at": spec.created_at,
            "manifest": self.bundle.manifest,
        }


class Predictor:
    """Every model the service serves, and the classification of one upload.

    Args:
        settings: the service settings.
        metrics: where batch sizes and inference times are recorded.

    Attributes:
        models: architecture name -> :class:`LoadedModel`.
        missing: expected architectures with no bundle in the store -> why.
        failed: architectures whose current bundle could not be loaded -> the ``BundleError`` message.
    """

    def __init__(self, settings: Settings, metrics: ServiceMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.models: dict[str, LoadedModel] = {}
        self.missing: dict[str, str] = {}
        self.failed: dict[str, str] = {}
        self._bundles: dict[str, Any] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="classifier-inference")
        self._image_executor = ThreadPoolExecutor(max_workers=settings.image_workers,
                                                  thread_name_prefix="classifier-image")

    # -- life cycle -------------------------------------------------------------------------

    def load(self) -> None:
        """Blocking: load the current bundle of each classification architecture in the store.

        A missing store or architecture is logged and listed in :attr:`missing`; a bundle that
        fails to load is logged with its ``BundleError`` message, listed in :attr:`failed` and
        skipped, so the service stays up with the others.
        """
        from brainscan.models.bundle import load_bundle
        from brainscan.models.store import ModelStore

        store = ModelStore(self.settings.store_root())
        task_dir = store.root / TASK
        found = sorted(d.name for d in task_dir.iterdir() if d.is_dir() and not d.name.startswith(".")) \
            if task_dir.is_dir() else []
        if not store.root.is_dir():
            log.warning("model store %s does not exist; no classifier is served", store.root)
        for arch in self.settings.expected:
            if arch not in found:
                self.missing[arch] = f"no {TASK}/{arch} bundle in the model store {store.root}"
                log.warning("model %s is missing: %s", arch, self.missing[arch])
        for arch in found:
            try:
                path = store.current(TASK, arch)
                bundle = load_bundle(path)
                if bundle.task != TASK:
                    raise BundleError(f"bundle {path} is a {bundle.task} bundle, not {TASK}")
                explainer = self._explainer(bundle)
            except BundleError as exc:
                self.failed[arch] = exc.message
                log.error("skipping model %s: %s", arch, exc.message, extra={"model": arch, "error": exc.code})
                continue
            except Exception as exc:  # noqa: BLE001 - one bad bundle must not take the service down
                self.failed[arch] = f"{type(exc).__name__}: {exc}"
                log.exception("skipping model %s: %s", arch, exc, extra={"model": arch})
                continue
            self._bundles[arch] = (bundle, explainer)
            log.info("loaded model %s version %s from %s", arch, bundle.version, bundle.path,
                     extra={"model": arch, "version": bundle.version, "demo": bundle.demo})

    @staticmethod
    def _explainer(bundle: Any) -> Any:
        from brainscan.explain import explainer_for

        try:
            return explainer_for(bundle.model)
        except ValueError as exc:
            raise BundleError(f"bundle {bundle.path}: no explanation method fits the network: {exc}") from exc

    async def start(self) -> None:
        """Start a batcher per loaded model (needs the running loop) and warm the networks up."""
        from brainscan.inference.classifier import Classifier

        for arch, (bundle, explainer) in self._bundles.items():
            # The one prediction path (compiled forward pass, the manifest's flip TTA and temperature):
            # what evaluate and predict report is what is served.
            classifier = Classifier.from_bundle(bundle, batch_size=max(self.settings.max_batch, 1))
            batcher = MicroBatcher(
                classifier.probabilities,
                name=arch,
                executor=self._executor,
                max_batch=self.settings.max_batch,
                window_ms=self.settings.batch_window_ms,
                on_batch=lambda size, seconds, arch=arch: self.metrics.observe_batch(arch, size, seconds),
            )
            batcher.start()
            self.models[arch] = LoadedModel(arch, bundle, batcher, explainer, classifier)
        self.metrics.models_loaded.set(len(self.models))
        if self.settings.warmup:
            for loaded in self.models.values():
                size = loaded.bundle.preprocess_config.input_size
                channels = loaded.bundle.preprocess_config.channels
                blank = np.zeros((1, size, size, channels), np.float32)
                # traces the forward pass and the explainer off the request path (~1 s each)
                await self._executor_call(loaded.batcher.forward, blank)
                await self._image_work(loaded.explainer, blank, 0)

    async def _executor_call(self, function: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def _image_work(self, function: Any, *args: Any) -> Any:
        """Await ``function(*args)`` in an image thread, counted in ``classifier_image_tasks``.

        Cancelling the caller while the task waits for a thread removes it from the queue
        unstarted; a task already running finishes (a second at most) and its result is dropped.
        """
        queued = self.metrics.image_tasks.labels(state="queued")
        running = self.metrics.image_tasks.labels(state="running")

        def task() -> Any:
            queued.dec()
            running.inc()
            try:
                return function(*args)
            finally:
                running.dec()

        def dropped(done: Future[Any]) -> None:
            if done.cancelled():
                queued.dec()
                self.metrics.image_tasks_dropped.inc()

        queued.inc()
        future = self._image_executor.submit(task)
        future.add_done_callback(dropped)
        return await asyncio.wrap_future(future)

    async def close(self) -> None:
        """Stop the batchers, the image threads and the inference thread."""
        for loaded in self.models.values():
            await loaded.batcher.close()
        await run_in_threadpool(self._image_executor.shutdown, True, cancel_futures=True)
        await run_in_threadpool(self._executor.shutdown, True)

    # -- queries ----------------------------------------------------------------------------

    def readiness(self) -> dict[str, Any]:
        """``{"ready", "models": {name: version}, "missing": {...}, "failed": {...}}``."""
        return {
            "ready": bool(self.models),
            "models": {name: loaded.bundle.version for name, loaded in self.models.items()},
            "missing": dict(self.missing),
            "failed": dict(self.failed),
        }

    def resolve(self, name: str | None) -> LoadedModel:
        """The model for ``?model=name`` (``None``: the default model).

        Raises:
            UnknownModelError: (404) a name the service has never heard of.
            BundleError: (503, ``model_unavailable``) a known model that is not loaded.
        """
        name = self.settings.default_model if name is None else name
        if name in self.models:
            return self.models[name]
        loaded = sorted(self.models)
        if name in self.failed or name in self.missing or name == self.settings.default_model:
            reason = self.failed.get(name) or self.missing.get(name) or "it is not in the model store"
            hint = f"; loaded: {loaded}" if loaded else "; no model is loaded, see GET /readyz"
            raise BundleError(f"model {name!r} is not available: {reason}{hint}", code="model_unavailable")
        known = sorted(set(self.models) | set(self.failed) | set(self.missing))
        raise UnknownModelError(f"unknown model {name!r}; choose one of {known} (GET /v1/models lists them)")

    # -- classification ---------------------------------------------------------------------

    async def classify(self, raw: bytes, *, filename: str, model: str | None, explain: bool) -> dict[str, Any]:
        """Classify one upload; the response body of ``POST /v1/classify`` minus ``request_id``.

        Raises:
            BrainscanError subclasses for bad input (400/413/415/422), unknown (404) or
            unavailable (503) models.
        """
        started = time.perf_counter()
        loaded = self.resolve(model)
        grey, image = await self._image_work(self._decode, raw, filename, loaded)
        decoded = time.perf_counter()
        result = await loaded.batcher.submit(image)
        probabilities = np.asarray(result.output, dtype=np.float64)
        class_index = int(np.argmax(probabilities))
        classes = loaded.bundle.classes
        heatmap, explain_ms = None, 0.0
        if explain:
            explain_start = time.perf_counter()
            heatmap = await self._image_work(self._explain, loaded, image, class_index)
            explain_ms = (time.perf_counter() - explain_start) * 1000.0
            self.metrics.explain.labels(model=loaded.name, method=heatmap["method"]).observe(explain_ms / 1000.0)
        return {
            "label": classes[class_index],
            "probabilities": {name: float(p) for name, p in zip(classes, probabilities)},
            "model": {"name": loaded.name, "arch": loaded.bundle.architecture,
                      "version": loaded.bundle.version, "demo": loaded.bundle.demo,
                      "tta": list(loaded.classifier.tta), "temperature": loaded.classifier.temperature},
            "heatmap": heatmap,
            "image": {"width": int(grey.shape[1]), "height": int(grey.shape[0]), "format": sniff_format(raw)},
            "timings": {
                "decode_ms": (decoded - started) * 1000.0,
                "queue_ms": result.queue_ms,
                "inference_ms": result.inference_ms,
                "explain_ms": explain_ms,
                "total_ms": (time.perf_counter() - started) * 1000.0,
            },
        }

    def _decode(self, raw: bytes, filename: str, loaded: LoadedModel) -> tuple[np.ndarray, np.ndarray]:
        """Blocking: decode by content with the service's limits, then the bundle's preprocessing."""
        grey = decode_image(raw, name=filename, max_bytes=self.settings.max_upload_bytes,
                            max_pixels=self.settings.max_pixels, max_decoded_bytes=self.settings.max_decoded_bytes)
        return grey, loaded.bundle.preprocess(grey)

    @staticmethod
    def _explain(loaded: LoadedModel, image: np.ndarray, class_index: int) -> dict[str, str]:
        """Blocking: heatmap of ``class_index`` rendered over the model's view of the image."""
        from brainscan.explain import heatmap_pngs, model_view

        heat = loaded.explainer(image, class_index)
        config = loaded.bundle.preprocess_config
        # zero_one inputs have a fixed range; other normalisations are stretched for display
        view = model_view(image, value_range=(0.0, 1.0) if config.normalization == "zero_one" else None)
        return {"method": loaded.explainer.method, **heatmap_pngs(heat, view)}
