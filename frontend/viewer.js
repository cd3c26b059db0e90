// The 3D viewer of the segmentation tab: NiiVue (./vendor/niivue.js) shows one input scan with the
// tumour mask on top, in axial, coronal and sagittal slices. Without WebGL2 (or when the viewer
// cannot load) it falls back to the segmenter's three PNG previews.
//
// NiiVue is imported on first use, so the page (and the classification tab) works without it.
// Files are fetched here (with the API key when one is set) and handed to NiiVue as buffers, so
// that the same error handling applies as for every other API call.

import { apiFetchBytes } from "./api.js";

/** BraTS labels of the mask, with their colours (RGB 0-255) and names in words. */
export const MASK_LABELS = [
  { value: 1, code: "NCR", name: "Necrotic tumour core", colour: [230, 25, 75] },
  { value: 2, code: "ED", name: "Swelling around the tumour (oedema)", colour: [255, 225, 25] },
  { value: 4, code: "ET", name: "Enhancing tumour", colour: [0, 130, 200] },
];
export const MODALITY_NAMES = { t1: "T1", t1ce: "T1ce", t2: "T2", flair: "FLAIR" };
const PLANES = ["axial", "coronal", "sagittal"];
const NIIVUE_URL = "./vendor/niivue.js";

/** NiiVue label colour table: 0 transparent, 1/2/4 opaque in their colours, 3 unused (transparent). */
function maskColormap() {
  return {
    R: [0, ...MASK_LABELS.map((l) => l.colour[0])],
    G: [0, ...MASK_LABELS.map((l) => l.colour[1])],
    B: [0, ...MASK_LABELS.map((l) => l.colour[2])],
    A: [0, ...MASK_LABELS.map(() => 255)],
    I: [0, ...MASK_LABELS.map((l) => l.value)],
    labels: ["background", ...MASK_LABELS.map((l) => l.code)],
  };
}

export function webgl2Available() {
  try {
    return Boolean(document.createElement("canvas").getContext("webgl2"));
  } catch {
    return false;
  }
}

function dataUrl(bytes, type) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(new Blob([bytes], { type: type || "image/png" }));
  });
}

export class SegmentationViewer {
  /**
   * @param {object} el elements: container (viewer block), canvas, sliders (array of 3 range
   *   inputs, data-axis 0/1/2 in RAS order), outputs (their <output>s), previews (fallback block),
   *   previewImages ({axial, coronal, sagittal} <img>s), status (a polite live region)
   */
  constructor(el) {
    this.el = el;
    this.nv = null;
    this.job = null;
    this.modality = "flair";
    this.opacity = 0.6;
    this.buffers = new Map();  // url -> ArrayBuffer, so that switching scans back is instant
    for (const slider of el.sliders) {
      slider.addEventListener("input", () => this.moveToSliders());
    }
  }

  /** Show a finished job: NiiVue when possible, else the PNG previews. */
  async show(job, modality) {
    this.job = job;
    this.modality = modality;
    this.buffers.clear();
    if (!webgl2Available()) {
      await this.showPreviews("This browser cannot show the 3D viewer (WebGL2 is off or missing); "
        + "here are still images of the three planes instead.");
      return;
    }
    this.el.previews.hidden = true;
    this.el.container.hidden = false;
    try {
      if (!this.nv) this.nv = await this.createNiivue();
      await this.load({ atTumour: true });
      this.setStatus(`Showing ${MODALITY_NAMES[this.modality]} with the tumour outline. Click a slice or use the sliders to move.`);
    } catch (error) {
      console.warn("3D viewer failed; showing previews", error);
      await this.showPreviews("The 3D viewer could not open this case; here are still images instead.");
    }
  }

  async createNiivue() {
    const { Niivue } = await import(NIIVUE_URL);
    const nv = new Niivue({
      backColor: [0, 0, 0, 1],
      crosshairColor: [1, 1, 1, 0.6],
      crosshairWidth: 1,
      crosshairWidthUnit: "mm",  // thin on any grid (the default, one voxel, is thick on coarse ones)
      show3Dcrosshair: false,
      isColorbar: false,
      isOrientCube: false,
      dragAndDropEnabled: false,
      multiplanarShowRender: 0,  // SHOW_RENDER.NEVER: the three planes only
      loadingText: "Loading the scans...",  // its bitmap font has no ellipsis character
    });
    await nv.attachToCanvas(this.el.canvas);
    nv.setSliceType(nv.sliceTypeMultiplanar);
    nv.onLocationChange = () => this.syncSliders();
    return nv;
  }

  async fetchBuffer(url) {
    if (!this.buffers.has(url)) this.buffers.set(url, (await apiFetchBytes(url)).bytes);
    // NiiVue may keep or transform what it is given: hand it a copy, keep the original.
    return this.buffers.get(url).slice(0);
  }

  /**
   * (Re)load the background scan of the chosen modality and the mask, keeping the crosshair; with
   * `atTumour` (a new job) the crosshair goes to the tumour's centre, where the previews' planes cross.
   */
  async load({ atTumour = false } = {}) {
    const scanUrl = this.job.links.inputs[this.modality];
    const maskUrl = this.job.result.mask_url;
    const [scan, mask] = await Promise.all([this.fetchBuffer(scanUrl), this.fetchBuffer(maskUrl)]);
    const keep = this.nv.volumes.length ? Array.from(this.nv.scene.crosshairPos) : null;
    // An ArrayBuffer as `url` makes NiiVue read it instead of fetching; `name` gives the format.
    await this.nv.loadVolumes([
      { url: scan, name: `${this.modality}.nii.gz` },
      { url: mask, name: "mask.nii.gz", opacity: this.opacity },
    ]);
    this.nv.volumes[1].setColormapLabel(maskColormap());
    this.nv.setOpacity(1, this.opacity);
    this.nv.updateGLVolume();
    this.configureSliders();
    const centre = this.job.result.tumour_centre;
    if (atTumour && centre) this.nv.scene.crosshairPos = this.nv.mm2frac(centre.mm);
    else if (keep) this.nv.scene.crosshairPos = keep;
    this.nv.drawScene();
    this.syncSliders();
  }

  async setModality(modality) {
    if (modality === this.modality || !this.job) return;
    this.modality = modality;
    if (!this.nv || this.el.container.hidden) return;
    this.setStatus(`Loading ${MODALITY_NAMES[modality]}…`);
    try {
      await this.load();
      this.setStatus(`Showing ${MODALITY_NAMES[modality]} with the tumour outline.`);
    } catch (error) {
      console.warn("could not switch the scan", error);
      this.setStatus(`Could not load the ${MODALITY_NAMES[modality]} scan. Try again.`);
    }
  }

  /** @param {number} opacity 0..1, the mask layer's opacity */
  setOpacity(opacity) {
    this.opacity = opacity;
    if (this.nv && this.nv.volumes.length > 1) {
      this.nv.setOpacity(1, opacity);
      this.nv.drawScene();
    }
  }

  /** The grid size in NiiVue's RAS voxel order (what the sliders index). */
  dims() {
    const dims = this.nv.volumes[0].dimsRAS;
    return [dims[1], dims[2], dims[3]];
  }

  configureSliders() {
    const dims = this.dims();
    this.el.sliders.forEach((slider, i) => {
      slider.max = String(dims[Number(slider.dataset.axis)] - 1);
    });
  }

  syncSliders() {
    if (!this.nv || !this.nv.volumes.length) return;
    const dims = this.dims();
    const frac = this.nv.scene.crosshairPos;
    this.el.sliders.forEach((slider, i) => {
      const axis = Number(slider.dataset.axis);
      const voxel = Math.min(dims[axis] - 1, Math.max(0, Math.floor(frac[axis] * dims[axis])));
      slider.value = String(voxel);
      this.el.outputs[i].textContent = `${voxel + 1} of ${dims[axis]}`;
    });
  }

  moveToSliders() {
    if (!this.nv || !this.nv.volumes.length) return;
    const dims = this.dims();
    const frac = [0, 0, 0];
    for (const slider of this.el.sliders) {
      const axis = Number(slider.dataset.axis);
      frac[axis] = (Number(slider.value) + 0.5) / dims[axis];
    }
    this.nv.scene.crosshairPos = frac;
    this.nv.drawScene();
    this.syncSliders();
  }

  /** Redraw after the viewer was hidden (a tab switch leaves the canvas at size 0). */
  refresh() {
    if (this.nv && !this.el.container.hidden) {
      this.nv.resizeListener();
      this.nv.drawScene();
    }
  }

  async showPreviews(reason) {
    this.el.container.hidden = true;
    this.el.previews.hidden = false;
    this.setStatus(reason);
    const previews = (this.job.result && this.job.result.previews) || {};
    await Promise.all(PLANES.map(async (plane) => {
      const img = this.el.previewImages[plane];
      img.closest("figure").hidden = !previews[plane];
      if (!previews[plane]) return;
      try {
        const { bytes, type } = await apiFetchBytes(previews[plane]);
        img.src = await dataUrl(bytes, type);
      } catch (error) {
        img.closest("figure").hidden = true;
      }
    }));
  }

  setStatus(text) {
    this.el.status.textContent = text;
  }

  /** Forget the case (a new job starts): the viewer and previews are hidden until the next show(). */
  reset() {
    this.job = null;
    this.buffers.clear();
    this.el.container.hidden = true;
    this.el.previews.hidden = true;
    this.setStatus("");
  }
}
