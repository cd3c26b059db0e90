"""Train a 3D tumour segmenter (U-Net or Attention U-Net) on BraTS cases and write a model bundle.

The pipeline, in order: find the labelled cases under ``--data`` (BraTS 2018-2021 layout), a seeded
train/validation split by case, preprocessing with the serving function (cached as memory-mapped
``.npy`` in the work folder), a tf.data stream of random patches with tumour oversampling and
augmentation (:mod:`training.patches`, :mod:`training.augment`), AdamW with warm-up and cosine decay on soft Dice +
cross-entropy (:mod:`training.losses`), a checkpoint after every epoch (``--resume`` continues
from it, patch stream included), TensorBoard logs, and every ``val_every`` epochs a validation on
WHOLE validation volumes exactly as serving predicts them (load, preprocess, sliding window,
restore to the input grid) scored with the BraTS region Dice (WT/TC/ET). Their mean selects the
best weights and drives early stopping. Finally the best weights go into a bundle whose manifest
holds the validation metrics, the preprocessing and the sliding-window settings.

Example (a GPU machine with BraTS 2020):
    brainscan train segmenter --data MICCAI_BraTS2020_TrainingData --arch unet3d --out models --promote
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from brainscan.errors import BrainscanError, DatasetLayoutError
from brainscan.labels import BRATS_LABELS
from training.segmenter_config import SegmenterTrainConfig
from training.segmenter_validation import (
    predict_cases,
    predictions_nbytes,
    region_dice,
    score_predictions,
    select_mirroring,
    select_postprocessing,
    select_postprocessing_pooled,
    validation_metrics,
)
from training.segmenter_callbacks import timed_cosine_callback, tqdm_callback
from training.stages import initial_bundle_record, load_initial_weights, stage_record

log = logging.getLogger(__name__)

#: Processes cutting patches under a Keras backend without tf.data (JAX); default: cores - 1, at most 8.
DATA_WORKERS_ENV = "BRAINSCAN_DATA_WORKERS"
#: "1": those workers are threads, not forked processes (safer in a process that holds a GPU).
DATA_THREADS_ENV = "BRAINSCAN_DATA_THREADS"
#: The best epoch's validation probabilities are kept in memory up to this size, so that the final
#: choice of post-processing does not predict the validation cases again.
MAX_KEPT_PREDICTION_BYTES = 1 << 30


def split_cases(cases: list[Any], *, val_fraction: float, val_cases: int | None, seed: int,
                folds: int | None = None, fold: int | None = None) -> tuple[list, list]:
    """Seeded split of labelled cases into (train, validation), each sorted by case id.

    With ``folds`` and ``fold``: the cases are shuffled with ``seed`` and cut into ``folds`` parts of
    near-equal size; part ``fold`` validates, the rest trains. The ``folds`` runs of one seed thus
    validate on every case exactly once (cross-validation).

    Raises:
        DatasetLayoutError: fewer than 2 cases (or than ``folds``), or no case left to train on.
    """
    if len(cases) < 2:
        raise DatasetLayoutError(f"training needs at least 2 labelled cases (1 to validate), found {len(cases)}")
    order = np.random.default_rng(seed).permutation(len(cases))
    if folds is not None:
        if len(cases) < folds:
            raise DatasetLayoutError(f"{folds} folds need at least {folds} labelled cases, found {len(cases)}")
        held = set(np.array_split(order, folds)[fold].tolist())
        val_idx, train_idx = [i for i in order if i in held], [i for i in order if i not in held]
    else:
        n_val = val_cases if val_cases is not None else max(1, round(val_fraction * len(cases)))
        if n_val >= len(cases):
            raise DatasetLayoutError(f"{n_val} validation cases leave none of the {len(cases)} cases to train on")
        val_idx, train_idx = order[:n_val], order[n_val:]
    val = sorted((cases[i] for i in val_idx), key=lambda c: c.case_id)
    train = sorted((cases[i] for i in train_idx), key=lambda c: c.case_id)
    return train, val


def fewer_training_cases(train: list[Any], n: int | None, seed: int) -> list[Any]:
    """``n`` of the training cases ``train`` (all if ``n`` is None), sorted by case id.

    The choice is the first ``n`` of one seeded shuffle, so the runs of a learning curve nest (the 5
    cases of one run are among the 10 of the next), and the validation cases stay untouched.

    Raises:
        DatasetLayoutError: ``n`` is more than the training cases there are.
    """
    if n is None:
        return train
    if n > len(train):
        raise DatasetLayoutError(f"--train-cases {n}: the split leaves only {len(train)} training cases")
    order = np.random.default_rng(seed).permutation(len(train))[:n]
    return sorted((train[i] for i in order), key=lambda c: c.case_id)


def labelled_cases(data: Path, max_cases: int | None, seed: int) -> list[Any]:
    """The cases under ``data`` that have a segmentation (at most ``max_cases``, a seeded choice).

    ``data`` is a BraTS folder or a pack file (:mod:`training.pack`), whose cases are all labelled.
    """
    from brainscan.data.brats import find_cases
    from training.pack import is_pack, read_pack

    if is_pack(data):
        cases = labelled = read_pack(data)
    else:
        cases = find_cases(data)
        labelled = [c for c in cases if c.seg is not None]
    if len(labelled) < len(cases):
        log.warning("skipping %d case(s) without a segmentation under %s", len(cases) - len(labelled), data)
    if max_cases is not None and len(labelled) > max_cases:
        pick = np.random.default_rng(seed).choice(len(labelled), size=max_cases, replace=False)
        labelled = [labelled[i] for i in sorted(pick)]
    return labelled


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def _callbacks(config: SegmenterTrainConfig, state: dict[str, Any], val_cases: list[Any], preprocess_config: Any,
               initial_epoch: int, best_predictions: dict[str, Any]) -> list[Any]:
    """Whole-volume validation + best weights + early stopping, checkpoint, TensorBoard, state.json."""
    import keras

    from training.deep_supervision import served_network

    work = config.work_dir
    assert work is not None

    class WholeVolumeValidation(keras.callbacks.Callback):
        """Every ``val_every`` epochs (and at the last one): region Dice on whole validation volumes."""

        predict_fn = None
        deadline: float | None = None

        def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
            self.network = served_network(self.model)  # without deep-supervision heads: what the bundle serves
            if config.max_minutes is not None:
                self.deadline = time.monotonic() + 60.0 * config.max_minutes

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            done = epoch + 1
            out_of_time = self.deadline is not None and time.monotonic() >= self.deadline
            if out_of_time:
                log.info("time budget of %g minutes spent at epoch %d: validating and stopping", config.max_minutes,
                         done)
                self.model.stop_training = True
                state["stopped_by_time_budget"] = True
            elif done % config.val_every and done != config.epochs:
                return
            segmenter = config.segmenter(self.network, self.predict_fn)
            self.predict_fn = segmenter.predict_fn
            start = time.perf_counter()
            predicted = list(predict_cases(segmenter, val_cases, cache_dir=work / "cache"))
            per_case = score_predictions(segmenter, predicted)
            scores = region_dice(per_case)
            if logs is not None:
                logs.update({f"val_dice_{k}": v for k, v in scores.items()})
            log.info("epoch %d validation on %d whole volumes (%.0f s): Dice WT %.3f TC %.3f ET %.3f mean %.3f",
                     done, len(per_case), time.perf_counter() - start, scores["WT"], scores["TC"], scores["ET"],
                     scores["mean"])
            if state["best"] is None or scores["mean"] > state["best"]["val_dice_mean"]:
                state["best"] = {"epoch": done, "val_dice_mean": scores["mean"]}
                self.model.save_weights(work / "best.weights.h5")
                # Kept for the final choice of post-processing, which would otherwise predict them again.
                best_predictions.clear()
                if predictions_nbytes(predicted) <= MAX_KEPT_PREDICTION_BYTES:
                    best_predictions.update(epoch=done, predicted=predicted)
                _write_json(work / "best_validation.json", {"epoch": done, "per_case": per_case})
            elif done - state["best"]["epoch"] >= config.patience:
                log.info("early stopping: no better validation Dice since epoch %d", state["best"]["epoch"])
                self.model.stop_training = True

    class StateWriter(keras.callbacks.Callback):
        """Writes ``state.json`` after each epoch so that ``--resume`` knows where to continue."""

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            state["history"].append({"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}})
            state["epoch"] = epoch + 1
            _write_json(work / "state.json", state)

    callbacks = [WholeVolumeValidation(), keras.callbacks.ModelCheckpoint(work / "last.keras")]
    if config.max_minutes is not None:
        callbacks.insert(0, timed_cosine_callback(config.learning_rate, 60.0 * config.max_minutes,
                                                warmup_epochs=config.warmup_epochs, initial_epoch=initial_epoch))
    if keras.backend.backend() == "tensorflow":  # its summary writer is TensorFlow's
        callbacks.append(keras.callbacks.TensorBoard(log_dir=str(work / "tensorboard"), write_graph=False,
                                                     profile_batch=0))
    callbacks.append(StateWriter())
    if config.progress == "tqdm":
        callbacks.append(tqdm_callback(config.epochs * config.steps_per_epoch, initial_epoch * config.steps_per_epoch,
                                      desc=f"training {config.arch}"))
    return callbacks


def _build_and_compile(config: SegmenterTrainConfig, arch_args: dict[str, Any], runtime: Any) -> Any:
    import keras

    from brainscan.models.registry import build_model
    from training.deep_supervision import head_losses, loss_weights, with_heads
    from training.losses import DiceCELoss, ForegroundDice, RegionDice, RegionDiceBCELoss
    from training.runtime import build_optimizer, cosine_schedule, wrap_optimizer

    model = build_model(config.arch, arch_args)
    if config.init_from is not None:
        load_initial_weights(model, config.init_from)
    steps = config.steps_per_epoch
    schedule: Any = cosine_schedule(
        initial_learning_rate=config.learning_rate / 100 if config.warmup_epochs else config.learning_rate,
        decay_steps=max(1, steps * (config.epochs - config.warmup_epochs)),
        warmup_target=config.learning_rate if config.warmup_epochs else None,
        warmup_steps=steps * config.warmup_epochs,
        alpha=0.01,
    )
    if config.max_minutes is not None:  # a float (a variable) that timed_cosine_callback sets epoch by epoch
        schedule = config.learning_rate / 100 if config.warmup_epochs else config.learning_rate
    optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=config.weight_decay, clipnorm=12.0)
    if config.outputs == "regions":
        loss, metric = RegionDiceBCELoss(), RegionDice()
    else:
        loss, metric = DiceCELoss(), ForegroundDice()
    losses: dict[str, Any] = {"loss": loss, "metrics": [metric]}
    if config.deep_supervision:
        heads = config.deep_supervision
        model = with_heads(model, heads)
        losses = {"loss": head_losses(loss, heads), "loss_weights": loss_weights(heads),
                  "metrics": [[metric], *([] for _ in range(heads))]}
    # TensorFlow: no XLA (it runs Conv3D 13-25x slower on CPU). Other backends (JAX on a GPU) must compile
    # their steps: without jit a JAX step dispatches every op one by one.
    jit = keras.backend.backend() != "tensorflow"
    model.compile(optimizer=wrap_optimizer(optimizer, runtime), jit_compile=jit, **losses)
    build_optimizer(model)
    return model


def _check_schedule_matches(model: Any, config: SegmenterTrainConfig) -> None:
    """A resumed checkpoint's learning rate follows --epochs (a schedule) or --max-minutes (a value the
    time budget sets); resuming it the other way would freeze or break the decay, so it is refused.

    Raises:
        BrainscanError: ``--max-minutes`` given for a checkpoint without it, or left out for one with it.
    """
    import keras

    optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)
    scheduled = isinstance(getattr(optimizer, "_learning_rate", None), keras.optimizers.schedules.LearningRateSchedule)
    if scheduled and config.max_minutes is not None:
        raise BrainscanError(f"the checkpoint in {config.work_dir} decays its learning rate over --epochs: resume it "
                             "without --max-minutes (or start a new --work-dir with it)")
    if not scheduled and config.max_minutes is None:
        raise BrainscanError(f"the checkpoint in {config.work_dir} was trained with a time budget: resume it with "
                             "--max-minutes (the budget of this run)")


def train_segmenter(config: SegmenterTrainConfig) -> Path:
    """Run a whole training and write the bundle; returns the bundle's path.

    Raises:
        DatasetLayoutError: no usable labelled cases, or too few to split.
        And the data errors of :func:`brainscan.data.brats.load_case` for a broken case.
    """
    import keras

    import training.losses  # noqa: F401  (registers the loss and metric that last.keras names)
    from brainscan.models.bundle import save_bundle
    from brainscan.models.store import ModelStore
    from training.deep_supervision import served_network, with_target_copies
    from training.pack import is_pack
    from training.patches import PatchSampler, attach_soft_targets, dataset_fingerprint, prepare_cases
    from training.runtime import build_metrics, load_checkpoint, setup_runtime

    previous_policy = keras.mixed_precision.global_policy()
    runtime = setup_runtime(config.seed, mixed_precision=config.mixed_precision)
    try:
        work = config.work_dir
        assert work is not None
        work.mkdir(parents=True, exist_ok=True)
        cases = labelled_cases(config.data, config.max_cases, config.seed)
        train, val = split_cases(cases, val_fraction=config.val_fraction, val_cases=config.val_cases, seed=config.seed,
                                 folds=config.folds, fold=config.fold)
        train = fewer_training_cases(train, config.train_cases, config.seed)
        log.info("training cases: %d, validation cases: %d (whole volumes)", len(train), len(val))
        preprocess_config = config.preprocess_config()
        prepared = prepare_cases(train, preprocess_config, cache_dir=work / "cache")
        if config.soft_targets:
            attach_soft_targets(train, prepared)
        # Validation cases go through the same cache now: a broken one fails here, not epochs later.
        prepare_cases(val, preprocess_config, cache_dir=work / "cache")

        arch_args = config.arch_args()
        init_record, stages = (initial_bundle_record(config.init_from, [c.case_id for c in val])
                               if config.init_from is not None else (None, []))
        state_path, last_path, best_path = work / "state.json", work / "last.keras", work / "best.weights.h5"
        config_dict = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}
        state: dict[str, Any] = {"epoch": 0, "history": [], "best": None, "config": config_dict}
        with runtime.strategy.scope():
            if config.resume and last_path.exists() and state_path.exists():
                model = load_checkpoint(last_path)
                _check_schedule_matches(model, config)
                if len(model.outputs) - 1 != config.deep_supervision:
                    raise BrainscanError(f"the checkpoint in {config.work_dir} has {len(model.outputs) - 1} "
                                         "deep-supervision head(s): resume it with --deep-supervision "
                                         f"{len(model.outputs) - 1} (or start a new --work-dir)")
                state.update({k: v for k, v in json.loads(state_path.read_text()).items() if k != "config"})
                log.info("resuming from %s at epoch %d", last_path, state["epoch"])
            else:
                if config.resume:
                    log.warning("--resume given but no checkpoint in %s: starting from scratch", work)
                model = _build_and_compile(config, arch_args, runtime)
        initial_epoch = int(state["epoch"])

        global_batch = config.batch_size * runtime.replicas
        sampler = PatchSampler(prepared, patch_size=config.patch_size, foreground_fraction=config.foreground_fraction,
                               augment=config.augment_config(), seed=config.seed,
                               targets=config.outputs, soft=config.soft_targets)
        # Continue the patch stream where the checkpoint left it, not from its first patch.
        first_patch = initial_epoch * config.steps_per_epoch * global_batch
        if keras.backend.backend() == "tensorflow":
            dataset = sampler.dataset(global_batch, start=first_patch)
        else:  # no tf.data: the same batches from worker processes
            remaining = max(1, (config.epochs - initial_epoch) * config.steps_per_epoch)
            workers = int(os.environ.get(DATA_WORKERS_ENV) or max(1, min(8, (os.cpu_count() or 2) - 1)))
            threads = os.environ.get(DATA_THREADS_ENV, "0") == "1"
            dataset = sampler.batches(global_batch, remaining, start=first_patch, workers=workers,
                                      processes=not threads)
            log.info("patches from %d worker %s (no tf.data under Keras backend %s)", workers,
                     "thread(s)" if threads else "process(es)", keras.backend.backend())
        if config.deep_supervision:  # each head's loss pools the full-resolution targets
            dataset = with_target_copies(dataset, 1 + config.deep_supervision)
        best_predictions: dict[str, Any] = {}  # {"epoch", "predicted"}: filled by the validation callback
        callbacks = _callbacks(config, state, val, preprocess_config, initial_epoch, best_predictions)
        start = time.perf_counter()
        if initial_epoch < config.epochs:
            verbose = (1 if sys.stdout.isatty() else 2) if config.progress == "keras" else 0
            build_metrics(model, dataset)
            model.fit(dataset, epochs=config.epochs, initial_epoch=initial_epoch,
                      steps_per_epoch=config.steps_per_epoch, callbacks=callbacks, shuffle=False, verbose=verbose)
        train_seconds = time.perf_counter() - start

        if best_path.exists():
            model.load_weights(best_path)
        model = served_network(model)  # the bundle holds the network without deep-supervision heads
        # The served post-processing is chosen on the validation cases, with the served window settings.
        segmenter = config.segmenter(model)
        kept = (best_predictions.get("predicted")
                if state["best"] and best_predictions.get("epoch") == state["best"]["epoch"] else None)
        segmenter.postprocessing, per_case, selection = select_postprocessing(segmenter, val, work / "cache",
                                                                              predicted=kept)
        best_predictions.clear()
        mirror_selection = None
        if config.select_tta:
            axes, per_case, mirror_selection = select_mirroring(segmenter, val, work / "cache")
            if axes:  # the post-processing is chosen again on the mirrored predictions, which are served
                _, per_case, selection = select_postprocessing_pooled([(segmenter, val)], work / "cache")
        scores = region_dice(per_case)
        log.info("validation Dice of the bundled weights: WT %.3f TC %.3f ET %.3f (%d cases)",
                 scores["WT"], scores["TC"], scores["ET"], len(per_case))

        bundle_dir = config.out / "segmentation" / config.arch / str(config.version)
        history = state["history"]
        training_record = {
            "data_fingerprint": dataset_fingerprint(train + val),
            "data_description": (f"{'a pack of BraTS-layout cases' if is_pack(config.data) else 'BraTS-layout cases'} "
                                 f"at {config.data} ({len(train)} train, {len(val)} validation)"),
            "command": config.command,
            "epochs": config.epochs,
            "seed": config.seed,
            "config": config_dict,
            "validation_case_ids": [c.case_id for c in val],
            "training_case_ids": [c.case_id for c in train],
            "epochs_run": len(history),
            "best_epoch": state["best"]["epoch"] if state["best"] else None,
            **({"stopped_by_time_budget": True} if state.get("stopped_by_time_budget") else {}),
            "history": history,
            "train_seconds_this_run": round(train_seconds, 1),
            "devices": {"gpus": runtime.gpus, "replicas": runtime.replicas,
                        "mixed_precision": runtime.mixed_precision, "dtype_policy": runtime.policy},
            **({"init_from": init_record} if init_record else {}),
        }
        # The whole chain of stages, oldest first, so that it can be rerun command by command.
        training_record["stages"] = [*stages, stage_record(str(config.version), training_record, scores)]
        save_bundle(
            model,
            bundle_dir,
            task="segmentation",
            architecture=config.arch,
            architecture_args=arch_args,
            preprocessing=preprocess_config,
            label_map=dict(enumerate(BRATS_LABELS)),
            version=str(config.version),
            demo=config.demo,
            inference=segmenter.manifest_inference(),
            metrics={
                **validation_metrics(per_case),
                "postprocessing_selection": selection,
                **({"mirroring_selection": mirror_selection} if mirror_selection is not None else {}),
                "training_cases": len(train),
            },
            training=training_record,
            weights_dtype=config.weights_dtype,
            overwrite=config.overwrite,
        )
        if config.promote:
            ModelStore(config.out).promote("segmentation", config.arch, str(config.version))
        return bundle_dir
    finally:
        keras.mixed_precision.set_global_policy(previous_policy)
