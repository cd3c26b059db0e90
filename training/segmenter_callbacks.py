"""Keras callbacks of the segmenter trainer that need nothing of its state: the learning rate of a
time-budgeted run (``--max-minutes``) and the tqdm progress bar (``--progress tqdm``)."""

from __future__ import annotations

import time
from typing import Any


def timed_cosine_rate(peak: float, fraction: float, *, epoch: int, warmup_epochs: int, alpha: float = 0.01) -> float:
    """The learning rate of a time-budgeted run (``--max-minutes``): a linear warm-up from ``peak / 100``
    over the first ``warmup_epochs`` epochs, then a cosine decay to ``alpha * peak`` over the budget's
    ``fraction`` spent (clipped to [0, 1])."""
    import math

    if epoch < warmup_epochs:
        return peak / 100 + (peak - peak / 100) * epoch / warmup_epochs
    fraction = min(1.0, max(0.0, fraction))
    return peak * (alpha + (1.0 - alpha) * 0.5 * (1.0 + math.cos(math.pi * fraction)))


def timed_cosine_callback(peak: float, budget_seconds: float, *, warmup_epochs: int, initial_epoch: int) -> Any:
    """A Keras callback setting the learning rate at each epoch's start from the share of the time
    budget spent (:func:`timed_cosine_rate`): the decay ends when the budget does, whatever the
    machine's speed. Per epoch because a backend without eager variables (JAX) reads the optimizer's
    variables at epoch starts."""
    import keras

    class _TimedCosineSchedule(keras.callbacks.Callback):
        def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
            self.start = time.monotonic()

        def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            fraction = (time.monotonic() - self.start) / budget_seconds
            # A resumed run (initial_epoch > 0) has warmed up already; its budget starts anew.
            rate = timed_cosine_rate(peak, fraction, epoch=epoch - initial_epoch,
                                     warmup_epochs=0 if initial_epoch else warmup_epochs)
            self.model.optimizer.learning_rate = rate

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            if logs is not None:
                logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

    return _TimedCosineSchedule()


def tqdm_callback(total: int, initial: int, desc: str) -> Any:
    """A Keras callback drawing one tqdm bar over all training steps, with loss and patch Dice."""
    import keras
    from tqdm.auto import tqdm

    class TqdmProgress(keras.callbacks.Callback):
        def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True, mininterval=1.0)

        def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            self.bar.update(1)
            if logs and batch % 5 == 0:
                # with deep supervision Keras names the metric after the output: probabilities_foreground_dice
                shown = {k.removeprefix("probabilities_"): f"{float(v):.3f}" for k, v in logs.items()
                         if k in ("loss", "foreground_dice", "probabilities_foreground_dice")}
                self.bar.set_postfix(shown, refresh=False)

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            if logs and "val_dice_mean" in logs:
                self.bar.write(f"epoch {epoch + 1}: validation Dice (mean of WT/TC/ET) {logs['val_dice_mean']:.3f}")

        def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
            self.bar.close()

    return TqdmProgress()
