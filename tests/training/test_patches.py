"""Tests for training.patches: preparation through the serving preprocessing, sampling, augmentation."""

from __future__ import annotations

import numpy as np
import pytest

from brainscan.data.brats import find_case, load_case
from brainscan.data.phantoms import make_brats_phantom, write_brats_phantoms
from brainscan.labels import brats_to_index
from brainscan.preprocess.volume3d import VolumePreprocessConfig, crop_like, preprocess_case
from training.augment import AugmentConfig, augment_patch
from training.patches import (
    PatchSampler,
    PreparedCase,
    dataset_fingerprint,
    extract_patch,
    prepare_arrays,
    prepare_case,
)

PHANTOM_SHAPE = (64, 64, 48)
PREPROCESS = VolumePreprocessConfig(divisor=8)
NO_AUGMENT_INTENSITY = dict(intensity_probability=0.0, gamma_probability=0.0, noise_probability=0.0)


@pytest.fixture(scope="module")
def cases() -> list[PreparedCase]:
    prepared = []
    for index in (1, 2):
        phantom = make_brats_phantom((0, index), PHANTOM_SHAPE)
        prepared.append(prepare_arrays(f"case{index}", phantom.channels, phantom.seg, PREPROCESS))
    return prepared


def labelled_cube_case(shape=(24, 20, 16)) -> PreparedCase:
    """A case whose image encodes its labels, so any misalignment between the two shows."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=shape).astype(np.uint8)
    image = np.stack([labels + 1.0 + c for c in range(4)], axis=-1).astype(np.float32)
    image[:2] = 0  # a background slab, as outside the brain
    labels[:2] = 0
    return prepared_from(labels, image)


def prepared_from(labels: np.ndarray, image: np.ndarray) -> PreparedCase:
    from brainscan.preprocess.volume3d import CropInfo

    info = CropInfo(labels.shape, tuple((0, s) for s in labels.shape), ((0, 0),) * 3)
    flat = labels.ravel()
    foreground = {k: np.flatnonzero(flat == k).astype(np.int32) for k in (1, 2, 3) if (flat == k).any()}
    return PreparedCase("cube", image, labels, info, foreground)


def test_prepared_case_matches_serving_preprocessing(cases):
    phantom = make_brats_phantom((0, 1), PHANTOM_SHAPE)
    image, info = preprocess_case(phantom.channels, PREPROCESS)
    np.testing.assert_array_equal(cases[0].image, image)
    np.testing.assert_array_equal(cases[0].labels, brats_to_index(crop_like(phantom.seg, info)))
    assert all(s % PREPROCESS.divisor == 0 for s in cases[0].shape)
    assert sum(len(v) for v in cases[0].foreground.values()) == int(np.count_nonzero(cases[0].labels))


def test_prepare_case_from_files_uses_and_reuses_cache(tmp_path):
    folder = write_brats_phantoms(tmp_path / "data", n=1, shape=(48, 48, 32))[0]
    case = find_case(folder)
    first = prepare_case(case, PREPROCESS, cache_dir=tmp_path / "cache")
    again = prepare_case(case, PREPROCESS, cache_dir=tmp_path / "cache")
    assert isinstance(again.image, np.memmap)
    np.testing.assert_array_equal(np.asarray(again.image), np.asarray(first.image))
    np.testing.assert_array_equal(again.labels, first.labels)
    loaded = load_case(case)
    expected, info = preprocess_case(loaded.channels, PREPROCESS)
    np.testing.assert_array_equal(np.asarray(again.image), expected)
    assert again.info == info
    # Another preprocessing config must not reuse the cached arrays.
    changed = VolumePreprocessConfig(divisor=32)
    expected_changed, _ = preprocess_case(loaded.channels, changed)
    np.testing.assert_array_equal(np.asarray(prepare_case(case, changed, cache_dir=tmp_path / "cache").image),
                                  expected_changed)


@pytest.mark.parametrize("patch_size, augment", [(32, None), (32, AugmentConfig()), (16, AugmentConfig())])
def test_sample_shapes_and_dtypes(cases, patch_size, augment):
    sampler = PatchSampler(cases, patch_size=patch_size, augment=augment, seed=0)
    for index in range(6):
        image, labels = sampler.sample(index)
        assert image.shape == (patch_size,) * 3 + (4,) and image.dtype == np.float32
        assert labels.shape == (patch_size,) * 3 and labels.dtype == np.uint8
        assert np.isfinite(image).all() and set(np.unique(labels)) <= {0, 1, 2, 3}


@pytest.mark.parametrize("fraction", [0.0, 1 / 3, 0.5, 1.0])
def test_foreground_fraction_is_honoured(cases, fraction):
    sampler = PatchSampler(cases, patch_size=32, foreground_fraction=fraction, seed=1)
    n = 60
    assert sum(sampler.is_foreground(i) for i in range(300)) == round(300 * fraction)
    centred = 0
    for index in range(n):
        _, labels = sampler.sample(index)
        on_tumour = labels[16, 16, 16] > 0
        if sampler.is_foreground(index):
            assert on_tumour, f"patch {index} should be centred on a tumour voxel"
        centred += on_tumour
    # Uniform patches rarely centre on tumour (about 1 % of these phantoms' voxels).
    assert fraction <= centred / n <= fraction + 0.1


def test_case_smaller_than_patch_is_padded_whole(cases):
    case = cases[0]
    sampler = PatchSampler([case], patch_size=64, foreground_fraction=0.0, seed=0)
    for index in range(3):
        image, labels = sampler.sample(index)
        assert image.shape[:3] == (64, 64, 64)
        assert np.count_nonzero(labels) == np.count_nonzero(case.labels)
        assert np.count_nonzero(np.any(image != 0, axis=-1)) == np.count_nonzero(np.any(case.image != 0, axis=-1))


def test_same_seed_same_patches_and_other_seed_differs(cases):
    a, b = PatchSampler(cases, patch_size=32, augment=AugmentConfig(), seed=5), PatchSampler(
        cases, patch_size=32, augment=AugmentConfig(), seed=5)
    other = PatchSampler(cases, patch_size=32, augment=AugmentConfig(), seed=6)
    for index in (0, 7):
        np.testing.assert_array_equal(a.sample(index)[0], b.sample(index)[0])
    assert any(not np.array_equal(a.sample(i)[0], other.sample(i)[0]) for i in range(3))


def test_flips_keep_labels_aligned_with_images():
    case = labelled_cube_case()
    plain = PatchSampler([case], patch_size=16, foreground_fraction=0.0, seed=3)
    flipped = PatchSampler([case], patch_size=16, foreground_fraction=0.0, seed=3,
                           augment=AugmentConfig(flip_probability=1.0, **NO_AUGMENT_INTENSITY))
    for index in range(4):
        image, labels = flipped.sample(index)
        raw_image, raw_labels = plain.sample(index)
        brain = image[..., 0] != 0
        np.testing.assert_array_equal(image[..., 0][brain] - 1.0, labels[brain])
        np.testing.assert_array_equal(labels, np.flip(raw_labels, (0, 1, 2)))
        np.testing.assert_array_equal(image, np.flip(raw_image, (0, 1, 2)))


def test_intensity_augmentation_changes_brain_only_and_keeps_labels():
    case = labelled_cube_case()
    image, labels = extract_patch(case.image, (0, 0, 0), (16, 16, 16)), extract_patch(case.labels, (0, 0, 0), (16,) * 3)
    config = AugmentConfig(flip_probability=0.0, intensity_probability=1.0, gamma_probability=1.0,
                           noise_probability=1.0)
    new_image, new_labels = augment_patch(image, labels, np.random.default_rng(0), config)
    background = ~np.any(image != 0, axis=-1)
    np.testing.assert_array_equal(new_labels, labels)
    assert np.all(new_image[background] == 0)
    assert not np.allclose(new_image[~background], image[~background])
    assert new_image.dtype == np.float32 and np.isfinite(new_image).all()


def _scanner_only(**probabilities) -> AugmentConfig:
    return AugmentConfig(flip_probability=0.0, intensity_probability=0.0, gamma_probability=0.0,
                         noise_probability=0.0, **probabilities)


def test_other_scanner_transforms_keep_background_labels_and_draw_nothing_when_off():
    from training.augment import scanner_transforms

    rng = np.random.default_rng(1)
    image = rng.normal(size=(24, 24, 24, 2)).astype(np.float32)
    image[:4] = 0.0  # background slab
    brain = np.any(image != 0, axis=-1)
    labels = (rng.random((24, 24, 24)) > 0.5).astype(np.uint8)
    # Off (the default): the patch stream is the one standard runs have always drawn.
    standard = np.random.default_rng(7)
    augment_patch(image, labels, standard, AugmentConfig())
    again = np.random.default_rng(7)
    augment_patch(image, labels, again, AugmentConfig(bias_field_probability=0.0, blur_probability=0.0))
    assert standard.random() == again.random()
    for name in ("bias_field_probability", "blur_probability", "thick_slices_probability"):
        out, out_labels = augment_patch(image, labels, np.random.default_rng(3), _scanner_only(**{name: 1.0}))
        np.testing.assert_array_equal(out_labels, labels)
        assert np.all(out[~brain] == 0) and np.isfinite(out).all() and out.dtype == np.float32, name
        assert not np.allclose(out[brain], image[brain]), name
    # The bias field is smooth and multiplies (z + k): a constant patch becomes (c + k) * field - k.
    flat = np.full((24, 24, 24, 1), 0.5, dtype=np.float32)
    biased = scanner_transforms(flat.copy(), np.ones((24, 24, 24), bool), np.random.default_rng(4),
                                _scanner_only(bias_field_probability=1.0))[..., 0]
    assert biased.std() > 0.02 and np.abs(np.diff(biased, axis=0)).max() < 0.2
    # Thick slices: one axis smoothed (slab average, then back), the other two untouched.
    wave = np.sin(np.arange(24, dtype=np.float32))
    pattern = (wave[:, None, None] + wave[None, :, None] + wave[None, None, :])[..., None]
    for seed in range(3):
        thick = scanner_transforms(pattern.copy(), np.ones((24, 24, 24), bool), np.random.default_rng(seed),
                                   AugmentConfig(thick_slices_probability=1.0))[..., 0]
        same = [np.allclose(np.diff(thick, axis=a), np.diff(pattern[..., 0], axis=a), atol=1e-5) for a in range(3)]
        assert sum(same) == 2, same
        axis = same.index(False)
        assert np.abs(np.diff(thick, axis=axis)).mean() < 0.8 * np.abs(np.diff(pattern[..., 0], axis=axis)).mean()


def test_other_scanners_is_an_option_of_the_segmenter_recorded_in_its_config(tmp_path):
    from training.segmenter import SegmenterTrainConfig

    config = SegmenterTrainConfig(data=tmp_path, arch="unet3d", preset="tiny", other_scanners=True)
    assert config.augment_config() == AugmentConfig.other_scanners()
    assert config.augment_config().bias_field_probability > 0
    assert SegmenterTrainConfig(data=tmp_path, arch="unet3d", preset="tiny").augment_config() == AugmentConfig()
    with pytest.raises(ValueError, match="cannot go with --no-augment"):
        SegmenterTrainConfig(data=tmp_path, arch="unet3d", preset="tiny", other_scanners=True, augment=False)


@pytest.mark.parametrize(
    "start, expected_sum",
    [((0, 0, 0), 8), ((-1, -1, -1), 1), ((1, 1, 1), 1), ((2, 2, 2), 0)],
)
def test_extract_patch_zero_fills_outside(start, expected_sum):
    array = np.ones((2, 2, 2), dtype=np.uint8)
    patch = extract_patch(array, start, (2, 2, 2))
    assert patch.shape == (2, 2, 2) and int(patch.sum()) == expected_sum


def test_dataset_batches_one_hot_and_continues_at_start(cases):
    sampler = PatchSampler(cases, patch_size=16, augment=AugmentConfig(), seed=2)
    images, labels = next(iter(sampler.dataset(2, start=10)))
    assert images.shape == (2, 16, 16, 16, 4) and images.dtype.name == "float32"
    assert labels.shape == (2, 16, 16, 16, 4) and labels.dtype.name == "float32"
    expected_image, expected_labels = sampler.sample(10)
    np.testing.assert_array_equal(images[0].numpy(), expected_image)
    np.testing.assert_array_equal(np.argmax(labels[0].numpy(), axis=-1), expected_labels)
    _, sparse = next(iter(sampler.dataset(3, one_hot=False)))
    assert sparse.shape == (3, 16, 16, 16) and sparse.dtype.name == "uint8"


@pytest.mark.parametrize(
    "kwargs, message",
    [({"patch_size": 0}, "patch_size"), ({"foreground_fraction": 1.5}, "foreground_fraction"),
     ({"cases": []}, "at least one case")],
)
def test_sampler_rejects_bad_arguments(cases, kwargs, message):
    arguments = {"cases": cases, "patch_size": 16, **kwargs}
    with pytest.raises(ValueError, match=message):
        PatchSampler(arguments.pop("cases"), **arguments)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"flip_probability": 2.0}, "flip_probability"), ({"scale_range": (1.2, 0.8)}, "scale_range"),
     ({"gamma_range": (0.0, 1.0)}, "positive"), ({"noise_std_max": -1.0}, "noise_std_max"),
     ({"bias_field_probability": 1.5}, "bias_field_probability"), ({"thick_slices_factor_range": (0.5, 2)}, ">= 1")],
)
def test_augment_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AugmentConfig(**kwargs)


def test_dataset_fingerprint_depends_on_cases_not_order(tmp_path):
    folders = write_brats_phantoms(tmp_path, n=2, shape=(32, 32, 16))
    found = [find_case(f) for f in folders]
    assert dataset_fingerprint(found) == dataset_fingerprint(found[::-1])
    assert dataset_fingerprint(found) != dataset_fingerprint(found[:1])
