"""The web page in real headless Chromium, against the real gateway and classifier (subprocesses).

Checks what a user does: upload a real Kaggle glioma slice and read the result (label in words,
four accessible bars, heatmap with its toggle and opacity slider), get a plain-language error for
a text file, drive the upload with the keyboard, supply an API key when the server wants one, and
use the page at 360 px. A screenshot of the result is saved in the test's tmp folder.
"""

from __future__ import annotations

import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.bundles import make_classifier_store
from tests.paths import KAGGLE_TRAINING, needs_kaggle
from tests.servers import serve_uvicorn

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
CLASS_NAMES = ("Glioma", "Meningioma", "No tumour", "Pituitary tumour")
API_KEY = "browser-test-key"

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"Chromium not installed at {CHROMIUM} "
                                                               "(scripts/install-system-deps.sh installs it)")


def slice_png_bytes(size: int = 128) -> bytes:
    """A synthetic head-like slice, for tests that need any valid image rather than real data."""
    grey = np.zeros((size, size), np.uint8)
    cv2.ellipse(grey, (size // 2, size // 2), (size // 3, size // 2 - 10), 0, 0, 360, 160, -1)
    cv2.circle(grey, (size // 2 + 10, size // 2 - 8), size // 9, 235, -1)
    ok, encoded = cv2.imencode(".png", grey)
    assert ok
    return encoded.tobytes()


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    # Made-up validation figures: the page must show what the manifest says, whatever it is.
    metrics = {"note": "untrained test bundle", "validation": {"accuracy": 0.4321}, "validation_images": 120}
    store = make_classifier_store(tmp_path_factory.mktemp("models"), metrics=metrics)
    env = {"BRAINSCAN_MODELS": str(store), "CLASSIFIER_LOG_LEVEL": "WARNING"}
    with serve_uvicorn("services.classifier.app:app", env=env, ready_path="/readyz",
                       log_dir=tmp_path_factory.mktemp("logs")) as server:
        yield server


def _gateway(classifier, tmp_path_factory, **env):
    base = {"GATEWAY_CLASSIFIER_URL": classifier.url, "GATEWAY_SEGMENTER_URL": "", "GATEWAY_LOG_LEVEL": "WARNING"}
    return serve_uvicorn("gateway.app:app", env={**base, **env}, ready_path="/api/health",
                         log_dir=tmp_path_factory.mktemp("gateway-logs"))


@pytest.fixture(scope="module")
def gateway_url(classifier, tmp_path_factory):
    with _gateway(classifier, tmp_path_factory) as server:
        yield server.url


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="Python playwright is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser):
    """``open_page(url, width=1280)``: a fresh context (own sessionStorage) with the page loaded."""
    contexts = []

    def _open(url: str, width: int = 1280):
        context = browser.new_context(viewport={"width": width, "height": 900})
        contexts.append(context)
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        page.goto(url + "/")
        page.js_errors = errors
        return page

    yield _open
    for context in contexts:
        context.close()


def first_glioma_jpeg() -> Path:
    return sorted((KAGGLE_TRAINING / "glioma").glob("*.jpg"))[0]


# ---------------------------------------------------------------- the happy path


@needs_kaggle
def test_real_glioma_slice_shows_label_bars_and_heatmap(open_page, gateway_url, tmp_path):
    page = open_page(gateway_url)
    page.wait_for_selector("#model-select option[value='resnet50']", state="attached")
    # Record the busy state: it is usually too short to poll for.
    page.evaluate("""() => {
        window.__seen = [];
        const status = document.getElementById('status'), results = document.getElementById('results');
        new MutationObserver(() => window.__seen.push(status.textContent + '|' + results.getAttribute('aria-busy')))
            .observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true});
    }""")
    page.set_input_files("#file-input", str(first_glioma_jpeg()))
    page.wait_for_selector("#results:not([hidden])", timeout=30_000)

    assert any(entry.startswith("Analysing") and entry.endswith("|true") for entry in page.evaluate("window.__seen"))
    assert page.get_attribute("#results", "aria-busy") == "false"
    label = page.inner_text("#result-label")
    assert label in CLASS_NAMES
    assert re.fullmatch(r"\d{1,3}\.\d%", page.inner_text("#result-probability"))
    model_text = page.inner_text("#result-model")
    assert "resnet50" in model_text and "test-1" in model_text

    rows = page.locator("#probability-bars li")
    assert rows.count() == 4
    assert sorted(page.locator(".bar-label").all_inner_texts()) == sorted(CLASS_NAMES)
    values = [float(text.rstrip("%")) for text in page.locator(".bar-value").all_inner_texts()]
    assert sum(values) == pytest.approx(100, abs=0.5)
    for track in page.locator(".bar-track[role='img']").all():
        assert re.search(r": \d{1,3}\.\d%$", track.get_attribute("aria-label"))

    heatmap = page.locator("#heatmap-image")
    page.wait_for_function("document.getElementById('heatmap-image').complete")
    assert heatmap.evaluate("img => img.naturalWidth") > 0
    assert page.locator("#scan-image").evaluate("img => img.naturalWidth") > 0
    page.screenshot(path=str(tmp_path / "classification.png"), full_page=True)

    page.get_by_label("Show heatmap").uncheck()
    assert heatmap.is_hidden()
    page.get_by_label("Show heatmap").check()
    assert heatmap.is_visible()
    before = heatmap.evaluate("img => img.style.opacity")
    page.get_by_label("Heatmap opacity").focus()
    page.keyboard.press("Home")
    assert heatmap.evaluate("img => img.style.opacity") == "0" != before
    assert page.inner_text("#heatmap-opacity-value") == "0%"
    assert page.js_errors == []


# ---------------------------------------------------------------- errors, keyboard, API key


def test_text_file_shows_plain_language_alert(open_page, gateway_url):
    page = open_page(gateway_url)
    page.set_input_files("#file-input", files=[{"name": "notes.txt", "mimeType": "text/plain",
                                                "buffer": b"not an image, just some notes\n" * 10}])
    alert = page.get_by_role("alert")
    alert.get_by_text("That file is not an image we can read. Upload a JPG or PNG slice.").wait_for()
    assert "request" in alert.inner_text()  # the reference id for support
    assert page.locator("#results").is_hidden()
    assert page.inner_text("#status") == ""


def test_keyboard_reaches_the_drop_zone_and_enter_opens_the_chooser(open_page, gateway_url):
    page = open_page(gateway_url)
    # Playwright turns on file-chooser interception when the first 'filechooser' listener is
    # added, without waiting for the browser to confirm it. Listening from the start (not only
    # inside expect_file_chooser, right before the key press) means interception is in place
    # before Enter is pressed; otherwise, on a loaded machine, the chooser can open unintercepted
    # and the event never comes.
    page.on("filechooser", lambda chooser: None)
    page.wait_for_selector("#model-select option[value='resnet50']", state="attached")
    order = []
    for _ in range(8):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id || document.activeElement.textContent.trim()"))
        if order[-1] == "drop-zone":
            break
    assert "model-select" in order and order[-1] == "drop-zone", order
    assert order.index("model-select") < order.index("drop-zone")
    assert page.locator("#drop-zone").evaluate("el => getComputedStyle(el).outlineStyle") != "none"

    with page.expect_file_chooser() as chooser_info:
        page.keyboard.press("Enter")
    chooser = chooser_info.value
    assert not chooser.is_multiple()
    chooser.set_files(files=[{"name": "slice.png", "mimeType": "image/png", "buffer": slice_png_bytes()}])
    page.wait_for_selector("#results:not([hidden])", timeout=30_000)
    assert page.inner_text("#result-label") in CLASS_NAMES


def test_models_select_shows_versions_and_demo_badge(open_page, gateway_url):
    page = open_page(gateway_url)
    page.wait_for_selector("#model-select option[value='vit_cnn']", state="attached")
    options = page.locator("#model-select option").all_inner_texts()
    assert len(options) == 2 and all("version test-1" in text and "(demo)" in text for text in options)
    assert page.input_value("#model-select") == "resnet50"
    assert page.locator("#model-badge").is_visible()
    assert "Validation accuracy 43.2 % on 120 images held out" in page.inner_text("#model-info")
    page.select_option("#model-select", "vit_cnn")
    assert "vit_cnn" in page.inner_text("#model-info")


def test_api_key_is_asked_for_kept_in_session_storage_and_sent(open_page, classifier, tmp_path_factory):
    with _gateway(classifier, tmp_path_factory, GATEWAY_API_KEYS=API_KEY) as server:
        page = open_page(server.url)
        page.get_by_role("alert").get_by_text("API key").wait_for()
        page.get_by_label("API key").fill(API_KEY)
        page.get_by_role("button", name="Use this key").click()
        page.wait_for_selector("#model-select option[value='resnet50']", state="attached")
        assert page.evaluate("sessionStorage.getItem('brainscan.apiKey')") == API_KEY
        assert page.inner_text("#error") == ""
        with page.expect_response(re.compile(r"/api/v1/classifications")) as response_info:
            page.set_input_files("#file-input", files=[{"name": "s.png", "mimeType": "image/png",
                                                        "buffer": slice_png_bytes()}])
        assert response_info.value.request.headers.get("x-api-key") == API_KEY
        assert response_info.value.status == 200
        page.wait_for_selector("#results:not([hidden])")


# ---------------------------------------------------------------- notice, small screens, contrast

CONTRAST_SCRIPT = """(selectors) => {
    const rgb = (s) => s.match(/[\\d.]+/g).map(Number);
    const lum = ([r, g, b]) => {
        const c = [r, g, b].map((v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
        return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2];
    };
    const background = (el) => {
        for (; el; el = el.parentElement) {
            const c = rgb(getComputedStyle(el).backgroundColor);
            if (c.length < 4 || c[3] > 0) return c.slice(0, 3);
        }
        return [255, 255, 255];
    };
    return selectors.map((sel) => {
        const el = document.querySelector(sel);
        const [a, b] = [lum(rgb(getComputedStyle(el).color)), lum(background(el))];
        return [sel, (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05)];
    });
}"""


@pytest.mark.parametrize("width", [360, 1280])
def test_notice_layout_and_contrast(open_page, gateway_url, width):
    page = open_page(gateway_url, width=width)
    notice = page.get_by_text("Research software — not for clinical use")
    assert notice.is_visible()
    assert page.locator("#drop-zone").is_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    page.wait_for_selector("#model-select option[value='resnet50']", state="attached")
    panel = page.locator("#classification").bounding_box()
    for control in ("#model-select", "#drop-zone"):
        box = page.locator(control).bounding_box()
        assert box["x"] + box["width"] <= panel["x"] + panel["width"], f"{control} sticks out of the panel"
    selectors = ["#clinical-notice", ".lead", ".drop-title", ".drop-sub", "#drop-hint", "label[for=model-select]",
                 ".tabs a", ".site-footer p", "#model-badge"]
    for selector, ratio in page.evaluate(CONTRAST_SCRIPT, selectors):
        assert ratio >= 4.5, f"{selector}: contrast {ratio:.2f}"
