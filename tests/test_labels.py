"""The label-convention helpers of brainscan.labels: BraTS 2023-2024 files number enhancing tumour 3,
brainscan numbers it 4 inside, and the conversion both ways is exact and refuses the other numbering."""

from __future__ import annotations

import numpy as np
import pytest

from brainscan.errors import InvalidLabelsError
from brainscan.labels import (
    BRATS2021,
    BRATS2023,
    convention_label_names,
    from_convention,
    to_convention,
)

CONVERSIONS = [
    # (convention, labels as brainscan holds them, labels as the convention's files hold them)
    (BRATS2021, [0, 1, 2, 4], [0, 1, 2, 4]),
    (BRATS2023, [0, 1, 2, 4], [0, 1, 2, 3]),
    (BRATS2023, [0, 0, 2], [0, 0, 2]),
    (BRATS2023, [], []),
]


@pytest.mark.parametrize(("convention", "internal", "in_file"), CONVERSIONS,
                         ids=["2021", "2023", "2023_without_et", "empty"])
def test_conversion_both_ways(convention: str, internal: list[int], in_file: list[int]) -> None:
    internal_array = np.array(internal, dtype=np.uint8).reshape(-1, 1, 1)
    written = to_convention(internal_array, convention)
    assert written.dtype == np.uint8 and written.shape == internal_array.shape
    assert written.ravel().tolist() == in_file
    read = from_convention(written.astype(np.float32), convention)  # float-stored labels read as well
    assert read.dtype == np.uint8
    np.testing.assert_array_equal(read, internal_array)


def test_conversion_leaves_its_input_alone() -> None:
    mask = np.array([0, 4, 4], np.uint8)
    to_convention(mask, BRATS2023)
    assert mask.tolist() == [0, 4, 4]


BAD = [
    # (function, convention, values, error, words the message must hold)
    (from_convention, BRATS2023, [0, 4], InvalidLabelsError, ["[4]", "BraTS 2023-2024", "map 4 -> 3"]),
    (from_convention, BRATS2021, [0, 3], InvalidLabelsError, ["[3]", "BraTS 2018-2021", "map 3 -> 4"]),
    (from_convention, BRATS2023, [0, 1.5], InvalidLabelsError, ["[1.5]"]),
    (to_convention, BRATS2023, [0, 3], InvalidLabelsError, ["[3]", "[0, 1, 2, 4]"]),
    (from_convention, "brats2019", [0], ValueError, ["brats2019", "brats2021", "brats2023"]),
    (to_convention, "BraTS2023", [0], ValueError, ["BraTS2023"]),
]


@pytest.mark.parametrize(("function", "convention", "values", "error", "words"), BAD,
                         ids=["4_in_2023", "3_in_2021", "fraction", "3_inside", "unknown", "unknown_to"])
def test_bad_labels_and_conventions_are_refused(function, convention: str, values: list[float], error: type,
                                                words: list[str]) -> None:
    with pytest.raises(error) as caught:
        function(np.array(values), convention)
    for word in words:
        assert word in str(caught.value), str(caught.value)


@pytest.mark.parametrize(("convention", "names"), [
    (BRATS2021, {0: "background", 1: "NCR", 2: "ED", 4: "ET"}),
    (BRATS2023, {0: "background", 1: "NCR", 2: "ED", 3: "ET"}),
])
def test_label_names_per_convention(convention: str, names: dict[int, str]) -> None:
    assert convention_label_names(convention) == names
