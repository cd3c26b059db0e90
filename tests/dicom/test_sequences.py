"""Which series is t1, t1ce, t2, flair: guessed from headers, or given by a mapping; clear errors when unsure.

The series here are headers only (no files): each row of the tables stands for a series as a
scanner of some vendor names and describes it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from brainscan.dicom.reader import DicomInstance, DicomSeries, DicomStudy
from brainscan.dicom.sequences import guess_modality, identify_series, parse_series_mapping
from brainscan.errors import InvalidInputError, SeriesIdentificationError


def _series(uid: str, description: str = "", number: int = 1, **attributes: object) -> DicomSeries:
    header = Dataset()
    header.Modality = "MR"
    header.SeriesInstanceUID = uid
    header.SeriesNumber = number
    header.SeriesDescription = description
    header.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    for keyword, value in attributes.items():
        setattr(header, keyword, value)
    return DicomSeries(uid, [DicomInstance(header, f"{uid}/1", Path("unused"))])


def _study(*series: DicomSeries) -> DicomStudy:
    return DicomStudy(study_uid="1.2.3", series={s.uid: s for s in series})


@pytest.mark.parametrize("description, attributes, expected", [
    ("AX T1 SE POST GD", {}, "t1ce"),
    ("SAG T1 SE", {}, "t1"),
    ("AX T2 TSE", {}, "t2"),
    ("t2_tirm_tra_dark-fluid", {}, "flair"),
    ("AX FLAIR", {}, "flair"),
    ("T2 FLAIR AX", {}, "flair"),
    ("t1_mprage_sag_p2_iso", {}, "t1"),
    ("T1 MPRAGE", {"ContrastBolusAgent": "Gadovist"}, "t1ce"),
    ("T1W_3D_TFE PRE", {}, "t1"),
    ("AX T1+C", {}, "t1ce"),
    ("Ax T1 FSPGR BRAVO post-contrast", {}, "t1ce"),
    ("T1_se_tra_Gd", {}, "t1ce"),
    ("AX T2*_GRE", {}, None),
    ("ep2d_diff_3scan_trace b1000", {}, None),
    ("3-Plane Localizer", {}, None),
    ("SAG T1 MPR", {"ImageType": ["DERIVED", "SECONDARY", "MPR"]}, None),
], ids=lambda v: v if isinstance(v, str) else None)
def test_guess_from_description(description: str, attributes: dict, expected: str | None) -> None:
    assert guess_modality(_series("1.1", description, **attributes)) == expected


@pytest.mark.parametrize("attributes, expected", [
    ({"RepetitionTime": 500, "EchoTime": 10}, "t1"),
    ({"RepetitionTime": 500, "EchoTime": 10, "ContrastBolusAgent": "Dotarem"}, "t1ce"),
    ({"RepetitionTime": 2300, "EchoTime": 3, "InversionTime": 900, "ScanningSequence": ["GR", "IR"]}, "t1"),
    ({"RepetitionTime": 5000, "EchoTime": 100}, "t2"),
    ({"RepetitionTime": 9000, "EchoTime": 90, "InversionTime": 2500, "ScanningSequence": ["SE", "IR"]}, "flair"),
    ({"RepetitionTime": 1500, "EchoTime": 40}, None),
    ({}, None),
], ids=["short TR/TE", "short TR/TE + agent", "MPRAGE", "long TR/TE", "long TI", "intermediate", "no parameters"])
def test_guess_from_sequence_parameters(attributes: dict, expected: str | None) -> None:
    """Series named only by number ("Series 5"): the acquisition parameters decide."""
    assert guess_modality(_series("1.1", "Series 5", **attributes)) == expected


def _protocol() -> list[DicomSeries]:
    return [_series("1.2", "AX T1 SE POST GD", 2), _series("1.3", "SAG T1 SE", 3), _series("1.4", "AX T2 TSE", 4),
            _series("1.5", "AX FLAIR", 5), _series("1.1", "localizer", 1), _series("1.6", "DWI", 6)]


def test_a_clinical_protocol_is_identified_and_other_series_set_aside() -> None:
    chosen = identify_series(_study(*_protocol()))
    assert {m: s.uid for m, s in chosen.items()} == {"t1": "1.3", "t1ce": "1.2", "t2": "1.4", "flair": "1.5"}
    assert list(chosen) == ["t1", "t1ce", "t2", "flair"]


def test_a_missing_sequence_names_the_series_found_and_asks_for_a_mapping() -> None:
    series = [s for s in _protocol() if s.uid != "1.5"]
    with pytest.raises(SeriesIdentificationError) as info:
        identify_series(_study(*series))
    error = info.value
    assert (error.code, error.http_status) == ("series_unidentified", 422)
    assert error.message.startswith("cannot tell which series is which: no series looks like flair. Series found: ")
    assert "series 2 'AX T1 SE POST GD' [MR, 1 images, 1.2] -> t1ce" in error.message
    assert "series 1 'localizer' [MR, 1 images, 1.1] (ignored: localizer or non-structural sequence)" in error.message
    assert "Send a mapping {SeriesInstanceUID: modality}" in error.message
    body = error.to_dict()
    assert body["error"] == "series_unidentified"
    assert {s["series_instance_uid"]: s["guess"] for s in body["series"]}["1.3"] == "t1"
    json.dumps(body)


def test_ambiguous_series_are_listed() -> None:
    series = [*_protocol(), _series("1.7", "AX T1 POST GD", 7)]
    with pytest.raises(SeriesIdentificationError, match=r"2 series look like t1ce \(series 2 'AX T1 SE POST GD', "
                                                        r"series 7 'AX T1 POST GD'\)"):
        identify_series(_study(*series))


def test_a_mapping_resolves_what_guessing_cannot() -> None:
    series = [*_protocol(), _series("1.7", "AX T1 POST GD", 7), _series("1.8", "Series 8", 8)]
    chosen = identify_series(_study(*series), {"1.7": "t1ce", "1.8": "flair"})
    assert {m: s.uid for m, s in chosen.items()} == {"t1": "1.3", "t1ce": "1.7", "t2": "1.4", "flair": "1.8"}


@pytest.mark.parametrize("mapping, error, message", [
    ({"9.9": "t1"}, SeriesIdentificationError, "names 9.9, which is not an image series of this study"),
    ({"1.2": "pd"}, InvalidInputError, "gives 'pd' for 1.2; modalities are"),
    ({"1.2": "t1ce", "1.3": "t1ce"}, InvalidInputError, "gives t1ce to two series"),
])
def test_bad_mappings(mapping: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message) as info:
        identify_series(_study(*_protocol()), mapping)
    assert info.value.code == "bad_series_mapping"


@pytest.mark.parametrize("text, expected", [
    (None, {}), ("  ", {}), ('{"1.2": "T1CE "}', {"1.2": "t1ce"}),
])
def test_parse_mapping(text: str | None, expected: dict) -> None:
    assert parse_series_mapping(text) == expected


@pytest.mark.parametrize("text, message", [
    ("{1.2: t1ce}", "is not valid JSON"), ('["1.2"]', "must be a JSON object"), ('{"1.2": 3}', "must be a JSON object"),
])
def test_parse_bad_mapping(text: str, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message) as info:
        parse_series_mapping(text)
    assert info.value.code == "bad_series_mapping"
