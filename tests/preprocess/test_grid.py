"""Tests of brainscan.preprocess.grid's linear resampling of part of a grid (the fast path of mask decoding)."""

from __future__ import annotations

import numpy as np
import pytest

from brainscan.preprocess.grid import linear_taps, reachable_box, resample, resample_linear_box

SHAPES = [((12, 9, 7), (24, 18, 14)), ((13, 17, 9), (27, 33, 20)), ((40, 41, 39), (20, 21, 19)),
          ((5, 6, 7), (5, 12, 3)), ((1, 4, 3), (3, 4, 6))]


@pytest.mark.parametrize(("in_shape", "out_shape"), SHAPES)
@pytest.mark.parametrize("channels", [None, 3])
def test_linear_box_of_the_whole_grid_is_resample(in_shape, out_shape, channels) -> None:
    rng = np.random.default_rng(sum(in_shape))
    array = rng.random((*in_shape, channels) if channels else in_shape).astype(np.float32)
    whole = tuple((0, n) for n in out_shape)
    got = resample_linear_box(array, out_shape, whole)
    assert got.dtype == np.float32 and got.shape == resample(array, out_shape, order=1).shape
    np.testing.assert_allclose(got, resample(array, out_shape, order=1), rtol=0, atol=2e-7)


@pytest.mark.parametrize(("in_shape", "out_shape"), SHAPES)
def test_linear_box_is_that_part_of_the_whole(in_shape, out_shape) -> None:
    rng = np.random.default_rng(7)
    array = rng.random((*in_shape, 2)).astype(np.float32)
    full = resample(array, out_shape, order=1)
    for _ in range(5):
        box = []
        for n in out_shape:
            start = int(rng.integers(0, n))
            box.append((start, int(rng.integers(start + 1, n + 1))))
        part = resample_linear_box(array, out_shape, box)
        np.testing.assert_allclose(part, full[tuple(slice(a, b) for a, b in box)], rtol=0, atol=2e-7)


def test_fortran_ordered_volume_resamples_like_a_c_ordered_one() -> None:
    volume = np.random.default_rng(3).random((21, 30, 17)).astype(np.float32)
    fortran = np.asfortranarray(volume)
    assert fortran.flags.f_contiguous and not fortran.flags.c_contiguous
    np.testing.assert_allclose(resample(fortran, (10, 15, 9), order=1), resample(volume, (10, 15, 9), order=1),
                               rtol=0, atol=2e-7)


def test_linear_taps_stay_inside_the_input() -> None:
    for n_out, n_in in [(1, 1), (7, 3), (3, 7), (144, 72), (73, 144)]:
        low, high, weight = linear_taps(n_out, n_in)
        assert low.min() >= 0 and high.max() <= n_in - 1
        assert np.all((high == low) | (high == low + 1))
        assert np.all((weight >= 0) & (weight <= 1))


@pytest.mark.parametrize(("in_shape", "out_shape"), SHAPES)
def test_reachable_box_holds_every_output_that_reads_the_box(in_shape, out_shape) -> None:
    """An output voxel outside the reachable box is unchanged by anything inside the input box."""
    rng = np.random.default_rng(11)
    box = []
    for n in in_shape:
        start = int(rng.integers(0, n))
        box.append((start, int(rng.integers(start + 1, n + 1))))
    inside = np.zeros(in_shape, np.float32)
    inside[tuple(slice(a, b) for a, b in box)] = 1.0
    touched = resample(inside, out_shape, order=1) > 0
    reached = reachable_box(box, in_shape, out_shape)
    outside = np.ones(out_shape, bool)
    outside[tuple(slice(a, b) for a, b in reached)] = False
    assert not touched[outside].any()
