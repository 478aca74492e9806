// segd's built-in page. It uses only the public HTTP API, so it is also an example of calling it:
//
//   GET  models                                   -> {default, models: [{name, backend, reason, ready, labels, ...}]}
//   POST segment?format=png&model=M&keep_aspect=B    (multipart field "image")
//                                                 -> indexed PNG, pixel value = class id, PLTE = the class colours;
//                                                    header X-Segd-Summary = the format=json document:
//                                                    {width, height, model, backend, classes: [{id, label, pixels, fraction}], timings_ms}
//   GET  sources                                  -> {sources: [{name, state, error, frames, ...}]} (404: no cameras configured)
//   GET  sources/NAME/latest?format=overlay       -> JPEG of the camera's last frame with its mask; X-Segd-Summary as above
//   errors                                        -> {"error": code, "detail": message} with the HTTP status
//
// With an API key configured, every call carries it as X-API-Key; a 401 asks the user for it.
// The mask is composited over the photo on a canvas here, so the opacity slider works without a new request.
"use strict";

const KEY_STORAGE = "segd-api-key";
const $ = (id) => document.getElementById(id);

const state = {
  models: [],        // GET models -> models
  file: null,        // the image being shown (File or Blob)
  photo: null,       // ImageBitmap of the image, or null when the browser cannot decode it
  maskLayer: null,   // canvas: class colours, class 0 transparent
  request: 0,        // id of the newest request; answers to older ones are dropped
  stream: null,      // camera MediaStream while the camera is open
  sourceTimer: 0,    // the next poll of the shown camera's latest overlay
  sourceUrl: "",     // object URL of the overlay on screen (revoked when replaced)
};
const SOURCE_POLL_MS = 700;

// --- talking to the API ------------------------------------------------------------------------

/** An error answer of the API: `detail` is shown as the API phrased it, with its code and status. */
class ApiError extends Error {
  constructor(status, code, detail) {
    super(detail);
    this.status = status;
    this.code = code;
  }
}

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

/** fetch() against the daemon, with the API key when we have one; throws ApiError on a non-2xx. */
async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (apiKey()) headers.set("X-API-Key", apiKey());
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (err) {
    throw new ApiError(0, "network_error", `could not reach the daemon (${err.message})`);
  }
  if (response.ok) return response;
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not our JSON (a proxy's error page, say): fall back to the status line
  }
  const code = body && body.error ? body.error : "http_error";
  const detail = body && body.detail ? body.detail : response.statusText || "request failed";
  const err = new ApiError(response.status, code, detail);
  const retry = response.headers.get("Retry-After");
  if (retry) err.retryAfter = retry;
  throw err;
}

/** POST the image once per format; both answers describe the same segmentation settings. */
function segmentRequest(file, format) {
  const params = new URLSearchParams({
    format,
    keep_aspect: String($("keep-aspect").checked),
  });
  const model = $("model").value;
  if (model) params.set("model", model);
  const form = new FormData();
  form.append("image", file, file.name || "image");
  return api(`segment?${params}`, { method: "POST", body: form });
}

// --- models ------------------------------------------------------------------------------------

async function loadModels() {
  const select = $("model");
  let doc;
  try {
    doc = await (await api("models")).json();
  } catch (err) {
    select.replaceChildren(new Option("unavailable"));
    showError(err);
    return false;
  }
  hideError();
  state.models = doc.models;
  select.replaceChildren(
    ...doc.models.map((m) => {
      const option = new Option(`${m.name} (${m.ready ? m.backend : m.state})`, m.name);
      option.selected = m.name === doc.default;
      return option;
    }),
  );
  select.disabled = false;
  describeModel();
  return true;
}

function describeModel() {
  const m = state.models.find((x) => x.name === $("model").value);
  if (!m) return;
  const where = m.ready
    ? `Backend: ${m.backend} — ${m.reason}`
    : `Not ready (${m.state})${m.error ? ": " + m.error : ""}`;
  const description = document.createElement("span");
  description.textContent = m.description || "";
  $("model-info").replaceChildren(description, document.createElement("br"), where);
}

// --- segmenting an image -----------------------------------------------------------------------

async function segment(file) {
  const id = ++state.request;
  state.file = file;
  hideError();
  $("details").hidden = true;
  setStatus("Segmenting…");
  // Show the photo right away; the browser may not read every format the daemon does (TIFF).
  state.photo = await createImageBitmap(file).catch(() => null);
  if (id !== state.request) return;
  state.maskLayer = null;
  render();

  const started = performance.now();
  try {
    // One request, one inference: the PNG mask in the body, the JSON summary (class areas,
    // timings, backend) in the X-Segd-Summary header — the same document format=json returns.
    const pngResponse = await segmentRequest(file, "png");
    const doc = JSON.parse(pngResponse.headers.get("X-Segd-Summary"));
    const png = await pngResponse.blob();
    const { layer, palette } = await maskLayerFromPng(png, doc.background);
    if (id !== state.request) return;
    state.maskLayer = layer;
    render();
    showResult(doc, palette, performance.now() - started);
    setStatus(state.photo ? "" : "Your browser cannot display this image format; showing the mask only.");
    // On a phone the result is below the controls: bring it into view.
    if (window.matchMedia("(max-width: 760px)").matches) {
      $("result-heading").scrollIntoView({ block: "start", behavior: "smooth" });
    }
  } catch (err) {
    if (id !== state.request) return;
    setStatus("");
    showError(err);
  }
}

/** Read the palette of an indexed PNG: its PLTE chunk, entry i = colour of class i. */
function pngPalette(bytes) {
  const view = new DataView(bytes);
  for (let at = 8; at + 8 <= bytes.byteLength; ) {
    const length = view.getUint32(at);
    const type = String.fromCharCode(...new Uint8Array(bytes, at + 4, 4));
    if (type === "PLTE") {
      const rgb = new Uint8Array(bytes, at + 8, length);
      const palette = [];
      for (let i = 0; i + 2 < rgb.length; i += 3) palette.push([rgb[i], rgb[i + 1], rgb[i + 2]]);
      return palette;
    }
    at += 12 + length;
  }
  return [];
}

/** The mask as a canvas layer: class colours, with the background class (doc.background: the
 *  class named "background", none for Cityscapes whose class 0 is road) left transparent so the
 *  photo shows through untinted — the same convention as the daemon's own format=overlay. */
async function maskLayerFromPng(png, background) {
  const palette = pngPalette(await png.arrayBuffer());
  const bitmap = await createImageBitmap(png, { colorSpaceConversion: "none", premultiplyAlpha: "none" });
  const canvas = document.createElement("canvas");
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  const ctx = canvas.getContext("2d", { willReadFrequently: true });
  ctx.drawImage(bitmap, 0, 0);
  bitmap.close();
  if (background !== null && background !== undefined && palette[background]) {
    const [r0, g0, b0] = palette[background];
    const pixels = ctx.getImageData(0, 0, canvas.width, canvas.height);
    const p = pixels.data;
    for (let i = 0; i < p.length; i += 4) {
      if (p[i] === r0 && p[i + 1] === g0 && p[i + 2] === b0) p[i + 3] = 0;
    }
    ctx.putImageData(pixels, 0, 0);
  }
  return { layer: canvas, palette };
}

/** Draw the photo, then the mask layer at the slider's opacity. Cheap: called on every slider move. */
function render() {
  const view = $("view");
  const base = state.photo || state.maskLayer;
  $("placeholder").hidden = Boolean(base);
  view.hidden = !base;
  if (!base) return;
  view.width = base.width;
  view.height = base.height;
  const ctx = view.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, view.width, view.height);
  if (state.photo) ctx.drawImage(state.photo, 0, 0);
  if (state.maskLayer) {
    ctx.globalAlpha = Number($("opacity").value) / 100;
    ctx.drawImage(state.maskLayer, 0, 0, view.width, view.height);
    ctx.globalAlpha = 1;
  }
}

function formatPercent(fraction) {
  const pct = fraction * 100;
  return pct > 0 && pct < 0.1 ? "<0.1 %" : `${pct.toFixed(1)} %`;
}

function showResult(doc, palette, roundTripMs) {
  const rows = doc.classes.map((c) => {
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    const [r, g, b] = palette[c.id] || [128, 128, 128];
    swatch.style.backgroundColor = `rgb(${r}, ${g}, ${b})`;
    const label = c.id === doc.background ? `${c.label} (not tinted)` : c.label;
    return tableRow([swatch, label, formatPercent(c.fraction)], { "data-label": c.label });
  });
  $("legend").tBodies[0].replaceChildren(...rows);

  $("served").textContent = `${doc.model} on ${doc.backend} — ${doc.width} × ${doc.height} px`;
  const timings = Object.entries(doc.timings_ms).map(([stage, ms]) => tableRow([stage, ms.toFixed(1)]));
  timings.push(tableRow(["round trip (this page, 2 requests)", roundTripMs.toFixed(0)], { class: "muted" }));
  $("timings").tBodies[0].replaceChildren(...timings);
  $("details").hidden = false;

  const summary = doc.classes.map((c) => `${c.label} ${formatPercent(c.fraction)}`).join(", ");
  $("view").setAttribute("aria-label", `Photo with the segmentation mask: ${summary}`);
}

function tableRow(cells, attributes = {}) {
  const tr = document.createElement("tr");
  for (const [name, value] of Object.entries(attributes)) tr.setAttribute(name, value);
  cells.forEach((cell, i) => {
    const td = document.createElement("td");
    td.append(cell);
    if (i === cells.length - 1) td.className = "num";
    tr.append(td);
  });
  return tr;
}

// --- messages ----------------------------------------------------------------------------------

function setStatus(text) {
  $("status").textContent = text;
}

function showError(err) {
  if (err instanceof ApiError && err.status === 401) {
    askForKey(err.message);
    return;
  }
  const box = $("error");
  $("error-detail").textContent = err.message;
  if (err instanceof ApiError) {
    const status = err.status ? `HTTP ${err.status}` : "no answer";
    const retry = err.retryAfter ? ` · retry after ${err.retryAfter} s` : "";
    $("error-code").textContent = `${err.code} · ${status}${retry}`;
  } else {
    $("error-code").textContent = "";
  }
  box.hidden = false;
}

function hideError() {
  $("error").hidden = true;
}

// --- API key -----------------------------------------------------------------------------------

function askForKey(detail) {
  $("auth-message").textContent = apiKey()
    ? `The daemon refused this key: ${detail}`
    : `This daemon needs an API key: ${detail}`;
  $("auth").hidden = false;
  $("api-key").focus();
}

async function useKey(event) {
  event.preventDefault();
  sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
  $("api-key").value = "";
  $("forget-key").hidden = false;
  if (await loadModels()) {
    $("auth").hidden = true;
    if ($("sources").hidden) loadSources();
    if (state.file) segment(state.file);
  }
}

function forgetKey() {
  sessionStorage.removeItem(KEY_STORAGE);
  $("forget-key").hidden = true;
  loadModels();
}

// --- picking an image: file, drag-and-drop, camera ---------------------------------------------

function setUpDrop() {
  const drop = $("drop");
  // Dropping a file anywhere must not navigate away from the page.
  for (const type of ["dragover", "drop"]) window.addEventListener(type, (e) => e.preventDefault());
  drop.addEventListener("dragover", () => drop.classList.add("dragging"));
  drop.addEventListener("dragleave", () => drop.classList.remove("dragging"));
  drop.addEventListener("drop", (e) => {
    drop.classList.remove("dragging");
    const file = e.dataTransfer && e.dataTransfer.files[0];
    if (file) segment(file);
  });
}

function setUpCamera() {
  // getUserMedia exists only in secure contexts (https, localhost): elsewhere the button stays hidden.
  if (!(navigator.mediaDevices && navigator.mediaDevices.getUserMedia)) return;
  $("camera-open").hidden = false;
  $("camera-open").addEventListener("click", openCamera);
  $("camera-close").addEventListener("click", closeCamera);
  $("snap").addEventListener("click", snapshot);
}

async function openCamera() {
  try {
    state.stream = await navigator.mediaDevices.getUserMedia({
      video: { facingMode: "environment", width: { ideal: 1280 } },
      audio: false,
    });
  } catch (err) {
    showError(new Error(`camera unavailable: ${err.message}`));
    return;
  }
  const video = $("video");
  video.srcObject = state.stream;
  $("camera").hidden = false;
  await video.play();
}

function closeCamera() {
  if (state.stream) state.stream.getTracks().forEach((t) => t.stop());
  state.stream = null;
  $("video").srcObject = null;
  $("camera").hidden = true;
}

function snapshot() {
  const video = $("video");
  if (!video.videoWidth) return;
  const canvas = document.createElement("canvas");
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  canvas.getContext("2d").drawImage(video, 0, 0);
  closeCamera();
  canvas.toBlob((blob) => segment(new File([blob], "snapshot.jpg", { type: "image/jpeg" })), "image/jpeg", 0.92);
}

// --- configured cameras: the live overlay ------------------------------------------------------

async function loadSources() {
  let doc;
  try {
    doc = await (await api("sources")).json();
  } catch {
    return; // 404: no cameras configured (or no key yet): the section stays hidden
  }
  if (!doc.sources.length) return;
  const select = $("source");
  select.replaceChildren(...doc.sources.map((s) => new Option(`${s.name} (${s.kind})`, s.name)));
  $("sources").hidden = false;
  select.addEventListener("change", () => pollSource());
  pollSource();
}

/** Show the selected camera's newest overlay, then poll again (only while the tab is visible). */
async function pollSource() {
  clearTimeout(state.sourceTimer);
  const name = $("source").value;
  if (name && document.visibilityState === "visible") {
    try {
      const response = await api(`sources/${encodeURIComponent(name)}/latest?format=overlay`);
      const doc = JSON.parse(response.headers.get("X-Segd-Summary"));
      const blob = await response.blob();
      if (name === $("source").value) {
        if (state.sourceUrl) URL.revokeObjectURL(state.sourceUrl);
        state.sourceUrl = URL.createObjectURL(blob);
        const view = $("source-view");
        view.src = state.sourceUrl;
        const summary = doc.classes.map((c) => `${c.label} ${formatPercent(c.fraction)}`).join(", ");
        view.alt = `Live overlay of ${name}: ${summary}`;
        $("source-info").textContent = `Frame ${doc.frame} · ${doc.model} on ${doc.backend} · ${summary}`;
      }
    } catch (err) {
      $("source-info").textContent = err.message; // e.g. no frame yet: the camera is connecting
    }
  }
  state.sourceTimer = setTimeout(pollSource, SOURCE_POLL_MS);
}

// --- start -------------------------------------------------------------------------------------

function start() {
  $("file").addEventListener("change", (e) => {
    const file = e.target.files[0];
    if (file) segment(file);
    e.target.value = ""; // choosing the same file again segments it again
  });
  $("model").addEventListener("change", () => {
    describeModel();
    if (state.file) segment(state.file);
  });
  $("keep-aspect").addEventListener("change", () => state.file && segment(state.file));
  $("opacity").addEventListener("input", () => {
    $("opacity-value").textContent = `${$("opacity").value} %`;
    render();
  });
  $("auth").addEventListener("submit", useKey);
  $("forget-key").addEventListener("click", forgetKey);
  $("forget-key").hidden = !apiKey();
  setUpDrop();
  setUpCamera();
  loadModels().then((ok) => ok && loadSources());
}

start();
