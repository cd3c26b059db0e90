// brainscan web page: the tabs, and classification of one 2D MRI slice through the gateway's /api/v1.
// The "Segmentation (3D)" tab lives in segmentation.js (and its viewer in viewer.js).
//
// Layout of this module:
//   1. constants (class names, plain-language error messages)
//   2. api: shared fetch wrapper (api.js) and the classification calls
//   3. render functions (models, busy state, errors, results)
//   4. event wiring (tabs, drop zone, file picker, heatmap controls, API key)
// No build step: the page is served as-is by the gateway; its one dependency (NiiVue, for the 3D
// viewer) is loaded only when the segmentation viewer opens.

import { ERROR_BY_STATUS, apiFetch, storeApiKey, storedApiKey } from "./api.js";
import { initSegmentation } from "./segmentation.js";

// ---------------------------------------------------------------- 1. constants

/** Class names in words, in the order the bars are drawn. Keys are the API's labels. */
const CLASS_NAMES = {
  glioma: "Glioma",
  meningioma: "Meningioma",
  notumor: "No tumour",
  pituitary: "Pituitary tumour",
};

/** Plain-language messages for the API's error codes (the server's detail is kept as a hint). */
const ERROR_MESSAGES = {
  unsupported_format: "That file is not an image we can read. Upload a JPG or PNG slice.",
  unsupported_media_type: "That file is not an image we can read. Upload a JPG or PNG slice.",
  too_large: "That file is too large. Upload a single JPG or PNG slice under 20 MB.",
  corrupt_file: "That image file is damaged or incomplete. Export the slice again and upload the new file.",
  empty_input: "That file is empty. Choose the image file again.",
  bad_dimensions: "That image has an unusual size or shape. Upload a normal MRI slice (at least 16 pixels on each side).",
  service_unavailable: "The classifier is not running right now. Try again in a minute.",
  upstream_timeout: "The classifier took too long to answer. Try again in a minute.",
  bad_gateway: "The classifier sent an answer we could not read. Try again; if it keeps happening, tell the operator.",
  unauthorized: "This server needs an API key. Enter it below, then upload the slice again.",
  too_many_requests: "Too many wrong API keys were sent from your address. Wait a minute, check the key, then try again.",
  unknown_model: "That model is not available any more. Reload the page to see the current models.",
  model_unavailable: "That model is not loaded on the server right now. Choose another model, or try again later.",
  invalid_request: "The upload did not arrive as an image file. Choose the file again.",
  network_error: "Cannot reach the server. Check your connection and try again.",
};

// ---------------------------------------------------------------- 2. api

const api = {
  listModels: () => apiFetch("api/v1/models"),
  classify(file, model) {
    const form = new FormData();
    form.append("file", file, file.name || "slice");
    const query = model ? `?model=${encodeURIComponent(model)}` : "";
    return apiFetch(`api/v1/classifications${query}`, { method: "POST", body: form });
  },
};

/** The sentence to show a person for an ApiError. */
function messageFor(error) {
  if (error.code === "unauthorized" && storedApiKey()) {
    return "That API key was not accepted. Check it, enter it again below, and retry.";
  }
  if (ERROR_MESSAGES[error.code]) return ERROR_MESSAGES[error.code];
  if (error.status === 404) return "That model is not available any more. Reload the page to see the current models.";
  const code = ERROR_BY_STATUS[error.status];
  if (code) return ERROR_MESSAGES[code];
  return "Something went wrong on the server. Try again; if it keeps happening, tell the operator.";
}

// ---------------------------------------------------------------- 3. render

const $ = (id) => document.getElementById(id);
const el = {
  modelSelect: $("model-select"), modelBadge: $("model-badge"), modelInfo: $("model-info"),
  apiKeyField: $("api-key-field"), apiKeyInput: $("api-key-input"), apiKeySave: $("api-key-save"),
  fileInput: $("file-input"), dropZone: $("drop-zone"), status: $("status"), error: $("error"),
  results: $("results"), label: $("result-label"), probability: $("result-probability"),
  model: $("result-model"), demoWarning: $("demo-warning"), bars: $("probability-bars"),
  scanImage: $("scan-image"), heatmapImage: $("heatmap-image"), heatmapCaption: $("heatmap-caption"),
  heatmapToggle: $("heatmap-toggle"), opacity: $("heatmap-opacity"), opacityValue: $("heatmap-opacity-value"),
  timings: $("timings"),
};
const state = { models: new Map(), busy: false };

const percent = (p) => `${(100 * p).toFixed(1)}%`;
const className = (label) => CLASS_NAMES[label] || label;

function renderModels(catalogue) {
  state.models = new Map(catalogue.models.map((m) => [m.name, m]));
  el.modelSelect.replaceChildren(...catalogue.models.map((m) => {
    const option = document.createElement("option");
    option.value = m.name;
    option.textContent = `${m.name} — version ${m.version}${m.demo ? " (demo)" : ""}`;
    option.selected = m.name === catalogue.default;
    return option;
  }));
  renderSelectedModel();
}

function validationText(metrics) {
  const validation = metrics && metrics.validation;
  if (!validation || typeof validation.accuracy !== "number") return "";
  const images = Number.isInteger(metrics.validation_images) ? ` on ${metrics.validation_images} images` : "";
  return ` Validation accuracy ${(validation.accuracy * 100).toFixed(1)} %${images} held out from its training data` +
    " (not an independent test set).";
}

function renderSelectedModel() {
  const model = state.models.get(el.modelSelect.value);
  el.modelBadge.hidden = !(model && model.demo);
  el.modelInfo.textContent = model
    ? `Architecture ${model.arch}, version ${model.version}${model.demo ? ": a demo model, not trained for real use." : "."}` +
      validationText(model.metrics)
    : "";
}

function renderBusy(busy) {
  state.busy = busy;
  el.results.setAttribute("aria-busy", String(busy));
  el.dropZone.setAttribute("aria-disabled", String(busy));
  el.dropZone.classList.toggle("is-busy", busy);
  el.status.textContent = busy ? "Analysing…" : "";
}

function renderError(error) {
  el.error.replaceChildren();
  if (!error) return;
  const message = document.createElement("p");
  message.textContent = messageFor(error);
  el.error.append(message);
  if (error.requestId && error.code !== "network_error") {
    const reference = document.createElement("p");
    reference.className = "reference";
    reference.textContent = `Reference for support: request ${error.requestId}`;
    el.error.append(reference);
  }
  if (error.code === "unauthorized") showApiKeyField();
}

function renderBars(probabilities, predicted) {
  const labels = [...Object.keys(CLASS_NAMES), ...Object.keys(probabilities).filter((k) => !(k in CLASS_NAMES))]
    .filter((k) => k in probabilities);
  el.bars.replaceChildren(...labels.map((label) => {
    const value = Number(probabilities[label]);
    const row = document.createElement("li");
    row.className = "bar-row" + (label === predicted ? " is-predicted" : "");
    const name = document.createElement("span");
    name.className = "bar-label";
    name.textContent = className(label);
    const track = document.createElement("div");
    track.className = "bar-track";
    track.setAttribute("role", "img");
    track.setAttribute("aria-label", `${className(label)}: ${percent(value)}`);
    const fill = document.createElement("div");
    fill.className = "bar-fill";
    fill.style.width = `${Math.max(0, Math.min(100, 100 * value))}%`;
    track.append(fill);
    const number = document.createElement("span");
    number.className = "bar-value";
    number.textContent = percent(value);
    row.append(name, track, number);
    return row;
  }));
}

function renderHeatmap(heatmap) {
  const figure = el.scanImage.closest("figure");
  figure.hidden = !heatmap;
  if (!heatmap) return;
  el.scanImage.src = heatmap.image_png;
  el.heatmapImage.src = heatmap.overlay_png;
  el.heatmapCaption.textContent = `Heatmap method: ${heatmap.method}. It shows the regions that argued for the predicted class, not an outline of a tumour.`;
  applyHeatmapControls();
}

function renderTimings(timings) {
  const names = { decode_ms: "Decoding", queue_ms: "Waiting in queue", inference_ms: "Model", explain_ms: "Heatmap", total_ms: "Total" };
  el.timings.replaceChildren(...Object.entries(timings || {}).flatMap(([key, ms]) => {
    const term = document.createElement("dt");
    term.textContent = names[key] || key;
    const value = document.createElement("dd");
    value.textContent = `${Number(ms).toFixed(0)} ms`;
    return [term, value];
  }));
}

function renderResult(result) {
  el.label.textContent = className(result.label);
  el.probability.textContent = percent(result.probabilities[result.label]);
  const model = result.model || {};
  el.model.textContent = `Model: ${model.name} (architecture ${model.arch}), version ${model.version}.`;
  el.demoWarning.hidden = !model.demo;
  renderBars(result.probabilities, result.label);
  renderHeatmap(result.heatmap);
  renderTimings(result.timings);
  el.results.hidden = false;
}

function applyHeatmapControls() {
  el.heatmapImage.hidden = !el.heatmapToggle.checked;
  el.heatmapImage.style.opacity = String(Number(el.opacity.value) / 100);
  el.opacityValue.textContent = `${el.opacity.value}%`;
  el.opacity.disabled = !el.heatmapToggle.checked;
}

function showApiKeyField() {
  el.apiKeyField.hidden = false;
  el.apiKeyInput.value = storedApiKey();
}

// ---------------------------------------------------------------- 4. events

async function loadModels() {
  try {
    renderModels(await api.listModels());
    renderError(null);
  } catch (error) {
    el.modelSelect.replaceChildren(new Option("Server default", ""));
    renderSelectedModel();
    renderError(error);
  }
}

async function classifyFile(file) {
  if (!file || state.busy) return;
  renderError(null);
  renderBusy(true);
  let result = null;
  let failure = null;
  try {
    result = await api.classify(file, el.modelSelect.value);
  } catch (error) {
    failure = error;
  }
  renderBusy(false);
  if (failure) {
    el.results.hidden = true;  // an old result next to a new error would be misread
    renderError(failure);
    return;
  }
  renderResult(result);
  el.status.textContent = `Done: ${el.label.textContent}, ${el.probability.textContent}.`;
}

function wireEvents() {
  el.dropZone.addEventListener("click", () => {
    if (!state.busy) el.fileInput.click();
  });
  el.fileInput.addEventListener("change", () => {
    classifyFile(el.fileInput.files[0]);
    el.fileInput.value = "";  // choosing the same file again must trigger a new analysis
  });
  for (const type of ["dragenter", "dragover"]) {
    el.dropZone.addEventListener(type, (event) => {
      event.preventDefault();
      el.dropZone.classList.add("is-dragover");
    });
  }
  for (const type of ["dragleave", "drop"]) {
    el.dropZone.addEventListener(type, () => el.dropZone.classList.remove("is-dragover"));
  }
  el.dropZone.addEventListener("drop", (event) => {
    event.preventDefault();
    classifyFile(event.dataTransfer && event.dataTransfer.files[0]);
  });
  // A file dropped next to the zone must not make the browser navigate away to it.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());

  el.modelSelect.addEventListener("change", renderSelectedModel);
  el.heatmapToggle.addEventListener("change", applyHeatmapControls);
  el.opacity.addEventListener("input", applyHeatmapControls);
  el.apiKeySave.addEventListener("click", () => {
    storeApiKey(el.apiKeyInput.value.trim());
    loadModels();
    segmentation.reloadModels();
  });
}

// ---------------------------------------------------------------- tabs

const tabs = Array.from(document.querySelectorAll('[role="tab"]'));

/** Show the tab's panel, hide the others; moves focus to the tab when asked (keyboard use). */
function selectTab(tab, { focus = false } = {}) {
  for (const other of tabs) {
    const selected = other === tab;
    other.setAttribute("aria-selected", String(selected));
    other.tabIndex = selected ? 0 : -1;
    document.getElementById(other.getAttribute("aria-controls")).hidden = !selected;
  }
  if (focus) tab.focus();
  history.replaceState(null, "", `#${tab.getAttribute("aria-controls")}`);
  if (tab.id === "tab-segmentation") segmentation.activate();
}

function wireTabs() {
  for (const tab of tabs) {
    tab.addEventListener("click", (event) => {
      event.preventDefault();
      selectTab(tab);
    });
    tab.addEventListener("keydown", (event) => {
      const index = tabs.indexOf(tab);
      const target = {
        ArrowRight: tabs[(index + 1) % tabs.length],
        ArrowLeft: tabs[(index - 1 + tabs.length) % tabs.length],
        Home: tabs[0],
        End: tabs[tabs.length - 1],
      }[event.key];
      if (!target) return;
      event.preventDefault();
      selectTab(target, { focus: true });
    });
  }
  const fromHash = tabs.find((tab) => `#${tab.getAttribute("aria-controls")}` === location.hash);
  if (fromHash) selectTab(fromHash);
}

const segmentation = initSegmentation({ onUnauthorized: showApiKeyField });
wireTabs();
wireEvents();
applyHeatmapControls();
if (storedApiKey()) showApiKeyField();
loadModels();
