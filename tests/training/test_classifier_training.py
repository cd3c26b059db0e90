"""End-to-end tests of classifier training: tiny ResNet50 and ViT-CNN on Kaggle phantoms, through the CLI.

(Option plumbing that needs no converged model: tests/training/test_classifier_options.py.)

Each architecture is trained with ``brainscan train classifier`` (the command users run) on 800
phantom slices in the Kaggle layout, then scored with ``brainscan evaluate`` on 400 phantoms of
another dataset seed written as a Testing split: images the run never saw, neither for training
nor for model selection. Chance is 0.25 for four balanced classes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from brainscan.cli.main import main  # noqa: E402
from brainscan.data.phantoms.kaggle import write_kaggle_phantoms  # noqa: E402
from brainscan.labels import KAGGLE_CLASSES  # noqa: E402
from tests.training.classifier_common import (  # noqa: E402
    EPOCHS,
    HELD_OUT_IMAGES,
    INPUT_SIZE,
    LEARNING_RATES,
    PHANTOM_SIZE,
    TRAIN_IMAGES,
    kaggle_phantoms,  # noqa: F401 (a fixture)
    train_command,
)

# Four balanced classes: chance is 0.25. With 400 held-out images a chance-level model reaches 0.36
# with probability below 1e-6 (5 standard deviations); the tiny networks reach about 0.45-0.55 here
# (TensorFlow on CPU is not bit-for-bit reproducible across machines, hence the margin).
MIN_HELD_OUT_ACCURACY = 0.36


@pytest.fixture(scope="module")
def held_out(tmp_path_factory) -> Path:
    """Another dataset seed, written as a Testing split (never read by training)."""
    root = tmp_path_factory.mktemp("held_out")
    write_kaggle_phantoms(root, n=HELD_OUT_IMAGES, seed=1, size=PHANTOM_SIZE, split="Testing")
    return root


@pytest.fixture(scope="module", params=["resnet50", "vit_cnn"])
def trained(request, kaggle_phantoms, tmp_path_factory) -> tuple[str, Path, Path, Path]:
    arch = request.param
    out, work = tmp_path_factory.mktemp(f"models-{arch}"), tmp_path_factory.mktemp(f"work-{arch}")
    start = time.perf_counter()
    assert main(train_command(kaggle_phantoms, arch, out, work)) == 0
    print(f"{arch}: trained in {time.perf_counter() - start:.0f} s")
    return arch, out, out / "classification" / arch / "test-1", work


@pytest.mark.slow
def test_trained_classifier_beats_chance_on_held_out_phantoms(trained, held_out, tmp_path, capsys):
    arch, _, bundle, _ = trained
    report_dir = tmp_path / "report"
    assert main(["evaluate", str(bundle), str(held_out), "--out", str(report_dir), "--quiet"]) == 0
    report = json.loads((report_dir / "report.json").read_text())
    section = report["splits"]["Testing"]
    assert section["n_samples"] == HELD_OUT_IMAGES
    matrix = np.asarray(section["confusion_matrix"]["matrix"])
    print(f"{arch}: held-out accuracy {section['accuracy']:.3f}, confusion matrix {matrix.tolist()}")
    assert section["accuracy"] >= MIN_HELD_OUT_ACCURACY
    assert np.count_nonzero(matrix.sum(axis=0)) >= 3, "the network predicts (almost) one class only"
    assert (report_dir / "confusion_matrix.png").stat().st_size > 10_000


@pytest.mark.slow
def test_bundle_manifest_records_training(trained, kaggle_phantoms):
    from brainscan.models.bundle import read_manifest
    from brainscan.models.store import ModelStore

    arch, out, bundle, _ = trained
    manifest = read_manifest(bundle)
    assert manifest["demo"] is True  # tiny preset
    assert manifest["architecture"]["name"] == arch
    assert manifest["classes"] == list(KAGGLE_CLASSES)
    training = manifest["training"]
    assert len(training["data_fingerprint"]) == 64
    assert training["epochs_run"] == EPOCHS[arch] == len(training["history"])
    assert training["epochs"] == EPOCHS[arch] and training["seed"] == training["config"]["seed"]
    assert training["config"]["learning_rate"] == float(LEARNING_RATES[arch])
    assert "--arch " + arch in training["command"]
    validation = manifest["metrics"]["validation"]
    best = max(h["val_accuracy"] for h in training["history"])
    # The bundle keeps the best epoch's weights, and the manifest's metrics are measured on them: the
    # plain network as Keras validated it, then as served (with the flip TTA if validation chose it).
    calibration = manifest["metrics"]["calibration"]
    assert calibration["accuracy_before"] == pytest.approx(best, abs=1e-6)
    assert validation["accuracy"] == pytest.approx(calibration["accuracy_after"], abs=1e-6)
    assert manifest["metrics"]["validation_images"] + manifest["metrics"]["training_images"] == TRAIN_IMAGES
    assert ModelStore(out).current_version("classification", arch) == "test-1"


@pytest.mark.slow
def test_resume_continues_from_checkpoint(trained, kaggle_phantoms, tmp_path, caplog):
    """--resume continues the run's checkpoint and history. (That a new interpreter loads each
    architecture's checkpoint, as after a crash, is tests/training/test_runtime.py's fresh-process test.)"""
    arch, _, _, work = trained
    out = tmp_path / "models"
    before = json.loads((work / "state.json").read_text())["history"]
    command = train_command(kaggle_phantoms, arch, out, work, "--resume")
    epochs = EPOCHS[arch]
    command[command.index("--epochs") + 1] = str(epochs + 1)
    with caplog.at_level("INFO", logger="training.classifier"):
        assert main(command) == 0
    assert f"resuming from {work / 'last.keras'} at epoch {epochs}" in caplog.text
    after = json.loads((work / "state.json").read_text())["history"]
    assert [h["epoch"] for h in after] == list(range(1, epochs + 2))
    assert after[:epochs] == before


@pytest.mark.slow
def test_evaluate_validation_split_reproduces_the_manifest(trained, kaggle_phantoms, tmp_path, capsys):
    from brainscan.models.bundle import read_manifest

    arch, _, bundle, _ = trained
    out = tmp_path / "report"
    assert main(["evaluate", str(bundle), str(kaggle_phantoms), "--validation-split", "--out", str(out),
                 "--quiet"]) == 0
    report = json.loads((out / "report.json").read_text())
    manifest = read_manifest(bundle)
    section = report["splits"]["Validation"]
    assert list(report["splits"]) == ["Validation"]
    assert section["n_samples"] == manifest["metrics"]["validation_images"]
    # float16 storage of the weights may move a borderline image
    assert abs(section["accuracy"] - manifest["metrics"]["validation"]["accuracy"]) <= 2 / section["n_samples"]
    assert "Validation: accuracy" in capsys.readouterr().out


def test_evaluate_validation_split_refuses_other_data(trained, kaggle_phantoms, held_out, tmp_path, capsys):
    import shutil

    _, _, bundle, _ = trained
    changed = Path(shutil.copytree(kaggle_phantoms, tmp_path / "changed"))
    next((changed / "Training" / "glioma").glob("*.jpg")).unlink()
    for data, message in ((changed, "not the data bundle"), (held_out, "no training images outside a Testing")):
        assert main(["evaluate", str(bundle), str(data), "--validation-split", "--out", str(tmp_path / "r"),
                     "--quiet"]) == 2
        assert message in capsys.readouterr().err


def _init_from_command(data: Path, arch: str, source: Path, tmp_path: Path, *extra: str) -> list[str]:
    command = train_command(data, arch, tmp_path / "models", tmp_path / "work", "--init-from", str(source), *extra)
    command[command.index("--epochs") + 1] = "1"
    return command


@pytest.mark.slow
def test_init_from_starts_where_the_bundle_ended(trained, kaggle_phantoms, tmp_path):
    """--init-from: the first epoch of the new run already scores what the source bundle scored."""
    from brainscan.models.bundle import read_manifest

    arch, _, bundle, _ = trained
    source = read_manifest(bundle)
    command = _init_from_command(kaggle_phantoms, arch, bundle, tmp_path)
    command[command.index("--learning-rate") + 1] = "1e-7"  # (almost) no update: what is measured is the start
    assert main(command) == 0
    manifest = read_manifest(tmp_path / "models" / "classification" / arch / "test-1")
    record = manifest["training"]["init_from"]
    assert record["weights_sha256"] == source["weights"]["sha256"] and record["same_data_and_split"] is True
    assert manifest["training"]["config"]["init_from"] == str(bundle)
    # The trained weights are the source's (float16 storage aside); only the batch-norm statistics,
    # which an epoch of training batches moves at any learning rate, may differ.
    from brainscan.models.bundle import load_bundle

    started = load_bundle(bundle).model
    ended = load_bundle(tmp_path / "models" / "classification" / arch / "test-1").model
    for before, after in zip(started.trainable_weights, ended.trainable_weights, strict=True):
        np.testing.assert_allclose(np.asarray(after), np.asarray(before), rtol=1e-2, atol=1e-3, err_msg=before.path)
    # From scratch, one epoch at this learning rate stays at chance (0.25); those batch-norm statistics
    # move the 60 validation images' accuracy by a few images, so it is held to well above chance.
    chance, scored = 0.25, source["metrics"]["validation"]["accuracy"]
    assert manifest["metrics"]["validation"]["accuracy"] >= chance + (scored - chance) / 3


@pytest.mark.slow
def test_init_from_at_another_input_size(trained, kaggle_phantoms, tmp_path):
    """ResNet50's weights do not depend on the input size; a ViT-CNN's position table is resized."""
    from brainscan.models.bundle import load_bundle, read_manifest

    arch, _, bundle, _ = trained
    command = _init_from_command(kaggle_phantoms, arch, bundle, tmp_path, "--max-per-class", "16")
    command[command.index("--input-size") + 1] = str(INPUT_SIZE + 16)
    assert main(command) == 0
    new = load_bundle(tmp_path / "models" / "classification" / arch / "test-1")
    record = new.manifest["training"]["init_from"]
    assert record["input_size"] == INPUT_SIZE and new.manifest["input"]["shape"][0] == INPUT_SIZE + 16
    # --max-per-class makes other data: the validation images may have been the source's training images
    assert record["same_data_and_split"] is False
    if arch == "resnet50":
        assert record["resized_variables"] == []
    else:
        assert len(record["resized_variables"]) == 1 and "position_embedding" in record["resized_variables"][0]
        assert read_manifest(bundle)["input"]["shape"][0] == INPUT_SIZE


@pytest.mark.slow
def test_init_from_refuses_another_architecture_or_split(trained, kaggle_phantoms, tmp_path, capsys):
    arch, _, bundle, _ = trained
    other = "vit_cnn" if arch == "resnet50" else "resnet50"
    command = _init_from_command(kaggle_phantoms, arch, bundle, tmp_path)
    command[command.index("--arch") + 1] = other
    command[command.index("--learning-rate") + 1] = LEARNING_RATES[other]
    assert main(command) == 2
    assert f"architecture {arch!r}, this run trains {other!r}" in capsys.readouterr().err
    # Same data, another split seed: the source's training images would be validated on.
    assert main(_init_from_command(kaggle_phantoms, arch, bundle, tmp_path, "--seed", "1")) == 2
    assert "would be in this run's validation split" in capsys.readouterr().err
    assert not (tmp_path / "models" / "classification").exists()


@pytest.mark.slow
def test_training_chooses_tta_and_temperature_and_calibrate_writes_a_version_evaluate_reproduces(
        trained, kaggle_phantoms, tmp_path, capsys):
    from brainscan.models.bundle import read_manifest

    arch, out, bundle, _ = trained
    manifest = read_manifest(bundle)
    calibration = manifest["metrics"]["calibration"]
    assert manifest["inference"]["tta"] == calibration["tta"] and calibration["tta"] in ([], ["flip_lr"])
    assert manifest["inference"]["temperature"] == pytest.approx(calibration["temperature"], rel=1e-5)
    assert calibration["nll_after"] <= calibration["candidates"][len(calibration["tta"])]["nll"] + 1e-9
    # `brainscan models calibrate` redoes the choice on the rebuilt validation split: a new version,
    # same weights, which `evaluate --validation-split` reproduces as served.
    assert main(["models", "--root", str(out), "calibrate", str(bundle), str(kaggle_phantoms),
                 "--version", "test-1.1"]) == 0
    capsys.readouterr()
    calibrated = read_manifest(out / "classification" / arch / "test-1.1")
    assert calibrated["weights"]["sha256"] == manifest["weights"]["sha256"]
    assert calibrated["training"]["calibrated_from"]["version"] == "test-1"
    assert calibrated["inference"]["tta"] == calibrated["metrics"]["calibration"]["tta"]
    assert calibrated["metrics"]["calibration"]["temperature"] == pytest.approx(calibration["temperature"], rel=0.05)
    report_dir = tmp_path / "report"
    assert main(["evaluate", str(out / "classification" / arch / "test-1.1"), str(kaggle_phantoms),
                 "--validation-split", "--out", str(report_dir), "--quiet"]) == 0
    section = json.loads((report_dir / "report.json").read_text())["splits"]["Validation"]
    assert abs(section["accuracy"] - calibrated["metrics"]["validation"]["accuracy"]) <= 2 / section["n_samples"]
    assert section["calibration"]["ece"] == pytest.approx(calibrated["metrics"]["validation"]["calibration"]["ece"],
                                                          abs=0.02)
