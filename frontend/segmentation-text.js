// Words and small helpers of the "Segmentation (3D)" tab (segmentation.js): the regions table, error
// messages a patient or a technician can act on, stage names, polling back-off, matching case file
// names to modalities, and an abortable sleep.

import { ERROR_BY_STATUS, storedApiKey } from "./api.js";

export const MODALITIES = ["t1", "t1ce", "t2", "flair"];  // the segmenter's channel order

/** Regions of the volumes table, in words a patient could follow. */
export const REGIONS = [
  { code: "WT", name: "Whole tumour", meaning: "everything outlined: core, enhancing part and swelling" },
  { code: "TC", name: "Tumour core", meaning: "the necrotic core plus the enhancing tumour" },
  { code: "ET", name: "Enhancing tumour", meaning: "tumour that lights up with contrast (T1ce)" },
  { code: "NCR", name: "Necrotic core", meaning: "dead tissue inside the tumour" },
  { code: "ED", name: "Oedema", meaning: "swelling of the brain around the tumour" },
];

export const ERROR_MESSAGES = {
  missing_modality: "The case needs all four scans: T1, T1ce, T2 and FLAIR. Add the missing one and start again.",
  volume_mismatch: "The four scans do not line up: they must have the same size and position. Check that all four files come from the same examination.",
  unsupported_format: "A file is not a scan we can read. Upload NIfTI files (.nii or .nii.gz), a zip of the case folder, or one 4D NIfTI.",
  unsupported_media_type: "A file is not a scan we can read. Upload NIfTI files (.nii or .nii.gz), a zip of the case folder, or one 4D NIfTI.",
  too_large: "The upload is too large for this server. Use compressed .nii.gz files or a zip of the case folder; " +
    "for a DICOM study, a compressed zip of it is smaller than the folder, and only its T1, T1ce, T2 and FLAIR series are needed.",
  corrupt_file: "One of the files is damaged or incomplete. Export it again and upload the new file.",
  empty_input: "One of the files is empty. Choose the files again.",
  bad_dimensions: "A scan has an unusual size or shape: each must be a 3D volume of a head. Check the files you chose.",
  non_finite: "A scan contains invalid numbers (not-a-number or infinity). Export it again and upload the new file.",
  empty_folder: "The chosen folder holds no files to send. Choose the folder of the DICOM study itself.",
  dataset_layout: "The zip does not look like one case folder with four scans. Zip the folder of a single case.",
  service_unavailable: "The segmentation service is not running right now. Try again in a few minutes.",
  upstream_timeout: "The segmentation service took too long to answer. Try again in a minute.",
  bad_gateway: "The segmentation service sent an answer we could not read. Try again; if it keeps happening, tell the operator.",
  unauthorized: "This server needs an API key. Enter it above, then start again.",
  too_many_requests: "Too many wrong API keys were sent from your address. Wait a minute, check the key, then start again.",
  not_found: "This segmentation is no longer available: it expired, was deleted, or was started in another browser session. Start a new one.",
  unknown_model: "That model is not available any more. Reload the page to see the current models.",
  model_unavailable: "That model is not loaded on the server right now. Choose another model, or try again later.",
  network_error: "Cannot reach the server. Check your connection and try again.",
  upload_interrupted: "The upload was interrupted. Check your connection and start again.",
};
const STAGE_NAMES = {
  queued: "Waiting in the queue", preprocessing: "Preparing the scans", inference: "Inference",
  "writing results": "Writing the results", done: "Done",
};
export const POLL_FIRST_MS = 500;
export const POLL_MAX_MS = 3000;
export const POLL_GROWTH = 1.5;

// Case file names: <case>_t1.nii.gz ... (BraTS 2018-2021) and <case>-t1n.nii.gz ... (BraTS 2023).
const SUFFIX = /[_\-.](t1ce|t1c|t1gd|t1n|t1|t2w|t2f|t2|flair)\.nii(\.gz)?$/i;
const SUFFIX_MODALITY = { t1ce: "t1ce", t1c: "t1ce", t1gd: "t1ce", t1n: "t1", t1: "t1", t2w: "t2", t2: "t2", t2f: "flair", flair: "flair" };

/** Map a folder's files to modalities by the end of their names; the segmentation (seg) is ignored. */
export function filesByModality(files) {
  const found = {};
  for (const file of files) {
    const match = SUFFIX.exec(file.name);
    if (match) found[SUFFIX_MODALITY[match[1].toLowerCase()]] = file;
  }
  return found;
}

export function messageFor(error) {
  if (error.code === "unauthorized" && storedApiKey()) {
    return "That API key was not accepted. Check it, enter it again above, and retry.";
  }
  if (ERROR_MESSAGES[error.code]) return ERROR_MESSAGES[error.code];
  const code = ERROR_BY_STATUS[error.status];
  if (code) return ERROR_MESSAGES[code];
  if (error.status >= 400 && error.status < 500) {
    // A refusal of this upload (its details follow), not a server failure.
    return "The server refused this upload; the details below say why.";
  }
  return "The segmentation failed on the server. Try again; if it keeps happening, tell the operator.";
}

export function stageText(job) {
  const stage = job.status === "queued" ? STAGE_NAMES.queued : (STAGE_NAMES[job.stage] || job.stage || "Working");
  return job.stage_detail ? `${stage}: ${job.stage_detail}` : stage;
}

export const formatMl = (ml) => `${Number(ml).toFixed(2)} mL`;
export const sleep = (ms, signal) => new Promise((resolve) => {
  const timer = setTimeout(resolve, ms);
  signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
});

/**
 * A bundle's Dice from its manifest, said plainly to be no independent test: a single run's validation
 * cases, or for an ensemble of cross-validation folds the pooled figure over all its cases, each scored
 * by the fold network that did not train on it.
 */
export function validationDiceText(metrics) {
  const dice = metrics && metrics.dice;
  if (!dice || !["WT", "TC", "ET"].every((r) => typeof dice[r] === "number")) return "";
  const scores = ["WT", "TC", "ET"].map((r) => `${r} ${dice[r].toFixed(2)}`).join(", ");
  const n = Number.isInteger(metrics.validation_cases) ? metrics.validation_cases : null;
  if (metrics.cross_validation) {
    const over = n === null ? "" : ` over ${n} cases, each scored by the fold network that did not train on it`;
    return ` Cross-validation Dice ${scores}${over} (not an independent test).`;
  }
  return ` Validation Dice ${scores}${n === null ? "" : ` on ${n} held-out cases`} (not an independent test).`;
}

/**
 * How the job ran, from its timings and result: the network's seconds, the whole job's, and the
 * arithmetic it ran in (bfloat16 on CPUs that have it natively; SEGMENTER_PRECISION). Empty parts are left out.
 */
export function runText(job) {
  const timings = (job && job.timings) || {};
  const precision = job && job.result && job.result.precision;
  const seconds = (s) => `${Number(s).toFixed(1)} s`;
  const parts = [];
  if (typeof timings.inference_s === "number") parts.push(`network ${seconds(timings.inference_s)}`);
  if (typeof timings.total_s === "number") parts.push(`whole job ${seconds(timings.total_s)}`);
  if (precision) parts.push(`in ${precision}`);
  return parts.length ? ` Ran: ${parts.join(", ")}.` : "";
}
