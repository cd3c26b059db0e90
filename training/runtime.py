"""Device set-up shared by the training commands: seeds, mixed precision on GPU, multi-GPU strategy."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

#: Comma-separated TensorFlow device names to train on with ``MirroredStrategy`` (for example
#: ``/gpu:0,/gpu:2``); unset: every GPU present. Also how tests run the multi-replica path on CPUs.
DEVICES_ENV = "BRAINSCAN_TRAIN_DEVICES"
MIXED_PRECISION_CHOICES = ("auto", "on", "bf16", "off")


@dataclass
class Runtime:
    """What the training loop needs to know about the machine it runs on."""

    strategy: Any  # tf.distribute.Strategy
    gpus: int
    mixed_precision: bool  # float16 compute, which needs loss scaling
    policy: str = "float32"  # the Keras dtype policy in force: float32, mixed_float16 or mixed_bfloat16

    @property
    def replicas(self) -> int:
        return int(self.strategy.num_replicas_in_sync)


def without_autotune(dataset: Any) -> Any:
    """``dataset`` (a ``tf.data.Dataset``) with tf.data's autotuning turned off.

    Its ``AUTOTUNE`` parallel calls then run one per schedulable core, and ``prefetch(AUTOTUNE)`` still fills
    its buffer ahead of the consumer. With autotuning on, every iterator Keras drops (the training one at
    each epoch's end, the validation one after each evaluation) waits for the autotuner's sleeping thread,
    idle time that made up about a third of the tiny training runs in the tests (bench/README.md,
    ``suite_cpu.py``); the weights and accuracy are the same either way.
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


def setup_runtime(seed: int, *, mixed_precision: str = "auto") -> Runtime:
    """Seed every generator and pick the precision and distribution strategy.

    Args:
        seed: seeds Python, NumPy and TensorFlow (``keras.utils.set_random_seed``).
        mixed_precision: ``"auto"`` (float16 compute on GPUs, float32 on CPU), ``"on"`` (float16),
            ``"bf16"`` (bfloat16 compute: no loss scaling needed; 1.5x faster on CPUs with
            avx512_bf16 or AMX) or ``"off"``.

    Returns:
        A :class:`Runtime`: ``MirroredStrategy`` across all GPUs when there are several (or across
        the devices named in ``$BRAINSCAN_TRAIN_DEVICES``), the default strategy otherwise.
    """
    if mixed_precision not in MIXED_PRECISION_CHOICES:
        raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION_CHOICES}, got {mixed_precision!r}")
    import keras

    keras.utils.set_random_seed(seed)
    if keras.backend.backend() != "tensorflow":
        return _setup_without_tensorflow(mixed_precision)
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    use_mixed, policy = _policy(mixed_precision, bool(gpus))
    keras.mixed_precision.set_global_policy(policy)
    devices = [d.strip() for d in os.environ.get(DEVICES_ENV, "").split(",") if d.strip()]
    if len(devices) > 1:
        strategy = tf.distribute.MirroredStrategy(devices=devices)
    elif len(devices) == 1:
        strategy = tf.distribute.OneDeviceStrategy(devices[0])
    elif len(gpus) > 1:
        strategy = tf.distribute.MirroredStrategy()
    else:
        strategy = tf.distribute.get_strategy()
    log.info("devices: %d GPU(s), %d replica(s), dtype policy %s", len(gpus), strategy.num_replicas_in_sync, policy)
    return Runtime(strategy=strategy, gpus=len(gpus), mixed_precision=use_mixed, policy=policy)


def _policy(mixed_precision: str, on_gpu: bool) -> tuple[bool, str]:
    """(float16 compute?, the Keras dtype policy) for a ``--mixed-precision`` choice."""
    use_mixed = mixed_precision == "on" or (mixed_precision == "auto" and on_gpu)
    return use_mixed, "mixed_float16" if use_mixed else "mixed_bfloat16" if mixed_precision == "bf16" else "float32"


class SingleDevice:
    """The strategy of a Keras backend other than TensorFlow: one device, nothing to distribute."""

    num_replicas_in_sync = 1

    def scope(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def _setup_without_tensorflow(mixed_precision: str) -> Runtime:
    """JAX (or another Keras backend): one device, the first GPU when there is one.

    This is how a GPU machine without TensorFlow trains (``KERAS_BACKEND=jax``); several GPUs are
    not used together here.
    """
    import keras

    gpus = 0
    if keras.backend.backend() == "jax":
        import jax

        gpus = sum(1 for d in jax.devices() if d.platform == "gpu")
    use_mixed, policy = _policy(mixed_precision, gpus > 0)
    keras.mixed_precision.set_global_policy(policy)
    log.info("devices: %d GPU(s) (Keras backend %s; one used), 1 replica(s), dtype policy %s",
             gpus, keras.backend.backend(), policy)
    return Runtime(strategy=SingleDevice(), gpus=gpus, mixed_precision=use_mixed, policy=policy)


@functools.cache
def _replica_safe_loss_scale_optimizer_class():
    """``keras.optimizers.LossScaleOptimizer`` whose overflow check agrees across replicas.

    Keras decides whether to apply a step from the *first* replica's gradients only (its comment
    assumes they are already all-reduced; they are not yet), so when only another replica
    overflows, the inf gradients are summed into the update and the weights turn NaN (seen with
    two replicas and float16 on CPU). Here the replicas that overflowed are counted across all of
    them first, and the step is applied only when none did.
    """
    import keras
    import tensorflow as tf

    @keras.saving.register_keras_serializable(package="brainscan")
    class ReplicaSafeLossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
        def check_finite(self, grads):
            finite = super().check_finite(grads)
            context = tf.distribute.get_replica_context()
            if context is None or context.num_replicas_in_sync == 1:
                return finite
            overflowed = context.all_reduce(tf.distribute.ReduceOp.SUM, 1.0 - tf.cast(finite, tf.float32))
            return overflowed < 0.5

    return ReplicaSafeLossScaleOptimizer


def wrap_optimizer(optimizer: Any, runtime: Runtime) -> Any:
    """The optimizer to compile with: loss-scaled (replica-safe) under mixed precision, else as is."""
    if not runtime.mixed_precision:
        return optimizer
    import keras

    if keras.backend.backend() != "tensorflow":
        return keras.optimizers.LossScaleOptimizer(optimizer)  # one device: nothing to agree across
    return _replica_safe_loss_scale_optimizer_class()(optimizer)


@functools.cache
def _once_a_step_cosine_decay_class():
    """``keras.optimizers.schedules.CosineDecay`` (with its linear warm-up) built once per traced step.

    AdamW reads the learning rate once for every variable it decays (Keras' TensorFlow optimizer), and
    CosineDecay's warm-up is a ``tf.cond``: tracing a tiny ResNet50's training step built some 270 of
    them, which took 13 s against 8 s at a constant rate (one core). Here the first read in a graph
    is kept and handed to the later ones in that same graph: the same value, as nothing between
    them moves the step counter. Eager calls and other backends (whose traces must not keep values
    across calls) compute it each time, as CosineDecay does.
    """
    import weakref

    import keras

    @keras.saving.register_keras_serializable(package="brainscan")
    class OnceAStepCosineDecay(keras.optimizers.schedules.CosineDecay):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._per_graph: Any = weakref.WeakKeyDictionary()

        def __call__(self, step: Any) -> Any:
            if keras.backend.backend() != "tensorflow":
                return super().__call__(step)
            import tensorflow as tf

            if tf.executing_eagerly():
                return super().__call__(step)
            graph = tf.compat.v1.get_default_graph()
            kept = self._per_graph.get(graph)
            if kept is None or kept[0] is not step:
                kept = (step, super().__call__(step))
                self._per_graph[graph] = kept
            return kept[1]

    return OnceAStepCosineDecay


def cosine_schedule(**kwargs: Any) -> Any:
    """The warm-up and cosine-decay learning rate both trainers use: CosineDecay's arguments and values,
    traced once a step (:func:`_once_a_step_cosine_decay_class`)."""
    return _once_a_step_cosine_decay_class()(**kwargs)


def build_optimizer(model: Any) -> None:
    """Create the compiled optimizer's variables now, in the strategy scope the caller holds.

    Left to Keras, the slots (and the weight averages) are created inside the first trace of the
    training step, and ``tf.function`` then traces that step a second time without variable
    creation: every run set up its step twice. The run is the same either way (weights and their
    averages; tests/training/test_runtime.py checks it).
    """
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)


def build_metrics(model: Any, dataset: Any) -> None:
    """Create the compiled metrics' variables (and build the compiled loss) now, from the shapes of
    ``dataset``'s batches, before ``fit`` traces the training step.

    Keras builds them inside the first trace of the step unless the model runs under an explicit
    distribution strategy (several replicas, or one device named by :data:`DEVICES_ENV`), and
    ``tf.function`` then traces the whole step a second time without variable creation, as it did for
    the optimizer's slots (:func:`build_optimizer`). Under a strategy Keras has built them itself and
    this changes nothing. Only the TensorFlow backend traces so; other backends, and data without an
    ``element_spec``, are left to Keras.
    """
    import keras

    spec = getattr(dataset, "element_spec", None)
    if keras.backend.backend() != "tensorflow" or spec is None:
        return
    with model.distribute_strategy.scope():
        model._symbolic_build(data_batch=spec)  # what Keras runs itself before fit under a strategy


def load_checkpoint(path: Any) -> Any:
    """``keras.models.load_model(path)`` for a training checkpoint (``last.keras``), in a fresh process.

    Registers everything a checkpoint may name before loading: the custom layers of the
    architectures, the segmentation losses and metrics, the learning-rate schedule and the loss-scaled
    optimizer. (A resumed run is a new process; without this the ViT-CNN's ``ClassToken`` was unknown.)
    """
    import keras

    import brainscan.models.layers  # noqa: F401  (registers the custom layers)
    import training.losses  # noqa: F401  (registers DiceCELoss, ForegroundDice)
    from brainscan.models.registry import list_architectures

    list_architectures()  # imports every architecture module
    _once_a_step_cosine_decay_class()
    if keras.backend.backend() == "tensorflow":
        _replica_safe_loss_scale_optimizer_class()
    return keras.models.load_model(path)
