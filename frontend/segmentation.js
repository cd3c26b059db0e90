// The "Segmentation (3D)" tab: choose a case (four files, a case folder, a zip, a 4D NIfTI, or a
// DICOM study as a zip or a folder that zip.js packs into one), start a job, follow its progress
// (polling with backoff, cancel), then show the result: the viewer (viewer.js), the legend, the
// volumes in mL, the model and the mask download.

import { ApiError, apiFetch, apiFetchBytes, storedApiKey, uploadForm } from "./api.js";
import { MASK_LABELS, MODALITY_NAMES, SegmentationViewer } from "./viewer.js";
import { ZipLimitError, chosenFolder, zipFolder } from "./zip.js";
import {
  ERROR_MESSAGES, MODALITIES, POLL_FIRST_MS, POLL_GROWTH, POLL_MAX_MS, REGIONS, filesByModality, formatMl, messageFor, sleep,
  runText, stageText, validationDiceText,
} from "./segmentation-text.js";

export { filesByModality };

export function initSegmentation({ onUnauthorized }) {
  const $ = (id) => document.getElementById(id);
  const el = {
    form: $("seg-form"), modelSelect: $("seg-model-select"), modelBadge: $("seg-model-badge"),
    modelInfo: $("seg-model-info"), submit: $("seg-submit"), cancel: $("seg-cancel"),
    selection: $("seg-selection"), folder: $("seg-folder"), zip: $("seg-file-zip"), fourD: $("seg-file-4d"),
    dicom: $("seg-file-dicom"), dicomFolder: $("seg-folder-dicom"),
    groups: { files: $("seg-files-group"), zip: $("seg-zip-group"), "4d": $("seg-4d-group"),
      dicom: $("seg-dicom-group") },
    progressBlock: $("seg-progress-block"), progress: $("seg-progress"), progressLabel: $("seg-progress-label"),
    stage: $("seg-stage"),
    status: $("seg-status"), error: $("seg-error"), results: $("seg-results"), model: $("seg-model"),
    demoWarning: $("seg-demo-warning"), legend: $("seg-legend"), volumes: document.querySelector("#seg-volumes tbody"),
    download: $("seg-download"), opacity: $("seg-opacity"), opacityValue: $("seg-opacity-value"),
  };
  const fileInputs = Object.fromEntries(MODALITIES.map((m) => [m, $(`seg-file-${m}`)]));
  const viewer = new SegmentationViewer({
    container: $("seg-viewer"), canvas: $("seg-canvas"), previews: $("seg-previews"), status: $("seg-viewer-status"),
    sliders: ["sagittal", "coronal", "axial"].map((p) => $(`seg-slice-${p}`)),
    outputs: ["sagittal", "coronal", "axial"].map((p) => $(`seg-slice-${p}-value`)),
    previewImages: { axial: $("seg-preview-axial"), coronal: $("seg-preview-coronal"), sagittal: $("seg-preview-sagittal") },
  });
  const state = { folderFiles: {}, dicomFiles: null, run: null, job: null, models: new Map() };

  const source = () => el.form.querySelector("input[name=seg-source]:checked").value;
  const shownModality = () => document.querySelector("input[name=seg-show]:checked").value;

  /** The four files chosen, one input each, or from the folder picker for the ones left empty. */
  function chosenFiles() {
    const files = {};
    for (const m of MODALITIES) {
      const file = fileInputs[m].files[0] || state.folderFiles[m];
      if (file) files[m] = file;
    }
    return files;
  }

  function describeSelection() {
    if (source() === "dicom" && state.dicomFiles) {
      const { folder, files } = state.dicomFiles;
      el.selection.textContent = files.length ? `Chosen: folder ${folder}, ${files.length} files.`
        : `${folder ? `The folder ${folder}` : "That folder"} holds no files to send (.DS_Store and the like are left out).`;
      return;
    }
    if (source() !== "files") {
      const input = { zip: el.zip, "4d": el.fourD, dicom: el.dicom }[source()];
      el.selection.textContent = input.files[0] ? `Chosen: ${input.files[0].name}.` : "";
      return;
    }
    const files = chosenFiles();
    const chosen = MODALITIES.filter((m) => files[m]).map((m) => `${MODALITY_NAMES[m]}: ${files[m].name}`);
    const missing = MODALITIES.filter((m) => !files[m]).map((m) => MODALITY_NAMES[m]);
    el.selection.textContent = chosen.length
      ? `${chosen.join("; ")}.${missing.length ? ` Still missing: ${missing.join(", ")}.` : ""}`
      : "";
  }

  /** The multipart form for the chosen source (a DICOM folder packed into one zip), or an ApiError. */
  async function buildForm() {
    const form = new FormData();
    if (source() === "dicom" && state.dicomFiles) {
      if (!state.dicomFiles.files.length) throw new ApiError(0, "empty_folder", "no files in the folder");
      const onProgress = (done, total) => { el.status.textContent = `Packing the folder into a zip: ${done} of ${total} files…`; };
      const archive = await zipFolder(state.dicomFiles, { onProgress }).catch((error) => {
        if (error instanceof ZipLimitError) throw new ApiError(0, "too_large", error.message);
        throw new ApiError(0, "corrupt_file", `a file of the folder could not be read: ${error.message}`);
      });
      form.append("dicom", archive, archive.name);
      return form;
    }
    const single = { zip: [el.zip, "case"], "4d": [el.fourD, "volume"], dicom: [el.dicom, "dicom"] }[source()];
    if (single) {
      const [input, field] = single;
      if (!input.files[0]) throw new ApiError(0, "missing_modality", "no file chosen");
      form.append(field, input.files[0], input.files[0].name);
      return form;
    }
    const files = chosenFiles();
    const missing = MODALITIES.filter((m) => !files[m]);
    if (missing.length) {
      throw new ApiError(0, "missing_modality", `Missing: ${missing.map((m) => MODALITY_NAMES[m]).join(", ")}.`);
    }
    for (const m of MODALITIES) form.append(m, files[m], files[m].name);
    return form;
  }

  function renderError(error) {
    el.error.replaceChildren();
    if (!error) return;
    const message = document.createElement("p");
    message.textContent = messageFor(error);
    el.error.append(message);
    if (error.code === "missing_modality" && error.status === 0 && error.detail) {
      const detail = document.createElement("p");
      detail.textContent = error.detail;
      el.error.append(detail);
    } else if (!ERROR_MESSAGES[error.code] && error.detail) {
      const detail = document.createElement("p");
      detail.textContent = `Details: ${error.detail}`;
      el.error.append(detail);
    }
    if (error.requestId && error.code !== "network_error") {
      const reference = document.createElement("p");
      reference.className = "reference";
      reference.textContent = `Reference for support: request ${error.requestId}`;
      el.error.append(reference);
    }
    if (error.code === "unauthorized") onUnauthorized();
  }

  function renderProgress(job, uploadedFraction = null) {
    el.progressBlock.hidden = false;
    let text;
    let percent;
    if (uploadedFraction !== null) {
      percent = Math.round(100 * uploadedFraction);
      text = `Uploading: ${percent}%`;
    } else {
      percent = Math.round(100 * Math.max(0, Math.min(1, Number(job.progress) || 0)));
      text = stageText(job);
    }
    // Two phases on one bar, each from 0 to 100%: the label says which one it is.
    el.progressLabel.textContent = uploadedFraction !== null ? "Upload" : "Segmentation";
    el.progress.value = percent;
    el.progress.setAttribute("aria-valuetext", `${text} (${percent}%)`);
    el.stage.textContent = text;
  }

  function renderBusy(busy) {
    el.submit.disabled = busy;
    el.cancel.hidden = !busy;
    el.form.setAttribute("aria-busy", String(busy));
  }

  function renderLegend() {
    el.legend.replaceChildren(...MASK_LABELS.map((label) => {
      const item = document.createElement("li");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.backgroundColor = `rgb(${label.colour.join(",")})`;
      const name = document.createElement("span");
      name.textContent = `${label.name} (${label.code}, label ${label.value})`;
      item.append(swatch, name);
      return item;
    }));
  }

  function renderResult(job) {
    const model = job.model || {};
    el.model.textContent = `Model: ${model.name} (architecture ${model.arch}), version ${model.version}.${runText(job)}`;
    el.demoWarning.hidden = !model.demo;
    renderLegend();
    const volumes = job.result.volumes_ml || {};
    el.volumes.replaceChildren(...REGIONS.filter((r) => r.code in volumes).map((region) => {
      const row = document.createElement("tr");
      row.dataset.region = region.code;
      const name = document.createElement("th");
      name.scope = "row";
      name.textContent = `${region.name} (${region.code})`;
      const meaning = document.createElement("td");
      meaning.textContent = region.meaning;
      const value = document.createElement("td");
      value.className = "num";
      value.textContent = formatMl(volumes[region.code]);
      row.append(name, meaning, value);
      return row;
    }));
    el.download.href = job.result.mask_url;
    // a DICOM job also gives a DICOM SEG; its mask and volumes lie on the t1ce series, so the viewer shows them
    $("seg-download-seg-row").hidden = !job.result.seg_url;
    if (job.result.seg_url) $("seg-download-seg").href = job.result.seg_url;
    el.results.hidden = false;
    viewer.show(job, shownModality());
  }

  /** Poll the job until it is final, with a delay growing from 0.5 s to 3 s. */
  async function follow(job, run) {
    let delay = POLL_FIRST_MS;
    while (!run.signal.aborted && (job.status === "queued" || job.status === "running")) {
      renderProgress(job);
      await sleep(delay, run.signal);
      if (run.signal.aborted) return null;
      delay = Math.min(POLL_MAX_MS, delay * POLL_GROWTH);
      try {
        job = await apiFetch(job.links.self, { signal: run.signal });
      } catch (error) {
        if (run.signal.aborted) return null;
        // A dropped connection or a restarting server is worth a few more tries; the rest is final.
        if (!["network_error", "service_unavailable", "bad_gateway", "upstream_timeout"].includes(error.code)) throw error;
        el.status.textContent = "Lost contact with the server; retrying…";
        continue;
      }
      state.job = job;
      el.status.textContent = "";
    }
    return run.signal.aborted ? null : job;
  }

  async function start(event) {
    event.preventDefault();
    if (state.run) return;
    renderError(null);
    let form;
    el.submit.disabled = true;  // packing a DICOM folder takes a moment; no second start meanwhile
    try {
      form = await buildForm();
    } catch (error) {
      el.status.textContent = "";
      renderError(error);
      return;
    } finally {
      el.submit.disabled = false;
    }
    const run = new AbortController();
    state.run = run;
    state.job = null;
    el.results.hidden = true;
    viewer.reset();
    renderBusy(true);
    el.status.textContent = "Uploading the case…";
    renderProgress(null, 0);
    const model = el.modelSelect.value;
    try {
      const url = `api/v1/segmentations${model ? `?model=${encodeURIComponent(model)}` : ""}`;
      let job = await uploadForm(url, form, { signal: run.signal, onProgress: (f) => renderProgress(null, f) });
      state.job = job;
      el.status.textContent = "Segmentation started.";
      job = await follow(job, run);
      if (!job) return;
      el.progressBlock.hidden = true;
      if (job.status === "succeeded") {
        el.status.textContent = "Done: the tumour outline and volumes are below.";
        renderResult(job);
      } else if (job.status === "cancelled") {
        el.status.textContent = "The segmentation was cancelled.";
      } else {
        const failure = job.error || {};
        el.status.textContent = "";
        renderError(new ApiError(200, failure.error || "failed", failure.detail, null));
      }
    } catch (error) {
      if (run.signal.aborted) return;
      el.progressBlock.hidden = true;
      el.status.textContent = "";
      renderError(error);
    } finally {
      if (state.run === run) {
        state.run = null;
        renderBusy(false);
      }
    }
  }

  async function cancel() {
    const run = state.run;
    if (!run) return;
    const job = state.job;
    run.abort();
    state.run = null;
    renderBusy(false);
    el.progressBlock.hidden = true;
    el.status.textContent = "Cancelling…";
    if (!job) {
      el.status.textContent = "The upload was cancelled.";
      return;
    }
    try {
      await apiFetch(job.links.self, { method: "DELETE" });
      el.status.textContent = "The segmentation was cancelled.";
    } catch (error) {
      el.status.textContent = "";
      renderError(error);
    }
  }

  async function downloadWithKey(event) {
    // A plain link carries the session cookie but cannot carry an X-API-Key header.
    if (!storedApiKey()) return;
    event.preventDefault();
    const anchor = event.currentTarget;
    const dicom = anchor.id === "seg-download-seg";
    try {
      const { bytes, type } = await apiFetchBytes(anchor.href);
      const link = document.createElement("a");
      link.href = URL.createObjectURL(new Blob([bytes], { type: type || (dicom ? "application/dicom" : "application/gzip") }));
      link.download = dicom ? "seg.dcm" : "mask.nii.gz";
      link.click();
      setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
    } catch (error) {
      renderError(error);
    }
  }

  async function reloadModels() {
    try {
      const catalogue = await apiFetch("api/v1/segmentation-models");
      const usable = catalogue.models.filter((m) => !m.error);  // a broken bundle is listed with an error
      if (!usable.length) throw new Error("no usable segmentation model");
      state.models = new Map(usable.map((m) => [m.name, m]));
      el.modelSelect.replaceChildren(...usable.map((m) => {
        const option = new Option(`${m.name} — version ${m.version}${m.demo ? " (demo)" : ""}`, m.name);
        option.selected = m.name === catalogue.default;
        return option;
      }));
    } catch {
      // No list (segmenter off, or an older server): the server's default model is used.
      state.models = new Map();
      el.modelSelect.replaceChildren(new Option("Server default", ""));
    }
    renderSelectedModel();
  }

  function renderSelectedModel() {
    const model = state.models.get(el.modelSelect.value);
    el.modelBadge.hidden = !(model && model.demo);
    el.modelInfo.textContent = model
      ? `Architecture ${model.arch}, version ${model.version}${model.demo ? ": a demo model, not trained for real use." : "."}` +
        validationDiceText(model.metrics)
      : "";
  }

  function applyOpacity() {
    el.opacityValue.textContent = `${el.opacity.value}%`;
    viewer.setOpacity(Number(el.opacity.value) / 100);
  }

  el.form.addEventListener("submit", start);
  el.cancel.addEventListener("click", cancel);
  el.download.addEventListener("click", downloadWithKey);
  $("seg-download-seg").addEventListener("click", downloadWithKey);
  el.modelSelect.addEventListener("change", renderSelectedModel);
  el.opacity.addEventListener("input", applyOpacity);
  for (const radio of el.form.querySelectorAll("input[name=seg-source]")) {
    radio.addEventListener("change", () => {
      for (const [name, group] of Object.entries(el.groups)) group.hidden = name !== source();
      describeSelection();
    });
  }
  for (const input of [...Object.values(fileInputs), el.zip, el.fourD]) {
    input.addEventListener("change", describeSelection);
  }
  el.dicomFolder.addEventListener("change", () => {
    state.dicomFiles = chosenFolder(el.dicomFolder.files);
    el.dicom.value = "";
    describeSelection();
  });
  el.dicom.addEventListener("change", () => {
    state.dicomFiles = null;  // the zip replaces a folder chosen before
    el.dicomFolder.value = "";
    describeSelection();
  });
  el.folder.addEventListener("change", () => {
    state.folderFiles = filesByModality(el.folder.files);
    for (const m of MODALITIES) if (state.folderFiles[m]) fileInputs[m].value = "";
    describeSelection();
  });
  for (const radio of document.querySelectorAll("input[name=seg-show]")) {
    radio.addEventListener("change", () => viewer.setModality(shownModality()));
  }
  applyOpacity();
  // The models are asked for when the tab is first opened: a page used only for classification
  // never calls the segmenter (which may not even be configured).
  let activated = false;
  return {
    activate() {
      if (!activated) reloadModels();
      activated = true;
      viewer.refresh();
    },
    reloadModels() {
      if (activated) reloadModels();
    },
  };
}
