"""The segmentation tab's "DICOM study" choice (a zip, or a folder the page zips) in real headless
Chromium, against the full stack.

The stack, the gateway, the browser and the page are test_segmentation_browser.py's fixtures
(Redis, segmenter API, a Celery worker with the tiny seeded U-Net, the gateway); the study is
tests/dicom/studies.py's phantom study on its small protocol, zipped. A good study ends with the
DICOM SEG link (a Part 10 file), the mask link and the 3-plane viewer on the T1ce grid; a zip
without DICOM images is refused at upload and the page shows the API's explanation. A study folder
is packed in the page by frontend/zip.js (stored entries) and sent as the same ``dicom`` field; a zip
that module writes is checked here with Python's zipfile, and a folder holding nothing but desktop
junk is refused in the page before any upload.
"""

from __future__ import annotations

import base64
import io
import random
import shutil
import zipfile
import zlib

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


# Chromium does not show a file-backed upload body to Playwright, so the page keeps the form's
# ``dicom`` part as XMLHttpRequest.send gets it (the request itself is sent unchanged).
KEEP_SENT_DICOM = """(() => {
  const send = XMLHttpRequest.prototype.send;
  XMLHttpRequest.prototype.send = function (body) {
    if (body instanceof FormData && body.get("dicom")) window.sentDicom = body.get("dicom");
    return send.call(this, body);
  };
})();"""
# a Blob's bytes as base64, for page.evaluate to return
BLOB_BASE64 = ("async (blob) => { let text = ''; for (const b of new Uint8Array(await blob.arrayBuffer())) "
               "text += String.fromCharCode(b); return btoa(text); }")
SENT_DICOM = f"async () => [window.sentDicom.name, window.sentDicom.type, await ({BLOB_BASE64})(window.sentDicom)]"


def choose_dicom_folder(page, folder) -> None:
    """Pick the DICOM source and choose ``folder`` in its folder picker (``webkitdirectory``)."""
    page.check("#seg-source-dicom")
    assert page.get_by_label("DICOM study folder").is_visible()
    page.set_input_files("#seg-folder-dicom", str(folder))


@pytest.mark.slow
def test_a_dicom_study_folder_is_zipped_in_the_page_and_gives_the_seg(open_segmentation, study, tmp_path):
    folder = shutil.copytree(study.folder, tmp_path / "study-folder")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1" * 8)  # desktop junk, left out of the zip
    (folder / "PATIENT" / "Thumbs.db").write_bytes(b"junk")
    study_files = sorted(p.relative_to(tmp_path).as_posix() for p in folder.rglob("*")
                         if p.is_file() and p.name not in {".DS_Store", "Thumbs.db"})
    page = open_segmentation(KEEP_SENT_DICOM)
    choose_dicom_folder(page, folder)
    assert page.inner_text("#seg-selection") == f"Chosen: folder study-folder, {len(study_files)} files."
    page.click("#seg-submit")
    page.wait_for_function("() => window.sentDicom !== undefined")
    name, kind, sent = page.evaluate(SENT_DICOM)
    assert (name, kind) == ("study-folder.zip", "application/zip")
    archive = zipfile.ZipFile(io.BytesIO(base64.b64decode(sent)))
    assert sorted(archive.namelist()) == study_files  # the folder's own layout, junk left out
    assert archive.testzip() is None and {i.compress_type for i in archive.infolist()} == {zipfile.ZIP_STORED}

    page.wait_for_selector("#seg-results:not([hidden])", timeout=DICOM_JOB_TIMEOUT_MS)
    assert page.inner_text("#seg-status").startswith("Done")
    job = job_of(page)
    assert job["status"] == "succeeded" and job["input"]["source"] == "dicom"
    seg_link = page.get_by_role("link", name="Download the DICOM SEG")
    assert seg_link.is_visible() and seg_link.get_attribute("href") == job["result"]["seg_url"]
    fetched = page.request.get(page.url.split("#")[0].rstrip("/") + job["result"]["seg_url"])
    assert fetched.ok, fetched.text()
    seg = pydicom.dcmread(io.BytesIO(fetched.body()))
    assert seg.Modality == "SEG"
    assert {item.SeriesInstanceUID for item in seg.ReferencedSeriesSequence} == {study.series_uids["t1ce"]}
    assert page.js_errors == []


def test_a_folder_of_desktop_junk_is_refused_before_upload(open_segmentation, tmp_path):
    folder = tmp_path / "empty-study"
    folder.mkdir()
    (folder / ".DS_Store").write_bytes(b"junk")
    (folder / "Thumbs.db").write_bytes(b"junk")
    page = open_segmentation()
    posts = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    choose_dicom_folder(page, folder)
    assert "holds no files to send" in page.inner_text("#seg-selection")
    page.click("#seg-submit")
    alert = page.get_by_role("alert").filter(has_text="The chosen folder holds no files to send")
    alert.wait_for(timeout=10_000)
    assert posts == [] and page.is_enabled("#seg-submit") and page.locator("#seg-progress-block").is_hidden()
    # choosing a zip afterwards replaces the folder
    page.set_input_files("#seg-file-dicom", {"name": "s.zip", "mimeType": "application/zip", "buffer": b"PK"})
    assert page.inner_text("#seg-selection") == "Chosen: s.zip."
    assert page.evaluate("document.getElementById('seg-folder-dicom').files.length") == 0
    assert page.js_errors == []


ZIP_IN_PAGE = """async (entries) => {
  const { zipFiles } = await import("./zip.js");
  const files = entries.map(([path, b64]) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const file = new File([bytes], path.split("/").pop(), { lastModified: Date.UTC(2024, 1, 15, 12, 0, 30) });
    Object.defineProperty(file, "webkitRelativePath", { value: path });
    return file;
  });
  return await (BLOB_BASE64)(await zipFiles(files));
}""".replace("BLOB_BASE64", BLOB_BASE64)


def test_zip_js_writes_a_zip_that_pythons_zipfile_reads(open_segmentation):
    rng = random.Random(7)
    entries = {
        "study/SE2/IM0001": bytes(rng.randrange(256) for _ in range(70_000)),
        "study/SE2/empty": b"",
        "study/Séries 3/1.2.840.5.dcm": b"DICM" * 1000,
        "study/../../etc/passwd": b"kept as study/etc/passwd, never outside the folder",
        "study/dup": b"first",
    }
    page = open_segmentation()
    sent = [[path, base64.b64encode(data).decode()] for path, data in entries.items()] + [["study/dup", "c2Vjb25k"]]
    written = base64.b64decode(page.evaluate(ZIP_IN_PAGE, sent))
    archive = zipfile.ZipFile(io.BytesIO(written))
    assert archive.testzip() is None  # every CRC matches
    infos = archive.infolist()
    assert [i.filename for i in infos] == ["study/SE2/IM0001", "study/SE2/empty", "study/Séries 3/1.2.840.5.dcm",
                                           "study/etc/passwd", "study/dup", "study/dup~2"]
    expected = [*entries.values(), b"second"]
    for info, data in zip(infos, expected):
        assert info.compress_type == zipfile.ZIP_STORED and info.CRC == zlib.crc32(data)
        assert archive.read(info) == data and info.file_size == len(data)
        assert info.date_time[:2] == (2024, 2)
    assert page.js_errors == []
