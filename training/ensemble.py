"""An ensemble of the fold runs of one cross-validation, written as one bundle (nnU-Net's way of shipping a K-fold run).

``brainscan train ensemble FOLD_BUNDLE... --data DIR --out models --version V``:

1. checks that the bundles are the K fold runs of one cross-validation
   (:func:`~training.segmenter_validation.cross_validation_summary`: same data, seed, K and architecture,
   disjoint validation folds), all K of them, with the same network arguments, preprocessing and window
   settings;
2. predicts every case with the fold run that validated on it, so that each of the N cases is predicted by
   a network that did not train on it (the cross-validation predictions);
3. chooses the post-processing, and with ``--select-tta`` the mirroring, on those pooled predictions, as a
   single run chooses them on its validation cases, but over all N cases;
4. writes one bundle whose network averages the K members' probabilities (``members=K`` in the
   architecture's arguments: the services, ``evaluate`` and ``predict`` serve it unchanged).

Its ``metrics.dice`` is the pooled cross-validation figure of the members with the chosen post-processing:
the ensemble itself trained on every case, so no case here can score it, and the manifest says so
(``metrics.evaluation``). Ensembling the folds usually adds a little over one fold's network; that cannot
be measured on these cases either, only on cases none of the folds saw.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from brainscan.errors import BundleError, DatasetLayoutError

log = logging.getLogger(__name__)

#: What every member must share, beyond the checks of ``cross_validation_summary``.
_SAME_INFERENCE = ("patch_size", "overlap", "batch_size", "one_pass", "outputs")
EVALUATION_NOTE = ("cross-validation: each case predicted by the member that did not train on it (the ensemble "
                   "trained on every case; not an independent test)")


def fold_members(bundle_paths: list[Path]) -> tuple[list[Any], dict[str, Any]]:
    """Load the fold runs' bundles, fold order, after checking they are all K folds of one cross-validation.

    Returns:
        ``(bundles sorted by fold, cross_validation_summary)``.

    Raises:
        BundleError: not the K folds of one cross-validation (a fold missing or twice, other data, seed, K or
            architecture), or members that differ in network arguments, preprocessing or window settings.
    """
    from brainscan.models.bundle import load_bundle
    from training.segmenter_validation import cross_validation_summary

    summary = cross_validation_summary(list(bundle_paths))
    if summary["folds_missing"]:
        raise BundleError(f"an ensemble needs all {summary['folds']} folds; missing: {summary['folds_missing']}")
    bundles = [load_bundle(Path(row["bundle"])) for row in summary["per_fold"]]
    first = bundles[0].spec
    for bundle in bundles[1:]:
        spec = bundle.spec
        differ = [what for what, a, b in (
            ("architecture arguments", spec.architecture.args, first.architecture.args),
            ("preprocessing", spec.preprocessing.to_dict(), first.preprocessing.to_dict()),
            *((key, getattr(spec.inference, key), getattr(first.inference, key)) for key in _SAME_INFERENCE),
        ) if a != b]
        if differ:
            raise BundleError(f"{bundle.path} differs from {bundles[0].path} in {', '.join(differ)}: "
                              "the members of an ensemble must be the same network served the same way")
    return bundles, summary


def member_cases(bundles: list[Any], data: Path) -> list[list[Any]]:
    """Each member's validation cases, loaded from ``data`` (the folder or pack the folds trained on).

    Raises:
        DatasetLayoutError: ``data`` is not the data the folds trained on (another fingerprint), or lacks a case.
    """
    from training.patches import dataset_fingerprint
    from training.segmenter import labelled_cases

    cases = labelled_cases(data, None, 0)
    fingerprint = dataset_fingerprint(cases)
    expected = bundles[0].spec.training.get("data_fingerprint")
    if fingerprint != expected:
        raise DatasetLayoutError(f"{data} is not the data the folds trained on (fingerprint {fingerprint[:12]}, "
                                 f"their manifests: {str(expected)[:12]})")
    by_id = {case.case_id: case for case in cases}
    return [[by_id[case_id] for case_id in bundle.spec.training["validation_case_ids"]] for bundle in bundles]


def build_ensemble_model(bundles: list[Any]) -> Any:
    """The network that averages the members' probabilities, with their weights (fold order)."""
    import keras

    from brainscan.models.registry import build_model

    spec = bundles[0].spec
    model = build_model(spec.architecture.name, {**spec.architecture.args, "members": len(bundles)})
    networks = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    assert len(networks) == len(bundles)
    for network, bundle in zip(networks, bundles):
        network.set_weights(bundle.model.get_weights())
    return model


def write_ensemble(bundle_paths: list[Path], data: Path, out: Path, version: str, *, select_tta: bool = False,
                   weights_dtype: str = "float16", overwrite: bool = False, promote: bool = False,
                   command: str = "brainscan train ensemble") -> Path:
    """Steps 1-4 of the module docstring; returns the new bundle's path.

    Raises:
        BundleError, DatasetLayoutError: see :func:`fold_members` and :func:`member_cases`.
        FileExistsError: the version exists and ``overwrite`` is false.
    """
    from brainscan.inference.segmenter import Segmenter
    from brainscan.models.bundle import save_bundle
    from brainscan.models.store import ModelStore
    from training.segmenter_validation import (
        region_dice,
        select_mirroring_pooled,
        select_postprocessing_pooled,
        validation_metrics,
    )

    bundles, summary = fold_members(bundle_paths)
    groups = member_cases(bundles, data)
    segmenters = [Segmenter.from_bundle(bundle, {"mirror_axes": ()}) for bundle in bundles]
    ordered = [case for cases in groups for case in cases]
    log.info("ensemble of %d folds: predicting each of %d cases with the fold that validated on it",
             len(bundles), len(ordered))
    _, per_case, selection = select_postprocessing_pooled(list(zip(segmenters, groups)))
    mirror_selection = None
    if select_tta:
        axes, per_case, mirror_selection = select_mirroring_pooled(list(zip(segmenters, groups)))
        if axes:  # the post-processing is chosen again on the mirrored predictions, which are served
            _, per_case, selection = select_postprocessing_pooled(list(zip(segmenters, groups)))
    scores = region_dice(per_case)
    log.info("pooled cross-validation Dice with the chosen settings: WT %.3f TC %.3f ET %.3f (%d cases)",
             scores["WT"], scores["TC"], scores["ET"], len(per_case))

    spec = bundles[0].spec
    arch = spec.architecture.name
    training = spec.training
    members = [{"fold": row["fold"], "bundle": row["bundle"], "version": bundle.spec.version,
                "weights_sha256": bundle.spec.weights.sha256, "validation_case_ids": row["cases"],
                "command": bundle.spec.training.get("command")} for row, bundle in zip(summary["per_fold"], bundles)]
    training_record = {
        "data_fingerprint": training["data_fingerprint"],
        "data_description": (f"an ensemble of the {len(bundles)} fold runs of a {summary['folds']}-fold "
                             f"cross-validation (seed {training['config']['seed']}) over {len(ordered)} cases"),
        "command": command,
        "epochs": int(training["epochs"]),
        "seed": int(training["seed"]),
        # Not "folds": an ensemble is not one of the fold runs (cv-summary refuses it).
        "config": {"ensemble_of_folds": summary["folds"], "seed": training["config"]["seed"],
                   "select_tta": select_tta},
        "ensemble_of": members,
        # Every case trained K-1 of the members; each was validated by the one that did not train on it.
        "validation_case_ids": [],
        "training_case_ids": sorted(case.case_id for case in ordered),
    }
    bundle_dir = out / "segmentation" / arch / str(version)
    inference = segmenters[0].manifest_inference()
    save_bundle(
        build_ensemble_model(bundles), bundle_dir, task="segmentation", architecture=arch,
        architecture_args={**spec.architecture.args, "members": len(bundles)},
        preprocessing=bundles[0].preprocess_config, label_map=bundles[0].label_map, version=str(version),
        demo=any(bundle.demo for bundle in bundles), inference=inference,
        metrics={
            "evaluation": EVALUATION_NOTE,
            **validation_metrics(per_case),
            "cross_validation": {key: summary[key] for key in ("folds", "cases", "per_fold", "dice", "hd95")},
            "postprocessing_selection": selection,
            **({"mirroring_selection": mirror_selection} if mirror_selection is not None else {}),
        },
        training=training_record, weights_dtype=weights_dtype, overwrite=overwrite,
    )
    if promote:
        ModelStore(out).promote("segmentation", arch, str(version))
    return bundle_dir


__all__ = ["EVALUATION_NOTE", "build_ensemble_model", "fold_members", "member_cases", "write_ensemble"]
