"""Studies shared by the DICOM tests (written once per module into pytest's temporary folders)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.dicom.studies import StudyFiles, phantom_source, small_protocol, write_study
from tests.orthanc_server import orthanc  # noqa: F401  (fixture: a real Orthanc PACS for the session)


@pytest.fixture(scope="session")
def phantom_study(tmp_path_factory: pytest.TempPathFactory) -> StudyFiles:
    """Stands for a skull-stripped four-series brain MR study in a PACS export's folder layout: the
    clinical protocol's planes, descriptions and sequence parameters (t1ce axial, t1 sagittal, t2
    axial with its own field of view, flair oblique) on a coarse 3.6 mm x 5 mm grid, acquired from
    a synthetic phantom (content does not matter to the tests that use it: they test structure).
    Tests must not modify it: :func:`study_copy` gives a copy to damage."""
    return write_study(tmp_path_factory.mktemp("phantom_study"), phantom_source(), small_protocol())


@pytest.fixture()
def study_copy(phantom_study: StudyFiles, tmp_path: Path) -> StudyFiles:
    """A private copy of :func:`phantom_study`, for tests that break it."""
    folder = tmp_path / "study"
    shutil.copytree(phantom_study.folder, folder)

    def moved(path: Path) -> Path:
        return folder / path.relative_to(phantom_study.folder)

    return StudyFiles(folder=folder, study=phantom_study.study, series_uids=dict(phantom_study.series_uids),
                      files={m: [moved(p) for p in paths] for m, paths in phantom_study.files.items()},
                      grids=dict(phantom_study.grids))
