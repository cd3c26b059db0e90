"""`brainscan train ensemble`: the K fold runs of a cross-validation written as one bundle that averages them.

Two tiny fold runs (``--folds 2``) on BraTS phantoms, region outputs at a coarse spacing (the shipped
recipe in miniature), are joined with the command users run; the bundle is then served by the one
prediction path, and what it records is checked against the folds themselves.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from brainscan.cli.main import main  # noqa: E402
from brainscan.data.phantoms import write_brats_phantoms  # noqa: E402
from brainscan.errors import BundleError, DatasetLayoutError  # noqa: E402
from training.segmenter import SegmenterTrainConfig, labelled_cases, train_segmenter  # noqa: E402

PHANTOM_SHAPE = (64, 64, 48)


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("brats")
    write_brats_phantoms(root, n=6, seed=4, shape=PHANTOM_SHAPE)
    return root


@pytest.fixture(scope="module")
def folds(phantoms, tmp_path_factory) -> list[Path]:
    """The two fold runs of a 2-fold cross-validation (each validates on 3 of the 6 phantoms), their patches
    augmented with the other-scanner transforms too."""
    store = tmp_path_factory.mktemp("fold-store")
    paths = []
    for fold in (0, 1):
        config = SegmenterTrainConfig(
            data=phantoms, arch="unet3d", out=store, preset="tiny", epochs=2, steps_per_epoch=3, val_every=1,
            warmup_epochs=0, folds=2, fold=fold, outputs="regions", target_spacing=6.0, progress="none",
            other_scanners=True,
            work_dir=tmp_path_factory.mktemp(f"work-{fold}"), version=f"cv2-{fold}")
        paths.append(train_segmenter(config))
    return paths


@pytest.fixture(scope="module")
def ensemble(folds, phantoms, tmp_path_factory) -> Path:
    """``--select-tta`` made to choose mirroring on all three axes (any gain pays here), so that the
    post-processing is chosen a second time, on the mirrored predictions the bundle serves."""
    from training import segmenter_validation

    out = tmp_path_factory.mktemp("models")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(segmenter_validation, "MIRROR_GAIN", -1.0)
        assert main(["train", "ensemble", *map(str, folds), "--data", str(phantoms), "--out", str(out),
                     "--version", "ens-1", "--select-tta", "--promote"]) == 0
    return out / "segmentation" / "unet3d" / "ens-1"


@pytest.mark.slow
def test_the_ensemble_averages_the_folds_networks(ensemble, folds):
    from brainscan.models.bundle import load_bundle
    from brainscan.models.store import ModelStore

    bundle = load_bundle(ensemble, precision="float32")  # the averaging itself, to float32 round-off
    members = [load_bundle(path, precision="float32") for path in folds]
    assert bundle.spec.architecture.args == {**members[0].spec.architecture.args, "members": 2}
    x = np.random.default_rng(0).normal(size=(1, 16, 16, 16, 4)).astype("float32")
    expected = np.mean([np.asarray(m.model(x)) for m in members], axis=0)
    np.testing.assert_allclose(np.asarray(bundle.model(x)), expected, atol=1e-5)
    assert ModelStore(ensemble.parents[2]).current_version("segmentation", "unet3d") == "ens-1"
    # the same preprocessing and window settings as the folds; the choices made on all cases
    assert bundle.spec.preprocessing == members[0].spec.preprocessing
    inference = bundle.manifest["inference"]
    assert inference["patch_size"] == members[0].manifest["inference"]["patch_size"]
    assert inference["mirror_axes"] in [row["mirror_axes"] for row in bundle.manifest["metrics"]["mirroring_selection"]]


@pytest.mark.slow
def test_the_post_processing_is_chosen_on_the_mirrored_predictions(ensemble):
    """Mirroring was chosen, so the post-processing table was measured again with it: the chosen row's
    Dice is the bundle's figure (measured on one pass, it would not be)."""
    from brainscan.models.bundle import read_manifest

    manifest = read_manifest(ensemble)
    metrics = manifest["metrics"]
    assert manifest["inference"]["mirror_axes"] == [0, 1, 2]
    chosen = [row for row in metrics["postprocessing_selection"]
              if row["postprocessing"] == manifest["inference"]["postprocessing"]]
    assert chosen and chosen[0]["dice"] == pytest.approx(metrics["dice"], abs=1e-9)
    one_pass = metrics["mirroring_selection"][0]
    assert one_pass["mirror_axes"] == [] and one_pass["dice"] != pytest.approx(metrics["dice"], abs=1e-9)


@pytest.mark.slow
def test_its_figures_are_the_pooled_cross_validation(ensemble, folds, phantoms):
    """Every case scored by the fold that validated on it, decoded with the ensemble's chosen settings."""
    from brainscan.inference.segmenter import Segmenter
    from brainscan.models.bundle import load_bundle
    from training.segmenter_validation import evaluate_cases, region_dice

    manifest = load_bundle(ensemble).manifest
    metrics, training = manifest["metrics"], manifest["training"]
    cases = {case.case_id: case for case in labelled_cases(phantoms, None, 0)}
    assert sorted(metrics["validation_per_case"]) == sorted(cases) == training["training_case_ids"]
    assert training["validation_case_ids"] == [] and "not an independent test" in metrics["evaluation"]
    assert training["command"].startswith("brainscan train ensemble ") and "--select-tta" in training["command"]
    assert [m["fold"] for m in training["ensemble_of"]] == [0, 1]
    assert all(load_bundle(path).manifest["training"]["config"]["other_scanners"] for path in folds)
    measured = {}
    for record, path in zip(training["ensemble_of"], folds):
        fold = load_bundle(path)
        assert record["weights_sha256"] == fold.spec.weights.sha256
        assert record["validation_case_ids"] == fold.manifest["training"]["validation_case_ids"]
        segmenter = Segmenter.from_bundle(fold, {"mirror_axes": manifest["inference"]["mirror_axes"]})
        segmenter.postprocessing = type(segmenter.postprocessing).from_dict(manifest["inference"]["postprocessing"])
        measured.update(evaluate_cases(segmenter, [cases[c] for c in record["validation_case_ids"]]))
    for case_id, row in metrics["validation_per_case"].items():
        for region in ("WT", "TC", "ET"):
            assert row[region] == pytest.approx(measured[case_id][region]["dice"], abs=1e-9)
    assert metrics["dice"] == pytest.approx(region_dice(measured))
    assert [row["fold"] for row in metrics["cross_validation"]["per_fold"]] == [0, 1]


@pytest.mark.slow
def test_the_one_prediction_path_serves_it(ensemble, phantoms, tmp_path, capsys):
    from brainscan.data.brats import find_cases
    from brainscan.io.nifti import load_nifti

    case = find_cases(phantoms)[0]
    out = tmp_path / "mask.nii.gz"
    assert main(["predict", "segment", str(ensemble), str(case.modalities["flair"].parent), "--out", str(out),
                 "--json", "--quiet"]) == 0
    capsys.readouterr()
    mask = load_nifti(out)
    reference = load_nifti(case.modalities["flair"])
    assert mask.data.shape == reference.data.shape and set(np.unique(mask.data)) <= {0, 1, 2, 4}
    np.testing.assert_allclose(mask.affine, reference.affine)


@pytest.mark.slow
def test_what_is_not_all_folds_of_one_network_is_refused(ensemble, folds, phantoms, tmp_path, capsys):
    from training.ensemble import fold_members, member_cases

    with pytest.raises(BundleError, match=r"needs all 2 folds; missing: \[1\]"):
        fold_members([folds[0]])
    with pytest.raises(BundleError, match="not a segmenter trained with --folds"):
        fold_members([folds[0], ensemble])
    other = tmp_path / "other-preprocessing"
    shutil.copytree(folds[1], other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["preprocessing"]["params"]["clip_zscore"] = 4.0
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="differs from .* in preprocessing"):
        fold_members([folds[0], other])
    fewer = tmp_path / "fewer"
    for case in sorted(phantoms.iterdir())[:5]:
        (fewer / case.name).parent.mkdir(exist_ok=True)
        (fewer / case.name).symlink_to(case)
    bundles, _ = fold_members(folds)
    with pytest.raises(DatasetLayoutError, match="not the data the folds trained on"):
        member_cases(bundles, fewer)
    assert main(["train", "ensemble", str(folds[0]), "--data", str(phantoms), "--out", str(tmp_path / "m"),
                 "--version", "x"]) == 2
    assert "needs all 2 folds" in capsys.readouterr().err
