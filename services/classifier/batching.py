"""Micro-batching: many concurrent requests, one batched forward pass per model.

Requests call :meth:`MicroBatcher.submit` from the event loop with one preprocessed image. A
collector task per model takes the first waiting image, then gathers more for up to
``window_ms`` or until ``max_batch`` are waiting, and runs ONE forward pass over the stack in the
inference executor (a single dedicated thread shared by all models, so TensorFlow never competes
with itself for the two cores and the event loop never blocks). While a batch runs, new requests
queue up and form the next batch, so batches grow with load on their own.

Batches are zero-padded to a few bucket sizes (1, 2, 4, 8, 16, ...) so the compiled
``tf.function`` sees few distinct shapes; padded rows are dropped from the output. Every model in
this project is per-sample in inference mode (BatchNorm uses moving statistics), so padding does
not change a request's result.

Example:
    >>> batcher = MicroBatcher(forward, name="resnet50", executor=executor, max_batch=16, window_ms=5)
    >>> batcher.start()
    >>> result = await batcher.submit(image)        # result.output: this image's probabilities
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from brainscan.errors import BundleError

log = logging.getLogger(__name__)

#: padding sizes; batches are padded up to the smallest bucket that holds them
DEFAULT_BUCKETS = (1, 2, 4, 8, 16)


def bucket_sizes(max_batch: int, buckets: tuple[int, ...] = DEFAULT_BUCKETS) -> tuple[int, ...]:
    """The padding sizes for ``max_batch``: the default buckets below it, then ``max_batch`` itself.

    Example:
        >>> bucket_sizes(16), bucket_sizes(12), bucket_sizes(40)
        ((1, 2, 4, 8, 16), (1, 2, 4, 8, 12), (1, 2, 4, 8, 16, 40))
    """
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
    return tuple(sorted({b for b in buckets if b < max_batch} | {max_batch}))


def pad_to_bucket(batch: np.ndarray, sizes: tuple[int, ...]) -> np.ndarray:
    """Zero-pad ``(N, ...)`` along axis 0 to the smallest size in ``sizes`` that is >= N."""
    count = batch.shape[0]
    target = next((size for size in sizes if size >= count), None)
    if target is None:
        raise ValueError(f"a batch of {count} exceeds the largest bucket {sizes[-1]}")
    if target == count:
        return batch
    padded = np.zeros((target, *batch.shape[1:]), dtype=batch.dtype)
    padded[:count] = batch
    return padded


@dataclass(frozen=True)
class BatchResult:
    """One request's share of a batched forward pass.

    Attributes:
        output: the model output for this request's image, e.g. ``(num_classes,)`` probabilities.
        batch_size: how many requests shared the forward pass (padding not counted).
        queue_ms: from :meth:`MicroBatcher.submit` to the start of the forward pass.
        inference_ms: duration of the forward pass (shared by the whole batch).
    """

    output: np.ndarray
    batch_size: int
    queue_ms: float
    inference_ms: float


@dataclass
class _Pending:
    image: np.ndarray
    future: asyncio.Future[BatchResult]
    submitted: float


class MicroBatcher:
    """Collects single-image requests into batches for one model.

    Args:
        forward: ``(B, ...) float32 -> (B, ...)`` numpy, called in ``executor`` (blocking is fine
            there). B is always one of the bucket sizes.
        name: the model's name, for logs and metrics.
        executor: where ``forward`` runs; share one single-thread executor between models.
        max_batch: largest number of requests per forward pass.
        window_ms: how long the first request of a batch waits for company.
        on_batch: called as ``on_batch(batch_size, seconds)`` after each forward pass (metrics).

    Raises:
        ValueError: a non-positive ``max_batch`` or a negative ``window_ms``.
    """

    def __init__(
        self,
        forward: Callable[[np.ndarray], np.ndarray],
        *,
        name: str,
        executor: Executor,
        max_batch: int = 16,
        window_ms: float = 5.0,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if not window_ms >= 0:
            raise ValueError(f"window_ms must be >= 0, got {window_ms}")
        self.sizes = bucket_sizes(max_batch)
        self.forward = forward
        self.name = name
        self.max_batch = max_batch
        self.window_s = window_ms / 1000.0
        self._executor = executor
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the collector task on the running event loop (call once, from async code)."""
        if self._task is not None:
            raise RuntimeError(f"batcher {self.name!r} is already running")
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._collect(), name=f"batcher-{self.name}")

    async def close(self) -> None:
        """Stop collecting; requests still queued fail with a 503 :class:`BundleError`."""
        if self._task is None:
            return
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None
        while self._queue is not None and not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(
                    BundleError(f"model {self.name!r} is shutting down; retry", code="model_unavailable"))

    async def submit(self, image: np.ndarray) -> BatchResult:
        """Queue one image ``(S, S, C)`` and wait for its share of a batched forward pass.

        Raises:
            RuntimeError: the batcher was not started.
            Whatever ``forward`` raised for the batch.
        """
        if self._task is None or self._queue is None or self._task.done():
            raise RuntimeError(f"batcher {self.name!r} is not running")
        future: asyncio.Future[BatchResult] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(np.asarray(image, dtype=np.float32), future, time.perf_counter()))
        return await future

    async def _gather(self) -> list[_Pending]:
        """Wait for a first request, then collect more for up to the window or ``max_batch``."""
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self.window_s
        while len(batch) < self.max_batch:
            if not self._queue.empty():  # requests that queued while the last batch ran
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        # a client that went away cancels its future: do not spend inference on it
        return [pending for pending in batch if not pending.future.done()]

    def _run(self, images: list[np.ndarray]) -> tuple[np.ndarray, float]:
        """Blocking: stack, pad, run ``forward``, drop the padding (runs in the executor)."""
        start = time.perf_counter()
        stacked = pad_to_bucket(np.stack(images), self.sizes)
        outputs = np.asarray(self.forward(stacked))[: len(images)]
        return outputs, time.perf_counter() - start

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            if not batch:
                continue
            started = time.perf_counter()
            try:
                outputs, seconds = await loop.run_in_executor(self._executor, self._run, [p.image for p in batch])
            except asyncio.CancelledError:
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(
                            BundleError(f"model {self.name!r} is shutting down; retry", code="model_unavailable"))
                raise
            except Exception as exc:  # noqa: BLE001 - the requests get the error, the collector lives on
                log.exception("batched forward pass of %s failed for %d requests", self.name, len(batch))
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                continue
            if self._on_batch is not None:
                self._on_batch(len(batch), seconds)
            for pending, output in zip(batch, outputs):
                if not pending.future.done():
                    pending.future.set_result(BatchResult(
                        output=output,
                        batch_size=len(batch),
                        queue_ms=(started - pending.submitted) * 1000.0,
                        inference_ms=seconds * 1000.0,
                    ))
