"""Soft region targets (``--soft-targets``): each coarse voxel's fraction of a region, not its nearest label."""

from __future__ import annotations

import numpy as np
import pytest

from brainscan.labels import brats_to_regions
from brainscan.preprocess.volume3d import VolumePreprocessConfig, crop_like, preprocess_case
from training.augment import AugmentConfig
from training.patches import PatchSampler, PreparedCase, attach_soft_targets, prepare_arrays, soft_region_targets

SHAPE = (32, 32, 32)
HALF = (16, 16, 16)
CONFIG = VolumePreprocessConfig(divisor=8, target_spacing=2.0)


def thin_rim_case(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Channels filling the grid (so the crop is all of it) and a label map with a 1-voxel enhancing rim."""
    rng = np.random.default_rng(seed)
    channels = rng.uniform(1.0, 2.0, size=(4, *SHAPE)).astype(np.float32)
    x, y, z = np.indices(SHAPE)
    radius = np.sqrt((x - 15.3) ** 2 + (y - 16.6) ** 2 + (z - 15.9) ** 2)
    seg = np.zeros(SHAPE, dtype=np.uint8)
    seg[radius < 10] = 2          # edema
    seg[radius < 6.5] = 4         # enhancing rim, 1 voxel thick
    seg[radius < 5.5] = 1         # necrotic core inside it
    return channels, seg


def test_soft_targets_are_each_coarse_voxels_fraction_of_the_region():
    channels, seg = thin_rim_case()
    _, info = preprocess_case(channels, CONFIG, spacing=(1.0, 1.0, 1.0))
    assert info.resampled_shape == HALF and info.crop_slices == tuple(slice(0, n) for n in SHAPE)
    soft = soft_region_targets(seg, info)
    regions = brats_to_regions(seg).astype(np.float64)
    expected = regions.reshape(16, 2, 16, 2, 16, 2, 3).mean(axis=(1, 3, 5))  # 2x2x2 blocks at 1 mm -> 2 mm
    assert soft.shape == (*HALF, 3) and soft.dtype == np.float32
    np.testing.assert_allclose(soft, expected, atol=1e-5)
    # The nearest-label targets snap the rim to the coarse grid; the fractions keep its volume.
    nearest = brats_to_regions(crop_like(seg, info))
    assert abs(soft[..., 2].sum() * 8 - regions[..., 2].sum()) < 1e-3 * regions[..., 2].sum()
    assert abs(nearest[..., 2].sum() * 8 - regions[..., 2].sum()) > 0.05 * regions[..., 2].sum()


def test_crop_like_refuses_trilinear_on_labels():
    channels, seg = thin_rim_case()
    _, info = preprocess_case(channels, CONFIG, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="order must be 0, or 1 for a float array"):
        crop_like(seg, info, order=1)


def soft_case(seed: int = 0) -> PreparedCase:
    channels, seg = thin_rim_case(seed)
    prepared = prepare_arrays(f"rim{seed}", channels, seg, CONFIG, spacing=(1.0, 1.0, 1.0))
    prepared.soft = soft_region_targets(seg, prepared.info)
    return prepared


def test_the_sampler_cuts_soft_targets_where_it_cuts_the_image():
    case = soft_case()
    plain = PatchSampler([case], patch_size=8, foreground_fraction=1.0, seed=3, targets="regions", soft=True)
    for index in range(6):
        image, targets = plain.sample(index)
        assert image.shape == (8, 8, 8, 4) and targets.shape == (8, 8, 8, 3) and targets.dtype == np.float32
    # Flips and rotations move image and targets together: a case whose image is its soft targets shows it.
    mirrored = PreparedCase("mirror", np.concatenate([case.soft, case.soft[..., :1]], axis=-1), case.labels,
                            case.info, case.foreground, soft=case.soft)
    augment = AugmentConfig(flip_probability=0.5, intensity_probability=0.0, gamma_probability=0.0,
                            noise_probability=0.0, rotation_probability=1.0, scale_probability=1.0)
    sampler = PatchSampler([mirrored], patch_size=8, foreground_fraction=1.0, augment=augment, seed=4,
                           targets="regions", soft=True)
    for index in range(6):
        image, targets = sampler.sample(index)
        assert 0.0 <= targets.min() and targets.max() <= 1.0
        np.testing.assert_allclose(image[..., :3], targets, atol=1e-5)
        assert (targets > 0).any() and ((targets > 0) & (targets < 1)).any()  # fractions, not 0/1


def test_tf_data_and_numpy_batches_carry_the_same_soft_targets():
    sampler = PatchSampler([soft_case(0), soft_case(1)], patch_size=8, augment=AugmentConfig(), seed=2,
                           targets="regions", soft=True)
    images, targets = next(iter(sampler.dataset(2, start=5)))
    assert targets.shape == (2, 8, 8, 8, 3) and targets.dtype.name == "float32"
    expected_images, expected_targets = sampler.batch(2, 0, start=5)
    np.testing.assert_array_equal(images.numpy(), expected_images)
    np.testing.assert_array_equal(targets.numpy(), expected_targets)


def test_soft_targets_need_region_outputs_and_every_cases_fractions(tmp_path):
    from training.segmenter_config import SegmenterTrainConfig

    case = soft_case()
    bare = PreparedCase("bare", case.image, case.labels, case.info, case.foreground)
    with pytest.raises(ValueError, match="soft targets need"):
        PatchSampler([case], patch_size=8, targets="classes", soft=True)
    with pytest.raises(ValueError, match="soft targets need"):
        PatchSampler([case, bare], patch_size=8, targets="regions", soft=True)
    with pytest.raises(ValueError, match="--outputs regions and a --target-spacing"):
        SegmenterTrainConfig(data=tmp_path, arch="unet3d", preset="tiny", soft_targets=True, target_spacing=2.0)
    with pytest.raises(ValueError, match="--outputs regions and a --target-spacing"):
        SegmenterTrainConfig(data=tmp_path, arch="unet3d", preset="tiny", soft_targets=True, outputs="regions")


@pytest.mark.slow
def test_a_soft_target_run_trains_from_label_files_and_records_the_option(tmp_path):
    """The CLI option reaches the sampler: a tiny run on phantom files, with the option in the manifest (at
    4 mm, where validating a phantom takes a dozen windows of the tiny U-Net, not 80)."""
    pytest.importorskip("tensorflow")
    from brainscan.cli.main import main
    from brainscan.data.phantoms import write_brats_phantoms
    from brainscan.models.bundle import read_manifest

    write_brats_phantoms(tmp_path / "data", n=3, seed=5, shape=(48, 48, 40))
    assert main(["train", "segmenter", "--data", str(tmp_path / "data"), "--arch", "unet3d", "--preset", "tiny",
                 "--epochs", "1", "--warmup-epochs", "0", "--steps-per-epoch", "2", "--val-cases", "1",
                 "--target-spacing", "4", "--outputs", "regions", "--soft-targets", "--mixed-precision", "off",
                 "--work-dir", str(tmp_path / "work"), "--out", str(tmp_path / "models"), "--version", "soft-1"]) == 0
    manifest = read_manifest(tmp_path / "models" / "segmentation" / "unet3d" / "soft-1")
    assert manifest["training"]["config"]["soft_targets"] is True and manifest["training"]["epochs_run"] == 1


def test_attach_soft_targets_reads_each_cases_label_file(tmp_path):
    from brainscan.data.brats import find_cases
    from brainscan.data.phantoms import write_brats_phantoms
    from training.patches import prepare_cases, read_truth

    write_brats_phantoms(tmp_path, n=2, seed=1, shape=(40, 40, 32))
    cases = find_cases(tmp_path)
    prepared = prepare_cases(cases, CONFIG)
    attach_soft_targets(cases, prepared)
    for case, ready in zip(cases, prepared):
        truth, _ = read_truth(case)
        np.testing.assert_array_equal(ready.soft, soft_region_targets(truth, ready.info))
        assert ready.soft.shape == (*ready.labels.shape, 3)
        # Where the nearest label says "whole tumour" the fraction is mostly high, and never where none is near.
        assert float(ready.soft[..., 0][ready.labels > 0].mean()) > 0.5
