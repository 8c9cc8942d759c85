// vfm playground: try a served model on an image, over the documented /v1 API only.
// Plain JS, no dependencies: the page works offline and loads nothing from outside the service.
"use strict";

const PALETTE = [[255, 59, 107], [0, 153, 255], [255, 176, 0], [22, 163, 74], [147, 51, 234], [255, 112, 67],
                 [13, 148, 136], [219, 39, 119], [37, 99, 235], [202, 138, 4], [8, 145, 178], [220, 38, 38]];
const SAM_MASK = [30, 144, 255];        // the colour of a prompted mask
const ACTIONS = {                       // model task -> what the page runs
  classify: {label: "Classify (top-k)", route: "predict"},
  detect: {label: "Detect (boxes)", route: "predict"},
  segment: {label: "Segment (SAM prompts)", route: "segment"},
  embed: {label: "Embed (feature vector)", route: "embed"},
};

const $ = (id) => document.getElementById(id);
const state = {
  models: [], heads: [],
  blob: null, bitmap: null, width: 0, height: 0,
  imageId: null, encoding: null,          // SAM: the cached embedding's id, and the encode in flight
  points: [], labels: [], box: null, drag: null,
  seq: 0,                                 // answers to older requests are dropped
  token: 0,                               // which image and model an embedding belongs to
};
window.vfmPlayground = {state, PALETTE, SAM_MASK};   // for tests and the curious

// ---- the API ----------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, type, message) { super(message); this.status = status; this.type = type; }
}

function headers(extra = {}) {
  const key = $("api-key").value.trim();
  return key ? {...extra, "X-API-Key": key} : extra;
}

function path(prefix, name, route) {
  const encoded = name.split("/").map(encodeURIComponent).join("/");
  return `${prefix}/${encoded}${route ? "/" + route : ""}`;
}

async function api(method, url, body) {
  const init = {method, headers: headers()};
  if (body instanceof FormData) init.body = body;
  else if (body !== undefined) {
    init.headers = headers({"Content-Type": "application/json"});
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(url, init);
  } catch (err) {
    throw new ApiError(0, "network", `The service did not answer (${err.message}).`);
  }
  const text = await response.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { /* not JSON */ }
  if (!response.ok) {
    const e = data && data.error;
    throw new ApiError(response.status, e ? e.type : "http", e ? e.message : text || response.statusText);
  }
  return data;
}

function imageForm(options) {
  const form = new FormData();
  form.append("image", state.blob, state.blob.name || "image");
  for (const [k, v] of Object.entries(options)) form.append(k, JSON.stringify(v));
  return form;
}

// ---- models and heads -------------------------------------------------------------------------

async function loadCatalog() {
  showError(null);
  try {
    const [models, heads] = await Promise.all([api("GET", "/v1/models"), api("GET", "/v1/heads")]);
    state.models = models.models;
    state.heads = heads.heads;
  } catch (err) {
    showError(err);
    return;
  }
  const select = $("model");
  const previous = select.value;
  select.innerHTML = "";
  const group = (label, items, kind) => {
    if (!items.length) return;
    const og = document.createElement("optgroup");
    og.label = label;
    for (const item of items) {
      const opt = new Option(item.status === "ready" ? item.name : `${item.name} (${item.status})`,
                             `${kind}:${item.name}`);
      opt.disabled = item.status !== "ready";
      if (item.reason) opt.title = item.reason;
      og.append(opt);
    }
    select.append(og);
  };
  group("Models", state.models, "model");
  group("Fine-tuned heads", state.heads, "head");
  const values = [...select.options].filter((o) => !o.disabled).map((o) => o.value);
  select.value = values.includes(previous) ? previous : (values[0] || "");
  onModelChange();
}

function selected() {
  const [kind, ...rest] = $("model").value.split(":");
  const name = rest.join(":");
  const item = kind === "head" ? state.heads.find((h) => h.name === name) : state.models.find((m) => m.name === name);
  return item ? {kind, name, item} : null;
}

function onModelChange() {
  const sel = selected();
  const action = $("action");
  action.innerHTML = "";
  if (!sel) { $("model-info").textContent = ""; return; }
  if (sel.kind === "head") {
    action.append(new Option("Classify with the head", "head"));
    $("model-info").textContent = `head over ${sel.item.backbone}` +
      (sel.item.labels ? ` · ${sel.item.labels.length} classes` : "");
  } else {
    const m = sel.item;
    for (const task of Object.keys(ACTIONS)) {
      if ((m.tasks || [m.task]).includes(task)) action.append(new Option(ACTIONS[task].label, task));
    }
    $("model-info").textContent = [m.task, m.backend, m.device, m.input_size && `${m.input_size}px`]
      .filter(Boolean).join(" · ");
  }
  onActionChange();
}

function onActionChange() {
  const act = $("action").value;
  for (const el of document.querySelectorAll("#options [data-for]")) {
    el.hidden = !el.dataset.for.split(" ").includes(act);
  }
  $("sam-tools").hidden = act !== "segment";
  $("overlay").classList.toggle("prompting", act === "segment");
  state.imageId = null;
  state.encoding = null;
  state.token++;
  clearPrompts(false);
  if (state.blob) run();
}

// ---- the image --------------------------------------------------------------------------------

async function setImage(file) {
  if (!file) return;
  showError(null);
  let bitmap;
  try {
    bitmap = await createImageBitmap(file);
  } catch {
    // The browser can't show it; the service still says what it thinks of it.
    bitmap = null;
  }
  state.blob = file;
  state.bitmap = bitmap;
  state.width = bitmap ? bitmap.width : 0;
  state.height = bitmap ? bitmap.height : 0;
  state.imageId = null;
  state.encoding = null;
  state.token++;
  clearPrompts(false);
  for (const id of ["image", "mask", "overlay"]) {
    const c = $(id);
    c.width = state.width;
    c.height = state.height;
  }
  if (bitmap) $("image").getContext("2d").drawImage(bitmap, 0, 0);
  $("canvas-wrap").hidden = !bitmap;
  $("placeholder").hidden = !!bitmap;
  fit();
  run();
}

// Show the image as large as the stage allows (small images up to 4x); canvases keep the image's own pixels.
function fit() {
  if (!state.width) return;
  const stage = $("stage"), style = getComputedStyle(stage);
  const width = stage.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
  const height = Math.max(240, window.innerHeight - 170);
  const k = Math.min(width / state.width, height / state.height, 4);
  $("image").style.width = `${Math.floor(state.width * k)}px`;
  $("image").style.height = `${Math.floor(state.height * k)}px`;
}

function clearCanvas(id) {
  const c = $(id);
  c.getContext("2d").clearRect(0, 0, c.width, c.height);
}

// ---- running a model --------------------------------------------------------------------------

function options(act) {
  const num = (id) => Number($(id).value);
  if (act === "classify" || act === "head") return {top_k: num("top_k")};
  if (act === "detect") return {score_threshold: num("score_threshold")};
  if (act === "embed") return {normalize: $("normalize").checked};
  return {};
}

async function run() {
  const sel = selected();
  if (!sel || !state.blob) return;
  const act = $("action").value;
  const seq = ++state.seq;
  showError(null);
  clearCanvas("mask");
  clearCanvas("overlay");
  const started = performance.now();
  setStatus(`${sel.name}: working…`, true);
  try {
    if (act === "segment") {
      await encode(sel.name);
      if (seq !== state.seq) return;
      if (state.points.length || state.box) await segment();
      return;
    }
    const url = act === "head" ? path("/v1/heads", sel.name, "predict") : path("/v1/models", sel.name,
                                                                                ACTIONS[act].route);
    const answer = await api("POST", url, imageForm(options(act)));
    if (seq !== state.seq) return;
    showRaw(answer);
    if (act === "detect") renderDetections(answer);
    else if (act === "embed") renderEmbedding(answer);
    else renderBars(answer.predictions);
    setStatus(`${sel.name} · ${ACTIONS[act] ? ACTIONS[act].route : "head predict"} · ` +
              `${Math.round(performance.now() - started)} ms`);
  } catch (err) {
    if (seq === state.seq) { showError(err); setStatus(""); }
  }
}

async function encode(name) {
  if (state.imageId) return state.imageId;
  if (!state.encoding) {
    const started = performance.now(), token = state.token;
    state.encoding = api("POST", path("/v1/models", name, "encode"), imageForm({})).then((answer) => {
      if (token !== state.token) throw new ApiError(0, "stale", "The image or model changed meanwhile.");
      state.imageId = answer.image_id;
      if (!state.points.length && !state.box) {
        showRaw(answer);
        $("result").innerHTML = "";
        $("result").append(facts({
          "image_id": answer.image_id.slice(0, 16) + "…",
          "image": `${answer.image_size.width} × ${answer.image_size.height}`,
          "embedding": answer.cached ? "already cached" : `computed in ${Math.round(performance.now() - started)} ms`,
        }), note("Click the photo to segment an object."));
        setStatus(`${name} · embedding cached: click to segment`);
      }
      return answer.image_id;
    }).finally(() => { if (token === state.token) state.encoding = null; });
  }
  return state.encoding;
}

// ---- SAM prompts ------------------------------------------------------------------------------

function clearPrompts(redraw = true) {
  state.points = [];
  state.labels = [];
  state.box = null;
  if (redraw) {
    clearCanvas("mask");
    clearCanvas("overlay");
  }
}

function imagePoint(event) {
  const r = $("overlay").getBoundingClientRect();
  return [(event.clientX - r.left) * state.width / r.width, (event.clientY - r.top) * state.height / r.height];
}

function onPointerDown(event) {
  if ($("action").value !== "segment" || !state.bitmap) return;
  event.preventDefault();
  $("overlay").setPointerCapture(event.pointerId);
  state.drag = {start: imagePoint(event), at: imagePoint(event), shift: event.shiftKey,
                client: [event.clientX, event.clientY]};
}

function onPointerMove(event) {
  if (!state.drag) return;
  state.drag.at = imagePoint(event);
  if (isDrag(event)) drawPrompts(boxOf(state.drag));
}

function onPointerUp(event) {
  const drag = state.drag;
  if (!drag) return;
  state.drag = null;
  drag.at = imagePoint(event);
  if (isDrag(event, drag)) {
    state.box = boxOf(drag);
  } else {
    state.points.push(drag.start.map((v) => Math.round(v * 10) / 10));
    state.labels.push(drag.shift || event.shiftKey ? 0 : 1);
  }
  drawPrompts();
  segment();
}

function isDrag(event, drag = state.drag) {
  return Math.hypot(event.clientX - drag.client[0], event.clientY - drag.client[1]) > 6;
}

function boxOf(drag) {
  const [x0, y0] = drag.start, [x1, y1] = drag.at;
  return [Math.min(x0, x1), Math.min(y0, y1), Math.max(x0, x1), Math.max(y0, y1)].map(Math.round);
}

async function segment(everything = false) {
  const sel = selected();
  if (!sel || !state.blob) return;
  const seq = ++state.seq;
  showError(null);
  const body = everything ? {mode: "everything", format: "rle"} : {format: "rle"};
  if (!everything) {
    if (state.points.length) { body.points = state.points; body.point_labels = state.labels; }
    if (state.box) body.box = state.box;
    if (!body.points && !body.box) { clearPrompts(); return; }
  }
  setStatus(everything ? `${sel.name}: segmenting everything…` : `${sel.name}: segmenting…`, true);
  const started = performance.now();
  try {
    let answer;
    for (let attempt = 0; ; attempt++) {
      body.image_id = await encode(sel.name);
      try {
        answer = await api("POST", path("/v1/models", sel.name, "segment"), body);
        break;
      } catch (err) {  // the service dropped the embedding from its cache: encode again, once
        if (err.type !== "unknown_image_id" || attempt > 0) throw err;
        state.imageId = null;
      }
    }
    if (seq !== state.seq) return;
    const ms = Math.round(performance.now() - started);
    showRaw(answer);
    if (everything) clearPrompts();
    renderMasks(answer.masks, everything);
    setStatus(`${sel.name} · ${answer.masks.length} mask${answer.masks.length === 1 ? "" : "s"} in ${ms} ms` +
              (answer.cached ? " (cached embedding)" : ""));
  } catch (err) {
    if (seq === state.seq) { showError(err); setStatus(""); }
  }
}

// ---- the page around it -----------------------------------------------------------------------

function showError(err) {
  const box = $("error");
  box.hidden = !err;
  box.innerHTML = "";
  if (!err) return;
  $("result").innerHTML = "";
  const title = document.createElement("b");
  title.textContent = err.status ? `${err.status} ${err.type}` : err.type || "error";
  box.append(title, err.message);
}

function showRaw(answer) {
  const shorten = (k, v) => {   // long vectors and RLE counts, cut
    if (k === "embedding" && v.length > 16) return [...v.slice(0, 16), `… ${v.length - 16} more`];
    return k === "counts" && v.length > 80 ? v.slice(0, 80) + "…" : v;
  };
  $("raw").textContent = JSON.stringify(answer, shorten, 2);
}

function setStatus(text, busy = false) {
  $("status").textContent = text;
  document.body.dataset.busy = busy ? "1" : "";
}

function setUpDrop(el) {
  el.addEventListener("dragover", (e) => { e.preventDefault(); el.classList.add("over"); });
  el.addEventListener("dragleave", () => el.classList.remove("over"));
  el.addEventListener("drop", (e) => {
    e.preventDefault();
    el.classList.remove("over");
    if (e.dataTransfer.files.length) setImage(e.dataTransfer.files[0]);
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const key = $("api-key");
  key.value = sessionStorage.getItem("vfm-api-key") || "";
  key.addEventListener("change", () => { sessionStorage.setItem("vfm-api-key", key.value.trim()); loadCatalog(); });
  $("model").addEventListener("change", onModelChange);
  $("action").addEventListener("change", onActionChange);
  for (const id of ["top_k", "score_threshold", "normalize"]) $(id).addEventListener("change", run);
  $("file").addEventListener("change", (e) => setImage(e.target.files[0]));
  setUpDrop($("drop"));
  setUpDrop($("stage"));
  const overlay = $("overlay");
  overlay.addEventListener("pointerdown", onPointerDown);
  overlay.addEventListener("pointermove", onPointerMove);
  overlay.addEventListener("pointerup", onPointerUp);
  $("everything").addEventListener("click", () => segment(true));
  $("clear").addEventListener("click", () => { clearPrompts(); $("result").innerHTML = ""; });
  window.addEventListener("resize", fit);
  loadCatalog();
});
