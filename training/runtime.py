"""Device set-up shared by the training commands: seeds, mixed precision on GPU, multi-GPU strategy."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """What the training loop needs to know about the machine it runs on."""

    strategy: Any  # tf.distribute.Strategy
    gpus: int
    mixed_precision: bool

    @property
    def replicas(self) -> int:
        return int(self.strategy.num_replicas_in_sync)


def setup_runtime(seed: int, *, mixed_precision: str = "auto") -> Runtime:
    """Seed every generator and pick the precision and distribution strategy.

    Args:
        seed: seeds Python, NumPy and TensorFlow (``keras.utils.set_random_seed``).
        mixed_precision: ``"auto"`` (float16 compute on GPUs, float32 on CPU), ``"on"`` or ``"off"``.

    Returns:
        A :class:`Runtime`: ``MirroredStrategy`` across all GPUs when there are several, the default
        strategy otherwise.
    """
    if mixed_precision not in ("auto", "on", "off"):
        raise ValueError(f"mixed_precision must be auto, on or off, got {mixed_precision!r}")
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    use_mixed = mixed_precision == "on" or (mixed_precision == "auto" and bool(gpus))
    keras.mixed_precision.set_global_policy("mixed_float16" if use_mixed else "float32")
    strategy = tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()
    log.info("devices: %d GPU(s), %d replica(s), mixed precision %s", len(gpus),
             strategy.num_replicas_in_sync, "on" if use_mixed else "off")
    return Runtime(strategy=strategy, gpus=len(gpus), mixed_precision=use_mixed)
