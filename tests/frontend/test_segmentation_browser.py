"""The "Segmentation (3D)" tab in real headless Chromium, against the full stack (subprocesses).

Redis, the segmenter API, a Celery worker (tiny seeded U-Net bundle) and the gateway run for real;
the classifier is not started (the classification tab then just reports it unavailable). A
phantom case is uploaded as four files; the test follows the progress, then checks the NiiVue
viewer draws, the legend, the volumes table against the API's JSON, the mask download, the scan
switch and the opacity slider. Also: plain-language errors, the keyboard tabs, cancelling, and
the PNG previews when WebGL2 is missing. Screenshots are saved in the test's tmp folder.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pytest

from tests.gateway.test_segmentations import PHANTOM_SHAPE, SegmentationStack, nifti_from_bytes, segmentation_stack
from tests.redis_server import needs_redis
from tests.servers import REPO_ROOT, free_port, serve_uvicorn

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
NIIVUE = REPO_ROOT / "frontend" / "vendor" / "niivue.js"
VENDOR_SCRIPT = REPO_ROOT / "scripts" / "vendor-frontend.sh"
REGION_CODES = ("WT", "TC", "ET", "NCR", "ED")
LEGEND = ("Necrotic tumour core (NCR, label 1)", "Swelling around the tumour (oedema) (ED, label 2)",
          "Enhancing tumour (ET, label 4)")
JOB_TIMEOUT_MS = 90_000
API_KEY = "segmentation-browser-key"
# The classification tab asks for its models; with no classifier that answer is a 503 by design.
EXPECTED_CONSOLE_ERRORS = re.compile(r"/api/v1/models$")

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"Chromium not installed at {CHROMIUM} "
                                                     "(scripts/install-system-deps.sh installs it)"),
    needs_redis,
]


@pytest.fixture(scope="module")
def niivue() -> Path:
    """frontend/vendor/niivue.js, put in place by scripts/vendor-frontend.sh (quick when present)."""
    result = subprocess.run([str(VENDOR_SCRIPT)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    if not NIIVUE.is_file():
        pytest.skip(f"{NIIVUE} is missing and scripts/vendor-frontend.sh could not fetch it "
                    f"(needs npm and the npm registry): {result.stderr.strip()[-500:]}")
    return NIIVUE


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[SegmentationStack]:
    if not (REPO_ROOT / "services" / "segmenter" / "app.py").is_file():
        pytest.skip("the segmenter service (services/segmenter/app.py) is not in this tree")
    with segmentation_stack(tmp_path_factory.mktemp("segmentation")) as running:
        yield running


@pytest.fixture(scope="module")
def gateway_url(stack, niivue, tmp_path_factory) -> Iterator[str]:
    env = {"GATEWAY_SEGMENTER_URL": stack.url, "GATEWAY_CLASSIFIER_URL": f"http://127.0.0.1:{free_port()}",
           "GATEWAY_LOG_LEVEL": "WARNING"}
    with serve_uvicorn("gateway.app:app", env=env, ready_path="/api/health",
                       log_dir=tmp_path_factory.mktemp("gateway-logs")) as server:
        yield server.url


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="Python playwright is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def open_segmentation(browser, gateway_url):
    """``open_segmentation(init_script=None)``: a fresh context (own session cookie) on the segmentation tab."""
    contexts = []

    def _open(init_script: str | None = None):
        context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        contexts.append(context)
        if init_script:
            context.add_init_script(init_script)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda msg: errors.append(f"{msg.text} ({msg.location.get('url')})")
                if msg.type == "error" and not EXPECTED_CONSOLE_ERRORS.search(msg.location.get("url", "")) else None)
        page.goto(gateway_url + "/#segmentation")
        page.js_errors = errors
        page.wait_for_selector("#seg-model-select option[value='unet3d']", state="attached")
        info = page.inner_text("#seg-model-info")
        # the manifest's validation figures, labelled as what they are
        assert "Validation Dice WT 0.88, TC 0.50, ET 0.25 on 4 held-out cases (not an independent test)" in info
        return page

    yield _open
    for context in contexts:
        context.close()


def choose_case(page, stack: SegmentationStack, **replace: dict) -> None:
    """Put the phantom's four files in the four inputs (``replace``: modality -> a file payload)."""
    for modality, path in stack.case_files.items():
        page.set_input_files(f"#seg-file-{modality}", replace.get(modality, str(path)))


RECORD_PROGRESS = """() => {
    window.__progress = [];
    const bar = document.getElementById('seg-progress'), stage = document.getElementById('seg-stage');
    new MutationObserver(() => window.__progress.push([bar.value, bar.getAttribute('aria-valuetext'), stage.textContent]))
        .observe(document.getElementById('seg-progress-block'), {subtree: true, childList: true, characterData: true,
                                                                 attributes: true});
}"""


def ras_voxel(voxel, image: nib.Nifti1Image) -> tuple[list[int], list[int]]:
    """``voxel`` (file axis order) as RAS+ voxel indices of ``image``'s grid (flips and transposes only),
    and the grid's size along each RAS+ axis: what NiiVue's sliders show."""
    index, size = [0, 0, 0], [0, 0, 0]
    for file_axis, (ras_axis, flip) in enumerate(nib.orientations.io_orientation(image.affine)):
        n = image.shape[file_axis]
        index[int(ras_axis)] = n - 1 - voxel[file_axis] if flip < 0 else voxel[file_axis]
        size[int(ras_axis)] = n
    return index, size


def job_of(page) -> dict:
    """The job the page shows, asked from the API with the page's own session cookie."""
    mask_url = page.get_attribute("#seg-download", "href")
    job_url = mask_url.rsplit("/files/", 1)[0]
    response = page.request.get(page.url.split("#")[0].rstrip("/") + job_url)
    assert response.ok, response.text()
    return response.json()


def non_black_fraction(png: bytes) -> tuple[float, float]:
    """(fraction of pixels that are not black, fraction that are clearly coloured, i.e. not grey)."""
    image = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR).astype(int)
    lit = image.max(axis=2) > 20
    coloured = (image.max(axis=2) - image.min(axis=2)) > 60
    return float(lit.mean()), float(coloured.mean())


# Waits are functions, not expressions: the page's CSP forbids eval, which expressions would need.
def wait_for_viewer(page, modality: str = "FLAIR") -> None:
    page.wait_for_function("(m) => document.getElementById('seg-viewer-status').textContent.startsWith('Showing ' + m)",
                           arg=modality, timeout=30_000)
    page.wait_for_timeout(300)  # one more frame after the volumes are in


# ---------------------------------------------------------------- the happy path


def test_case_upload_progress_viewer_volumes_and_download(open_segmentation, stack, tmp_path):
    page = open_segmentation()
    assert page.get_attribute("#tab-segmentation", "aria-selected") == "true"
    page.evaluate(RECORD_PROGRESS)
    choose_case(page, stack)
    assert "Still missing" not in page.inner_text("#seg-selection")
    page.click("#seg-submit")
    page.wait_for_selector("#seg-results:not([hidden])", timeout=JOB_TIMEOUT_MS)

    # Two phases, each 0-100%: the upload, then the job (queued, running, done).
    states = [(value, text) for value, text, _ in page.evaluate("window.__progress") if text]
    assert all(re.search(r"\(\d{1,3}%\)$", text) for _, text in states), states
    job_states = [(value, text) for value, text in states if not text.startswith("Uploading")]
    assert any(text.startswith(("Waiting in the queue", "Preparing", "Inference")) for _, text in job_states), states
    values = [value for value, _ in job_states]
    assert values == sorted(values), f"the job's progress went backwards: {states}"
    assert page.inner_text("#seg-status").startswith("Done")
    assert page.locator("#seg-progress-block").is_hidden()

    job = job_of(page)
    assert job["status"] == "succeeded"
    model_text = page.inner_text("#seg-model")
    assert "unet3d" in model_text and "test-1" in model_text
    # how it ran: the job's own figures, and the arithmetic the worker chose (SEGMENTER_PRECISION=auto)
    assert f"network {job['timings']['inference_s']:.1f} s" in model_text
    assert f"whole job {job['timings']['total_s']:.1f} s, in {job['result']['precision']}." in model_text
    assert job["result"]["precision"] in ("float32", "bfloat16")
    assert page.locator("#seg-demo-warning").is_visible()  # the test bundle is a demo bundle

    assert page.locator("#seg-legend li").all_inner_texts() == list(LEGEND)
    rows = {row.get_attribute("data-region"): row.locator("td.num").inner_text()
            for row in page.locator("#seg-volumes tbody tr").all()}
    assert set(rows) == set(REGION_CODES)
    for code in REGION_CODES:
        assert rows[code] == f"{job['result']['volumes_ml'][code]:.2f} mL", code
    assert page.locator("#seg-volumes tbody th").first.inner_text().startswith("Whole tumour")

    wait_for_viewer(page)
    canvas = page.locator("#seg-canvas")
    assert canvas.is_visible()
    shot = canvas.screenshot(path=str(tmp_path / "viewer-flair.png"))
    lit, coloured = non_black_fraction(shot)
    assert lit > 0.05, f"the canvas is nearly blank ({lit:.1%} lit)"
    if job["result"]["volumes_ml"]["WT"] > 0:
        assert coloured > 0.001, f"no overlay colour in the canvas ({coloured:.2%})"
    page.screenshot(path=str(tmp_path / "segmentation-page.png"), full_page=True)

    # The viewer opens at the tumour's centre (where the previews' planes cross), not the volume's middle:
    # the sliders give it in NiiVue's RAS voxel order.
    centre = job["result"]["tumour_centre"]
    if job["result"]["volumes_ml"]["WT"] > 0:
        expected, size = ras_voxel(centre["voxel"], nib.load(stack.case_files["flair"]))
        assert expected != [(n - 1) // 2 for n in size], "the tumour is at the middle: this check would prove nothing"
        shown = [page.inner_text(f"#seg-slice-{plane}-value") for plane in ("sagittal", "coronal", "axial")]
        assert shown == [f"{v + 1} of {n}" for v, n in zip(expected, size)], (shown, expected)
    else:
        assert centre is None

    # The sliders follow NiiVue's crosshair, and move it.
    axial = page.locator("#seg-slice-axial")
    assert int(axial.get_attribute("max")) == PHANTOM_SHAPE[2] - 1
    before = page.inner_text("#seg-slice-axial-value")
    axial.focus()
    page.keyboard.press("Home")
    assert page.inner_text("#seg-slice-axial-value") == f"1 of {PHANTOM_SHAPE[2]}" != before

    page.check("#seg-show-t1")
    wait_for_viewer(page, "T1")
    page.get_by_label("Outline opacity").focus()
    page.keyboard.press("End")
    assert page.inner_text("#seg-opacity-value") == "100%"

    assert page.get_attribute("#seg-download", "href") == job["result"]["mask_url"]
    with page.expect_download() as download_info:
        page.click("#seg-download")
    saved = tmp_path / "mask.nii.gz"
    download_info.value.save_as(saved)
    mask = nifti_from_bytes(saved.read_bytes())
    reference = nib.load(stack.case_files["flair"])
    assert mask.shape == reference.shape == PHANTOM_SHAPE
    np.testing.assert_allclose(mask.affine, reference.affine, atol=1e-4)
    assert page.js_errors == []


# ---------------------------------------------------------------- errors, keyboard, cancel, fallback


@pytest.mark.parametrize(("replace", "message"), [
    ({"t1": {"name": "t1.nii.gz", "mimeType": "text/plain", "buffer": b"notes, not a scan\n" * 30}},
     "A file is not a scan we can read."),
    ({"flair": []}, "The case needs all four scans: T1, T1ce, T2 and FLAIR."),
])
def test_bad_case_shows_a_plain_language_alert(open_segmentation, stack, replace, message):
    page = open_segmentation()
    choose_case(page, stack, **replace)
    page.click("#seg-submit")
    alert = page.get_by_role("alert").filter(has_text=message)
    alert.wait_for(timeout=30_000)
    if "flair" in replace:
        assert "Missing: FLAIR" in alert.inner_text()  # decided in the page, before any upload
    else:
        assert "request" in alert.inner_text()  # the reference id for support
    assert page.locator("#seg-results").is_hidden()
    assert page.is_enabled("#seg-submit")


def test_an_ensembles_figure_is_called_cross_validation(open_segmentation):
    """The model line names what the Dice is: one run's held-out cases, or a cross-validation pooled over all
    cases for an ensemble of its folds (the manifest of `brainscan train ensemble`)."""
    page = open_segmentation()
    texts = page.evaluate("""async () => {
        const { validationDiceText } = await import("./segmentation-text.js");
        const dice = { WT: 0.8512, TC: 0.75, ET: 0.6 };
        return [validationDiceText({ dice, validation_cases: 19, cross_validation: { folds: 5 } }),
                validationDiceText({ dice, validation_cases: 4 }), validationDiceText({ dice: { WT: 0.9 } })];
    }""")
    assert texts == [
        " Cross-validation Dice WT 0.85, TC 0.75, ET 0.60 over 19 cases, each scored by the fold network that did "
        "not train on it (not an independent test).",
        " Validation Dice WT 0.85, TC 0.75, ET 0.60 on 4 held-out cases (not an independent test).", ""]


def test_the_run_line_says_what_it_knows(open_segmentation):
    page = open_segmentation()
    texts = page.evaluate("""async () => {
        const { runText } = await import("./segmentation-text.js");
        return [runText({ timings: { inference_s: 3.74, total_s: 4.96 }, result: { precision: "bfloat16" } }),
                runText({ timings: { inference_s: 12 }, result: {} }), runText({ timings: {} }), runText(null)];
    }""")
    assert texts == [" Ran: network 3.7 s, whole job 5.0 s, in bfloat16.", " Ran: network 12.0 s.", "", ""]


def test_tabs_work_with_the_keyboard(open_segmentation):
    page = open_segmentation()
    page.focus("#tab-segmentation")
    page.keyboard.press("ArrowLeft")
    assert page.evaluate("document.activeElement.id") == "tab-classification"
    assert page.get_attribute("#tab-classification", "aria-selected") == "true"
    assert page.locator("#classification").is_visible() and page.locator("#segmentation").is_hidden()
    page.keyboard.press("End")
    assert page.get_attribute("#tab-segmentation", "aria-selected") == "true"
    assert page.get_attribute("#tab-classification", "tabindex") == "-1"
    assert page.locator("#segmentation").is_visible()
    assert page.get_by_role("tabpanel").count() == 1
    page.keyboard.press("Tab")  # Tab leaves the tab list for the panel
    assert page.evaluate("document.activeElement.closest('[role=tabpanel]').id") == "segmentation"


def test_cancel_stops_following_the_job(open_segmentation, stack):
    page = open_segmentation()
    choose_case(page, stack)
    page.click("#seg-submit")
    page.wait_for_function("() => { const text = document.getElementById('seg-status').textContent;"
                           " return text === 'Segmentation started.' || text.startsWith('Done'); }", timeout=30_000)
    if page.locator("#seg-cancel").is_hidden():
        pytest.skip("the job finished before it could be cancelled (a very fast worker)")
    with page.expect_response(lambda r: r.request.method == "DELETE") as deleted:
        page.click("#seg-cancel")
    assert deleted.value.status in (200, 204)
    page.get_by_text("The segmentation was cancelled.").wait_for()
    assert page.locator("#seg-cancel").is_hidden() and page.is_enabled("#seg-submit")
    page.wait_for_timeout(3500)  # longer than the slowest poll: no result may appear afterwards
    assert page.locator("#seg-results").is_hidden()


NO_WEBGL2 = """(() => {
    const original = HTMLCanvasElement.prototype.getContext;
    HTMLCanvasElement.prototype.getContext = function (kind, ...rest) {
        return kind === 'webgl2' ? null : original.call(this, kind, ...rest);
    };
})();"""


def test_without_webgl2_the_previews_are_shown(open_segmentation, stack, tmp_path):
    page = open_segmentation(init_script=NO_WEBGL2)
    choose_case(page, stack)
    page.click("#seg-submit")
    page.wait_for_selector("#seg-previews:not([hidden])", timeout=JOB_TIMEOUT_MS)
    assert page.locator("#seg-viewer").is_hidden()
    assert "WebGL2" in page.inner_text("#seg-viewer-status")
    for plane in ("axial", "coronal", "sagittal"):
        page.wait_for_function("(id) => document.getElementById(id).naturalWidth > 0", arg=f"seg-preview-{plane}")
    page.screenshot(path=str(tmp_path / "previews.png"), full_page=True)
    assert page.js_errors == []


def test_case_folder_is_mapped_by_file_name(open_segmentation, stack):
    page = open_segmentation()
    case_folder = stack.case_files["flair"].parent  # also holds the reference segmentation (_seg), ignored
    page.set_input_files("#seg-folder", str(case_folder))
    selection = page.inner_text("#seg-selection")
    for name, path in (("T1", "t1"), ("T1ce", "t1ce"), ("T2", "t2"), ("FLAIR", "flair")):
        assert f"{name}: {case_folder.name}_{path}.nii.gz" in selection, selection
    assert "seg" not in selection.replace("seg-", "") and "Still missing" not in selection
    # The selection text is drawn from the same mapping the form is built from; the server then
    # accepts the four parts (it refuses a case with a modality missing).
    page.click("#seg-submit")
    page.wait_for_selector("#seg-results:not([hidden])", timeout=JOB_TIMEOUT_MS)
    assert job_of(page)["status"] == "succeeded"


def test_with_an_api_key_every_call_carries_it(browser, stack, tmp_path, tmp_path_factory):
    env = {"GATEWAY_SEGMENTER_URL": stack.url, "GATEWAY_CLASSIFIER_URL": f"http://127.0.0.1:{free_port()}",
           "GATEWAY_API_KEYS": API_KEY, "GATEWAY_LOG_LEVEL": "WARNING"}
    with serve_uvicorn("gateway.app:app", env=env, ready_path="/api/health",
                       log_dir=tmp_path_factory.mktemp("keyed-gateway-logs")) as server:
        context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        try:
            page = context.new_page()
            api_calls = []
            page.on("request", lambda r: api_calls.append(r) if "/api/v1/" in r.url else None)
            page.goto(server.url + "/#segmentation")
            page.get_by_label("API key").fill(API_KEY)
            before_key = len(api_calls)
            page.get_by_role("button", name="Use this key").click()
            page.wait_for_selector("#seg-model-select option[value='unet3d']", state="attached")
            choose_case(page, stack)
            page.click("#seg-submit")
            page.wait_for_selector("#seg-results:not([hidden])", timeout=JOB_TIMEOUT_MS)
            wait_for_viewer(page)
            with page.expect_download() as download_info:
                page.click("#seg-download")
            download_info.value.save_as(tmp_path / "mask.nii.gz")
            assert nifti_from_bytes((tmp_path / "mask.nii.gz").read_bytes()).shape == PHANTOM_SHAPE
        finally:
            context.close()
    after_key = [r for r in api_calls[before_key:] if "segmentation" in r.url]
    assert {"POST", "GET"} <= {r.method for r in after_key}
    assert any("/files/" in r.url for r in after_key)  # the viewer's and the download's fetches
    missing = [f"{r.method} {r.url}" for r in after_key if r.headers.get("x-api-key") != API_KEY]
    assert not missing, missing
