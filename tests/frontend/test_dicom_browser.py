"""The segmentation tab's "DICOM study (zip)" choice in real headless Chromium, against the full stack.

The stack, the gateway, the browser and the page are test_segmentation_browser.py's fixtures
(Redis, segmenter API, a Celery worker with the tiny seeded U-Net, the gateway); the study is
tests/dicom/studies.py's phantom study on its small protocol, zipped. A good study ends with the
DICOM SEG link (a Part 10 file), the mask link and the 3-plane viewer on the T1ce grid; a zip
without DICOM images is refused at upload and the page shows the API's explanation.
"""

from __future__ import annotations

import io
import zipfile

import pydicom
import pytest

from tests.dicom.studies import StudyFiles, phantom_source, small_protocol, write_study, zip_folder
from tests.frontend.test_segmentation_browser import (  # noqa: F401  (fixtures used by name)
    JOB_TIMEOUT_MS,
    browser,
    gateway_url,
    job_of,
    niivue,
    non_black_fraction,
    open_segmentation,
    pytestmark,
    stack,
    wait_for_viewer,
)

# Reading the study and registering the series to T1ce comes before the inference of a NIfTI job.
DICOM_JOB_TIMEOUT_MS = 4 * JOB_TIMEOUT_MS


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> StudyFiles:
    return write_study(tmp_path_factory.mktemp("phantom-study"), phantom_source(), small_protocol())


def choose_dicom(page, payload) -> None:
    """Pick the DICOM source and put ``payload`` (a path or a Playwright file payload) in its input."""
    page.check("#seg-source-dicom")
    assert page.locator("#seg-dicom-group").is_visible() and page.locator("#seg-files-group").is_hidden()
    page.set_input_files("#seg-file-dicom", payload)


@pytest.mark.slow
def test_a_dicom_study_gives_the_seg_download_and_the_viewer(open_segmentation, study, tmp_path):
    page = open_segmentation()
    archive = zip_folder(study.folder, tmp_path / "study.zip")
    choose_dicom(page, str(archive))
    assert page.inner_text("#seg-selection") == "Chosen: study.zip."
    page.click("#seg-submit")
    page.wait_for_selector("#seg-results:not([hidden])", timeout=DICOM_JOB_TIMEOUT_MS)
    assert page.inner_text("#seg-status").startswith("Done")

    job = job_of(page)
    assert job["status"] == "succeeded" and job["input"]["source"] == "dicom"
    seg_link = page.get_by_role("link", name="Download the DICOM SEG")
    assert seg_link.is_visible()
    assert seg_link.get_attribute("href") == job["result"]["seg_url"]
    fetched = page.request.get(page.url.split("#")[0].rstrip("/") + job["result"]["seg_url"])
    assert fetched.ok, fetched.text()
    assert fetched.body()[128:132] == b"DICM"
    with page.expect_download() as download_info:
        seg_link.click()
    saved = tmp_path / "seg.dcm"
    download_info.value.save_as(saved)
    seg = pydicom.dcmread(saved)
    assert seg.Modality == "SEG"
    assert {item.SeriesInstanceUID for item in seg.ReferencedSeriesSequence} == {study.series_uids["t1ce"]}
    assert page.get_attribute("#seg-download", "href") == job["result"]["mask_url"]

    # The viewer shows the volumes the worker wrote on the T1ce grid, with the mask.
    wait_for_viewer(page)
    canvas = page.locator("#seg-canvas")
    assert canvas.is_visible()
    lit, coloured = non_black_fraction(canvas.screenshot(path=str(tmp_path / "viewer-dicom.png")))
    assert lit > 0.05, f"the canvas is nearly blank ({lit:.1%} lit)"
    if job["result"]["volumes_ml"]["WT"] > 0:
        assert coloured > 0.001, f"no overlay colour in the canvas ({coloured:.2%})"
    axial = page.locator("#seg-slice-axial")
    assert int(axial.get_attribute("max")) == job["input"]["shape"][2] - 1
    page.check("#seg-show-t1ce")
    wait_for_viewer(page, "T1ce")
    page.screenshot(path=str(tmp_path / "dicom-page.png"), full_page=True)
    assert page.js_errors == []


def test_a_zip_without_dicom_images_shows_the_apis_explanation(open_segmentation, stack):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("notes/readme.txt", "notes, not a scan\n" * 30)
    page = open_segmentation()
    choose_dicom(page, {"name": "notes.zip", "mimeType": "application/zip", "buffer": buffer.getvalue()})
    with page.expect_response(lambda r: r.request.method == "POST") as posted:
        page.click("#seg-submit")
    refused = posted.value
    body = refused.json()
    assert refused.status >= 400 and body["error"] == "no_dicom_images", body
    alert = page.get_by_role("alert").filter(has_text=body["detail"])
    alert.wait_for(timeout=30_000)
    assert f"request {body['request_id']}" in alert.inner_text()
    # a refused upload is the user's to fix, not a server failure
    assert "The server refused this upload" in alert.inner_text()
    assert "failed on the server" not in alert.inner_text()
    assert page.locator("#seg-results").is_hidden() and page.locator("#seg-download-seg-row").is_hidden()
    assert page.is_enabled("#seg-submit")
