// Calls to the gateway's /api/v1, shared by both tabs: request ids, the optional API key, and
// error bodies turned into ApiError. The browser session cookie (brainscan_session, HttpOnly) is
// set by the gateway and sent by the browser on these same-origin requests without any code here.

export const API_KEY_STORAGE = "brainscan.apiKey";

/** An API answer that was not a success, with the server's error code and the request id. */
export class ApiError extends Error {
  constructor(status, code, detail, requestId) {
    super(detail || code);
    this.status = status;
    this.code = code;
    this.detail = detail;
    this.requestId = requestId;
  }
}

/** Error codes implied by a status when the body has none (e.g. a proxy's HTML error page). */
export const ERROR_BY_STATUS = {
  401: "unauthorized", 413: "too_large", 415: "unsupported_format", 429: "too_many_requests",
  502: "bad_gateway", 503: "service_unavailable", 504: "upstream_timeout",
};

/** A random request id (crypto.randomUUID needs a secure context; getRandomValues does not). */
function newRequestId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

export function storedApiKey() {
  try {
    return sessionStorage.getItem(API_KEY_STORAGE) || "";
  } catch {
    return "";  // storage disabled: the key field still works for this page view
  }
}

export function storeApiKey(key) {
  try {
    sessionStorage.setItem(API_KEY_STORAGE, key);
  } catch {
    // storage disabled: nothing to keep
  }
}

/** The headers every API call carries: a fresh request id, Accept, and the API key when set. */
function apiHeaders(accept, extra = {}) {
  const headers = new Headers(extra);
  headers.set("X-Request-ID", newRequestId());
  headers.set("Accept", accept);
  const key = storedApiKey();
  if (key) headers.set("X-API-Key", key);
  return headers;
}

/** fetch() with the API headers; network failures become ApiError. */
async function send(path, options, accept) {
  const headers = apiHeaders(accept, options.headers || {});
  const requestId = headers.get("X-Request-ID");
  try {
    const response = await fetch(path, { ...options, headers });
    return { response, requestId: response.headers.get("X-Request-ID") || requestId };
  } catch (err) {
    if (err && err.name === "AbortError") throw err;
    throw new ApiError(0, "network_error", String(err), requestId);
  }
}

function errorFromBody(status, body, requestId) {
  const code = (body && body.error) || ERROR_BY_STATUS[status] || `http_${status}`;
  return new ApiError(status, code, body && body.detail, requestId);
}

async function errorFrom(response, requestId) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  return errorFromBody(response.status, body, requestId);
}

/**
 * Call the gateway and return the parsed JSON body (null for 204 No Content).
 * @param {string} path relative URL, e.g. "api/v1/models"
 * @param {RequestInit} options fetch options (method, body, signal)
 * @throws {ApiError} for network failures, non-2xx answers and unreadable bodies
 */
export async function apiFetch(path, options = {}) {
  const { response, requestId } = await send(path, options, "application/json");
  if (!response.ok) throw await errorFrom(response, requestId);
  if (response.status === 204) return null;
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (body === null || typeof body !== "object") {
    throw new ApiError(response.status, "bad_gateway", "The answer was not JSON.", requestId);
  }
  return body;
}

/**
 * Download a file from the gateway (a NIfTI volume, a PNG preview) as an ArrayBuffer.
 * @throws {ApiError} as apiFetch
 */
export async function apiFetchBytes(path, options = {}) {
  const { response, requestId } = await send(path, options, "*/*");
  if (!response.ok) throw await errorFrom(response, requestId);
  return { bytes: await response.arrayBuffer(), type: response.headers.get("Content-Type") || "" };
}

/**
 * POST a multipart form and return the JSON answer, reporting upload progress (fetch cannot).
 * @param {string} path relative URL
 * @param {FormData} form the files
 * @param {{signal?: AbortSignal, onProgress?: (fraction: number) => void}} options
 * @throws {ApiError} as apiFetch; a DOMException "AbortError" when the signal aborts
 */
export function uploadForm(path, form, { signal, onProgress } = {}) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    const headers = apiHeaders("application/json");
    const requestId = headers.get("X-Request-ID");
    xhr.open("POST", path);
    headers.forEach((value, name) => xhr.setRequestHeader(name, value));
    xhr.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable && onProgress) onProgress(event.loaded / event.total);
    });
    xhr.addEventListener("load", () => {
      const answeredId = xhr.getResponseHeader("X-Request-ID") || requestId;
      let body = null;
      try {
        body = JSON.parse(xhr.responseText);
      } catch {
        body = null;
      }
      if (xhr.status < 200 || xhr.status >= 300) reject(errorFromBody(xhr.status, body, answeredId));
      else if (body === null || typeof body !== "object") reject(new ApiError(xhr.status, "bad_gateway", "The answer was not JSON.", answeredId));
      else resolve(body);
    });
    // An over-size upload is often cut off by the server before its 413 can be read.
    xhr.addEventListener("error", () => reject(new ApiError(0, "network_error", "The upload did not complete.", requestId)));
    xhr.addEventListener("abort", () => reject(new DOMException("The upload was cancelled.", "AbortError")));
    if (signal) signal.addEventListener("abort", () => xhr.abort(), { once: true });
    xhr.send(form);
  });
}
