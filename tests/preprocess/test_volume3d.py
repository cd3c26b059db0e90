"""Tests of brainscan.preprocess.volume3d: normalisation, crop/pad geometry and its exact inverse."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from brainscan.data.brats import find_case, load_case
from brainscan.errors import BadDimensionsError, EmptyInputError, NonFiniteError
from brainscan.io.nifti import load_nifti, save_like, save_nifti
from brainscan.labels import MODALITIES
from brainscan.preprocess.volume3d import (
    CropInfo,
    VolumePreprocessConfig,
    crop_like,
    preprocess_case,
    restore_to_original,
)
from tests.paths import BRATS_SAMPLE, needs_brats_sample


def _synthetic_case(shape: tuple[int, int, int], seed: int, channels: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Random box-shaped 'brain' with positive intensities somewhere inside a zero background."""
    rng = np.random.default_rng(seed)
    lo = [int(rng.integers(0, s)) for s in shape]
    hi = [int(rng.integers(a + 1, s + 1)) for a, s in zip(lo, shape)]
    mask = np.zeros(shape, bool)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    data = rng.normal(loc=500, scale=80, size=(channels, *shape)) * mask
    return data.astype(np.float32), mask


def _expected_box(mask: np.ndarray, margin: int) -> list[tuple[int, int]]:
    hits = np.argwhere(mask)
    return [
        (max(int(hits[:, a].min()) - margin, 0), min(int(hits[:, a].max()) + 1 + margin, mask.shape[a]))
        for a in range(3)
    ]


# ----------------------------------------------------------------------------------------- config


def test_config_round_trip() -> None:
    config = VolumePreprocessConfig(divisor=8, clip_zscore=3.5, crop_to_brain=False, margin=2)
    restored = VolumePreprocessConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    assert VolumePreprocessConfig.from_dict({}) == VolumePreprocessConfig()
    assert VolumePreprocessConfig().to_dict() == {"divisor": 16, "clip_zscore": 5.0, "crop_to_brain": True, "margin": 0}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"divisor": 0}, "divisor.*0"),
        ({"divisor": -16}, "divisor.*-16"),
        ({"divisor": 2.5}, "divisor.*2.5"),
        ({"divisor": True}, "divisor.*True"),
        ({"divisor": "16"}, "divisor.*'16'"),
        ({"clip_zscore": 0}, "clip_zscore.*0"),
        ({"clip_zscore": -1.0}, "clip_zscore.*-1.0"),
        ({"clip_zscore": float("nan")}, "clip_zscore.*nan"),
        ({"clip_zscore": float("inf")}, "clip_zscore.*inf"),
        ({"clip_zscore": "5"}, "clip_zscore.*'5'"),
        ({"crop_to_brain": "yes"}, "crop_to_brain.*'yes'"),
        ({"crop_to_brain": 1}, "crop_to_brain.*1"),
        ({"margin": -1}, "margin.*-1"),
        ({"margin": 1.5}, "margin.*1.5"),
        ({"spacing": 1.0}, "unknown.*spacing"),
    ],
)
def test_config_rejects_bad_values(values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        VolumePreprocessConfig.from_dict(values)


def test_config_from_dict_needs_a_dict() -> None:
    with pytest.raises(ValueError, match="dict"):
        VolumePreprocessConfig.from_dict([("divisor", 8)])  # type: ignore[arg-type]


def test_crop_info_round_trip_and_validation() -> None:
    info = CropInfo(original_shape=(10, 11, 12), crop=((1, 9), (0, 11), (3, 4)), pad=((0, 0), (2, 3), (7, 8)))
    assert CropInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info
    assert info.cropped_shape == (8, 11, 1) and info.padded_shape == (8, 16, 16)
    bad = [
        {"original_shape": [10, 11], "crop": [[0, 1]] * 2, "pad": [[0, 0]] * 2},
        {"original_shape": [10, 11, 12], "crop": [[0, 11], [0, 1], [0, 1]], "pad": [[0, 0]] * 3},
        {"original_shape": [10, 11, 12], "crop": [[5, 5], [0, 1], [0, 1]], "pad": [[0, 0]] * 3},
        {"original_shape": [10, 11, 12], "crop": [[0, 1]] * 3, "pad": [[0, -1]] * 3},
        {"original_shape": [10, 11, 12], "crop": [[0, 1]] * 3},
    ]
    for d in bad:
        with pytest.raises(ValueError):
            CropInfo.from_dict(d)


# ----------------------------------------------------------------------------------------- geometry

GEOMETRY = [
    # (shape, seed, config)
    ((17, 23, 9), 0, VolumePreprocessConfig()),
    ((31, 5, 12), 1, VolumePreprocessConfig(divisor=8, margin=2)),
    ((16, 16, 16), 2, VolumePreprocessConfig(divisor=16)),
    ((1, 7, 3), 3, VolumePreprocessConfig(divisor=4)),
    ((20, 13, 11), 4, VolumePreprocessConfig(divisor=1, margin=50)),
    ((19, 21, 15), 5, VolumePreprocessConfig(divisor=16, crop_to_brain=False)),
    ((25, 18, 33), 6, VolumePreprocessConfig(divisor=32, margin=3)),
]


@pytest.mark.parametrize(("shape", "seed", "config"), GEOMETRY)
def test_crop_and_pad_geometry(shape, seed: int, config: VolumePreprocessConfig) -> None:
    channels, mask = _synthetic_case(shape, seed)
    x, info = preprocess_case(channels, config)
    assert x.dtype == np.float32 and x.shape[3] == 4
    expected_box = _expected_box(mask, config.margin) if config.crop_to_brain else [(0, s) for s in shape]
    assert list(info.crop) == expected_box
    for axis in range(3):
        cropped = expected_box[axis][1] - expected_box[axis][0]
        assert x.shape[axis] % config.divisor == 0
        assert cropped <= x.shape[axis] < cropped + config.divisor  # the smallest multiple
        before, after = info.pad[axis]
        assert before + after == x.shape[axis] - cropped and after - before in (0, 1)
    assert x.shape[:3] == info.padded_shape


@pytest.mark.parametrize(("shape", "seed", "config"), GEOMETRY)
def test_restore_inverts_geometry_exactly(shape, seed: int, config: VolumePreprocessConfig) -> None:
    channels, mask = _synthetic_case(shape, seed)
    _, info = preprocess_case(channels, config)
    # A label map inside the brain comes back voxel for voxel.
    rng = np.random.default_rng(seed)
    seg = (rng.choice(np.array([0, 1, 2, 4], np.uint8), size=shape) * mask).astype(np.uint8)
    cropped = crop_like(seg, info)
    assert cropped.shape == info.padded_shape and cropped.dtype == np.uint8
    np.testing.assert_array_equal(restore_to_original(cropped, info), seg)
    # Any array on the network grid lands on the crop box and nowhere else.
    restored = restore_to_original(np.ones(info.padded_shape, np.int32), info, fill=-1)
    box = np.zeros(shape, bool)
    box[info.crop_slices] = True
    np.testing.assert_array_equal(restored, np.where(box, 1, -1))
    # Coordinates survive the round trip (catches off-by-one shifts that a constant would not).
    index = np.arange(np.prod(shape)).reshape(shape)
    np.testing.assert_array_equal(restore_to_original(crop_like(index, info), info)[box], index[box])


def test_restore_probabilities_fill_per_channel() -> None:
    channels, mask = _synthetic_case((18, 14, 10), 7)
    _, info = preprocess_case(channels, VolumePreprocessConfig(divisor=8))
    probs = np.zeros((*info.padded_shape, 4), np.float32)
    probs[..., 2] = 1.0  # the network says "edema" everywhere on its grid
    restored = restore_to_original(probs, info, fill=(1, 0, 0, 0))
    assert restored.shape == (18, 14, 10, 4) and restored.dtype == np.float32
    labels = restored.argmax(axis=-1)
    box = np.zeros(mask.shape, bool)
    box[info.crop_slices] = True
    np.testing.assert_array_equal(labels, np.where(box, 2, 0))
    np.testing.assert_array_equal(crop_like(restored, info)[info.unpad_slices], probs[info.unpad_slices])


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda info: restore_to_original(np.zeros((9, 8, 8)), info), "expected spatial shape"),
        (lambda info: restore_to_original(np.zeros((8, 8)), info), "expected spatial shape"),
        (lambda info: restore_to_original(np.zeros((*info.padded_shape, 4)), info, fill=(1, 0)), "fill"),
        (lambda info: restore_to_original(np.zeros(info.padded_shape), info, fill=(1, 0, 0, 0)), "fill"),
        (lambda info: crop_like(np.zeros((18, 14, 11)), info), "label map"),
    ],
    ids=["wrong_grid", "2d", "fill_length", "fill_without_channels", "crop_like_wrong_grid"],
)
def test_shape_errors(call, message: str) -> None:
    channels, _ = _synthetic_case((18, 14, 10), 8)
    _, info = preprocess_case(channels, VolumePreprocessConfig(divisor=8))
    with pytest.raises(BadDimensionsError, match=message):
        call(info)


# ----------------------------------------------------------------------------------------- intensities


@pytest.mark.parametrize(("shape", "seed"), [((20, 16, 12), 10), ((15, 27, 9), 11)])
def test_zscore_over_brain_voxels(shape, seed: int) -> None:
    channels, mask = _synthetic_case(shape, seed)
    channels[:, ~mask] = 0
    x, info = preprocess_case(channels, VolumePreprocessConfig(clip_zscore=100.0))
    restored = restore_to_original(x, info)
    assert np.all(restored[~mask] == 0)
    for c in range(4):
        brain = restored[..., c][mask]
        assert brain.mean() == pytest.approx(0.0, abs=1e-4)
        assert brain.std() == pytest.approx(1.0, abs=1e-4)
        values = channels[c][mask].astype(np.float64)
        np.testing.assert_allclose(brain, (values - values.mean()) / values.std(), atol=1e-4)


def test_zscore_is_clipped() -> None:
    channels, mask = _synthetic_case((20, 16, 12), 12)
    channels[0][tuple(np.argwhere(mask)[0])] = 1e6  # one bright artefact
    x, _ = preprocess_case(channels, VolumePreprocessConfig(clip_zscore=2.5))
    assert x.max() == pytest.approx(2.5) and x.min() >= -2.5


def test_brain_is_union_of_channels_and_constant_channel_is_safe() -> None:
    channels, mask = _synthetic_case((12, 12, 12), 13, channels=2)
    only_second = mask.copy()
    only_second[tuple(np.argwhere(mask)[0])] = False
    channels[0][~only_second] = 0  # channel 0 lacks one brain voxel: still brain (channel 1 has it)
    channels[1][mask] = 42.0  # constant modality: no spread to divide by
    x, info = preprocess_case(channels, VolumePreprocessConfig(divisor=1, clip_zscore=100.0))
    assert info.crop == tuple(tuple(b) for b in _expected_box(mask, 0))
    assert np.isfinite(x).all()
    assert np.all(x[..., 1] == 0)


@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.float64])
def test_all_zero_volume_uses_full_grid(dtype) -> None:
    x, info = preprocess_case(np.zeros((4, 10, 9, 7), dtype), VolumePreprocessConfig(divisor=8))
    assert info.crop == ((0, 10), (0, 9), (0, 7))
    assert x.shape == (16, 16, 8, 4) and not x.any()


@pytest.mark.parametrize(
    ("modify", "error", "message"),
    [
        (lambda c: c.__setitem__((1, 3, 3, 3), np.nan), NonFiniteError, "t1ce"),
        (lambda c: c.__setitem__((3, 0, 0, 0), np.inf), NonFiniteError, "flair"),
        (lambda c: c[0, 0], BadDimensionsError, r"\(C, X, Y, Z\)"),
        (lambda c: c[:, :0], EmptyInputError, "empty"),
    ],
    ids=["nan_t1ce", "inf_flair", "3d_input", "empty_axis"],
)
def test_bad_input(modify, error: type, message: str) -> None:
    channels, _ = _synthetic_case((8, 8, 8), 14)
    result = modify(channels)
    with pytest.raises(error, match=message):
        preprocess_case(channels if result is None else result)


def test_two_channel_error_names_channel_index() -> None:
    channels, _ = _synthetic_case((8, 8, 8), 15, channels=2)
    channels[1, 0, 0, 0] = np.nan
    with pytest.raises(NonFiniteError, match="channel 1"):
        preprocess_case(channels)


# ----------------------------------------------------------------------------------------- end to end


@pytest.mark.parametrize(
    "affine",
    [
        np.diag([1.0, 1.0, 1.0, 1.0]),
        np.array([[0, 0, -2.0, 30], [1.2, 0, 0, -5], [0, -0.9, 0, 12], [0, 0, 0, 1]]),  # permuted, non-RAS
    ],
    ids=["ras", "permuted_lps"],
)
def test_files_to_mask_round_trip(tmp_path: Path, affine: np.ndarray) -> None:
    """Case on disk -> load -> preprocess -> 'prediction' -> restore -> mask file on the input grid."""
    shape = (13, 11, 9)
    channels, mask = _synthetic_case(shape, 16)
    seg = np.where(mask, 2, 0).astype(np.uint8)
    folder = tmp_path / "BraTS20_Training_007"
    for index, modality in enumerate(MODALITIES):
        save_nifti(channels[index], folder / f"BraTS20_Training_007_{modality}.nii", affine=affine)
    save_nifti(seg, folder / "BraTS20_Training_007_seg.nii", affine=affine)
    loaded = load_case(find_case(folder))
    x, info = preprocess_case(loaded.channels, VolumePreprocessConfig(divisor=8))
    info = CropInfo.from_dict(json.loads(json.dumps(info.to_dict())))  # as a worker would store it
    prediction = crop_like(loaded.seg, info)  # a perfect network
    out = save_like(restore_to_original(prediction, info), loaded.reference, tmp_path / "mask.nii.gz")
    written = load_nifti(out)
    np.testing.assert_array_equal(written.data, seg)
    np.testing.assert_allclose(written.affine, affine, atol=1e-5)
    assert x.shape[:3] == info.padded_shape


@pytest.fixture(scope="module")
def real_case():
    return load_case(find_case(BRATS_SAMPLE))


@needs_brats_sample
def test_real_case_round_trip(real_case) -> None:
    x, info = preprocess_case(real_case.channels, VolumePreprocessConfig())
    assert x.dtype == np.float32 and x.shape[3] == 4
    assert all(s % 16 == 0 for s in x.shape[:3]) and all(s <= 256 for s in x.shape[:3])
    assert info.original_shape == (240, 240, 155)
    np.testing.assert_array_equal(restore_to_original(crop_like(real_case.seg, info), info), real_case.seg)
    brain = np.any(real_case.channels != 0, axis=0)
    box = restore_to_original(np.ones(info.padded_shape, bool), info)
    assert box[brain].all()  # the crop never cuts brain
    assert x.min() >= -5.0 and x.max() <= 5.0
    # Heavy tails (bright vessels on t1ce) make clipping change the spread; unclipped, each
    # modality is exactly standardised over the brain.
    unclipped, _ = preprocess_case(real_case.channels, VolumePreprocessConfig(clip_zscore=1e6))
    restored = restore_to_original(unclipped, info)
    assert not restored[~brain].any()
    for c in range(4):
        values = restored[..., c][brain].astype(np.float64)
        assert values.mean() == pytest.approx(0.0, abs=1e-4) and values.std() == pytest.approx(1.0, abs=1e-4)


# ----------------------------------------------------------------------------------------- region decoding


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("orientation", [None, "LPS"])
def test_restore_regions_is_threshold_after_restore(seed: int, orientation) -> None:
    """The fast decoder (interpolating only near the tumour) gives the labels of the whole restore."""
    from brainscan.labels import regions_to_brats
    from brainscan.preprocess.volume3d import restore_regions

    channels, _ = _synthetic_case((41, 38, 29), 20 + seed)
    config = VolumePreprocessConfig(divisor=8, target_spacing=2.0, orientation=orientation)
    affine = np.diag([-1.0, 1.0, 1.2, 1.0])
    x, info = preprocess_case(channels, config, affine=affine)
    rng = np.random.default_rng(seed)
    # smooth blobs of region probability (nested-ish), with noise, on the padded network grid
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in x.shape[:3]], indexing="ij"), axis=-1).astype(np.float32)
    centre = np.array([n / 2 for n in x.shape[:3]]) + rng.normal(0, 2, 3)
    distance = np.sqrt(((grid - centre) ** 2).sum(-1))
    probabilities = np.stack([1 / (1 + np.exp(distance - r)) for r in (6.0, 4.0, 2.5)], axis=-1)
    probabilities = np.clip(probabilities + rng.normal(0, 0.05, probabilities.shape), 0, 1).astype(np.float32)
    expected = regions_to_brats(restore_to_original(probabilities, info, fill=0.0), 0.5)
    got = restore_regions(probabilities, info, 0.5)
    assert got.dtype == np.uint8 and got.shape == channels.shape[1:]
    assert set(np.unique(got)) >= {0, 2}
    np.testing.assert_array_equal(got, expected)
    # nothing above the threshold: all background, without interpolating anything
    np.testing.assert_array_equal(restore_regions(probabilities * 0.4, info, 0.5), np.zeros(channels.shape[1:]))


def test_restore_regions_on_the_input_grid_and_bad_input() -> None:
    from brainscan.labels import regions_to_brats
    from brainscan.preprocess.volume3d import restore_regions

    channels, _ = _synthetic_case((20, 16, 12), 30)
    x, info = preprocess_case(channels, VolumePreprocessConfig(divisor=8))
    probabilities = np.random.default_rng(0).random((*x.shape[:3], 3)).astype(np.float32)
    np.testing.assert_array_equal(restore_regions(probabilities, info, 0.3),
                                  regions_to_brats(restore_to_original(probabilities, info, fill=0.0), 0.3))
    with pytest.raises(BadDimensionsError, match="3 channels"):
        restore_regions(probabilities[..., :2], info)
    with pytest.raises(BadDimensionsError, match="shape"):
        restore_regions(probabilities[1:], info)
    with pytest.raises(ValueError, match="threshold"):
        restore_regions(probabilities, info, 1.0)


def test_fortran_ordered_channels_preprocess_like_c_ordered_ones() -> None:
    """NIfTI volumes load Fortran-ordered; the memory order must not change the network input."""
    from brainscan.data.brats import stack_channels

    channels, _ = _synthetic_case((33, 28, 21), 40)
    stacked = stack_channels([np.asfortranarray(c.astype(np.int16)) for c in channels])
    assert stacked.dtype == np.float32 and stacked.shape == channels.shape
    assert all(c.flags.f_contiguous for c in stacked)
    np.testing.assert_array_equal(stacked, channels.astype(np.int16).astype(np.float32))
    config = VolumePreprocessConfig(divisor=8, target_spacing=2.0)
    x_f, info_f = preprocess_case(stacked, config)
    x_c, info_c = preprocess_case(np.ascontiguousarray(stacked), config)
    assert info_f == info_c and x_f.flags.c_contiguous
    np.testing.assert_allclose(x_f, x_c, rtol=0, atol=1e-6)
