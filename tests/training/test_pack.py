"""Packs: BraTS cases preprocessed into one file, and segmenter training from it (TensorFlow and JAX)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

from brainscan.data.brats import find_cases, load_case  # noqa: E402
from brainscan.data.phantoms import write_brats_phantoms  # noqa: E402
from brainscan.errors import DatasetLayoutError  # noqa: E402
from training.pack import read_pack, write_pack  # noqa: E402
from training.patches import PatchSampler, dataset_fingerprint, prepare_case  # noqa: E402
from training.segmenter import SegmenterTrainConfig, labelled_cases, train_segmenter  # noqa: E402
from training.segmenter_validation import evaluate_cases  # noqa: E402


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("brats")
    write_brats_phantoms(root, n=4, seed=3, shape=(64, 64, 48))
    return root


def run_config(data: Path, tmp: Path, **overrides) -> SegmenterTrainConfig:
    """A one-epoch run at 4 mm: the phantoms' 40 x 48 x 40 voxels are 12 windows a validation case (at
    2 mm they were 80, and validation took most of each run)."""
    settings = dict(data=data, arch="unet3d", out=tmp / "models", preset="tiny", epochs=1, steps_per_epoch=2,
                    warmup_epochs=0, val_cases=1, val_every=1, work_dir=tmp / "work", version="pack-1",
                    progress="none", outputs="regions", target_spacing=4.0)
    return SegmenterTrainConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def pack(phantoms, tmp_path_factory) -> tuple[Path, SegmenterTrainConfig]:
    config = run_config(phantoms, tmp_path_factory.mktemp("pack-config"))
    path = write_pack(labelled_cases(phantoms, None, 0), config.preprocess_config(),
                      tmp_path_factory.mktemp("pack") / "phantoms.npz")
    return path, config


def test_pack_holds_the_preprocessed_cases_their_truth_and_fingerprint(pack, phantoms):
    path, config = pack
    folder_cases = find_cases(phantoms)
    packed = read_pack(path)
    assert [c.case_id for c in packed] == [c.case_id for c in folder_cases]
    for source, case in zip(folder_cases, packed):
        expected = prepare_case(source, config.preprocess_config())
        np.testing.assert_allclose(case.prepared.image, expected.image, atol=5e-3)  # float16 in the pack
        np.testing.assert_array_equal(case.prepared.labels, expected.labels)
        assert case.prepared.info == expected.info
        np.testing.assert_array_equal(case.truth(), load_case(source).seg)
        assert prepare_case(case, config.preprocess_config()) is case.prepared
    # A run on the pack has the data fingerprint of a run on the folder.
    assert dataset_fingerprint(packed) == dataset_fingerprint(folder_cases)


def test_pack_refuses_another_preprocessing_and_damaged_files(pack, phantoms, tmp_path):
    path, config = pack
    case = read_pack(path)[0]
    other = run_config(path, tmp_path, target_spacing=3.0).preprocess_config()
    with pytest.raises(DatasetLayoutError, match="write the pack again"):
        prepare_case(case, other)
    broken = tmp_path / "broken.npz"
    broken.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DatasetLayoutError, match="not a brainscan pack|damaged"):
        read_pack(broken)
    with pytest.raises(DatasetLayoutError, match="is a .npz file"):
        write_pack(find_cases(phantoms), config.preprocess_config(), tmp_path / "x.zip")


def test_numpy_batches_are_the_tf_data_batches(pack):
    path, _ = pack
    sampler = PatchSampler([c.prepared for c in read_pack(path)], patch_size=32, foreground_fraction=0.5,
                           seed=4, targets="regions")
    dataset_batches = list(sampler.dataset(2, start=6).take(2).as_numpy_iterator())
    for number, (images, targets) in enumerate(dataset_batches):
        ours = sampler.batch(2, number, start=6)
        np.testing.assert_array_equal(ours[0], images)
        np.testing.assert_array_equal(ours[1], targets)
    sequence = sampler.batches(2, 3, start=6)
    assert len(sequence) == 3
    np.testing.assert_array_equal(sequence[1][0], dataset_batches[1][0])
    # Threads instead of forked processes (what a process holding a GPU uses): the same batches.
    threaded = sampler.batches(2, 3, start=6, workers=2, processes=False)
    assert threaded.workers == 2 and not threaded.use_multiprocessing
    np.testing.assert_array_equal(threaded[1][1], dataset_batches[1][1])


@pytest.mark.slow
def test_training_from_a_pack_validates_as_the_folder_does(pack, phantoms, tmp_path):
    from brainscan.inference.segmenter import Segmenter
    from brainscan.models.bundle import load_bundle, read_manifest

    path, _ = pack
    config = run_config(path, tmp_path)
    manifest = read_manifest(train_segmenter(config))
    assert manifest["training"]["data_fingerprint"] == dataset_fingerprint(find_cases(phantoms))
    assert manifest["training"]["data_description"].startswith("a pack")
    val_ids = manifest["training"]["validation_case_ids"]
    # The same weights score the same on the folder's cases as on the pack's.
    segmenter = Segmenter.from_bundle(load_bundle(config.out / "segmentation" / "unet3d" / "pack-1"))
    on_folder = evaluate_cases(segmenter, [c for c in find_cases(phantoms) if c.case_id in val_ids])
    on_pack = evaluate_cases(segmenter, [c for c in read_pack(path) if c.case_id in val_ids])
    for case_id in val_ids:
        for region in ("WT", "TC", "ET"):
            assert on_pack[case_id][region]["dice"] == pytest.approx(on_folder[case_id][region]["dice"], abs=0.02)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("jax") is None,
                    reason="jax is not installed (the dev extra brings it): the JAX-backend run cannot be tried")
def test_a_pack_trains_under_the_jax_backend_and_tensorflow_serves_the_bundle(pack, phantoms, tmp_path):
    """What a GPU machine without TensorFlow runs: ``KERAS_BACKEND=jax python -m brainscan train ...``."""
    from brainscan.inference.segmenter import segment_case
    from brainscan.models.bundle import load_bundle
    from tests.jax_backend import jax_cpu_env

    path, _ = pack
    env = jax_cpu_env()
    command = [sys.executable, "-m", "brainscan", "train", "segmenter", "--data", str(path), "--arch", "unet3d",
               "--preset", "tiny", "--epochs", "1", "--warmup-epochs", "0", "--steps-per-epoch", "2",
               "--val-cases", "1", "--target-spacing", "4", "--outputs", "regions", "--mixed-precision", "off",
               "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "models"), "--version", "jax-1"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Keras backend jax" in done.stderr
    bundle = load_bundle(tmp_path / "models" / "segmentation" / "unet3d" / "jax-1")  # TensorFlow here
    assert json.loads((bundle.path / "manifest.json").read_text())["training"]["epochs_run"] == 1
    case = find_cases(phantoms)[0]
    loaded = load_case(case, with_seg=False)
    mask = segment_case(bundle, loaded)
    assert mask.shape == loaded.channels.shape[1:]
    assert set(np.unique(mask).tolist()) <= {0, 1, 2, 4}
