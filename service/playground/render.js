// vfm playground: drawing answers on the canvases and in the result panel (app.js holds the state and the API).
"use strict";

// ---- drawing ----------------------------------------------------------------------------------

const rgb = (c, a = 1) => `rgba(${c[0]}, ${c[1]}, ${c[2]}, ${a})`;
const scale = () => Math.max(1, Math.max(state.width, state.height) / 600);   // canvas px per screen-ish px

function label(ctx, text, x, y, colour) {
  const s = scale();
  ctx.font = `600 ${Math.round(13 * s)}px system-ui, sans-serif`;
  const w = ctx.measureText(text).width + 8 * s, h = 18 * s;
  const top = y - h < 0 ? y : y - h;
  ctx.fillStyle = rgb(colour);
  ctx.fillRect(x, top, w, h);
  ctx.fillStyle = "#fff";
  ctx.textBaseline = "middle";
  ctx.fillText(text, x + 4 * s, top + h / 2 + s);
}

function dot(ctx, x, y, r, fill) {
  ctx.beginPath();
  ctx.arc(x, y, r, 0, 2 * Math.PI);
  ctx.fillStyle = fill;
  ctx.fill();
  ctx.lineWidth = Math.max(1, r / 3);
  ctx.strokeStyle = "#fff";
  ctx.stroke();
}

function renderDetections(answer) {
  const ctx = $("overlay").getContext("2d");
  const s = scale();
  const list = document.createElement("ul");
  list.className = "items";
  answer.detections.forEach((d, i) => {
    const c = PALETTE[i % PALETTE.length];
    const [x0, y0, x1, y1] = d.box;
    ctx.lineWidth = 3 * s;
    ctx.strokeStyle = rgb(c);
    ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
    label(ctx, `${d.label} ${(d.score * 100).toFixed(0)}%`, x0 - 1.5 * s, y0 - 1.5 * s, c);
    for (const [lx, ly] of d.landmarks || []) dot(ctx, lx, ly, 3.5 * s, rgb(c));
    const li = document.createElement("li");
    li.className = "detection";
    li.dataset.box = d.box.join(",");
    li.dataset.colour = c.join(",");
    li.innerHTML = `<span class="swatch" style="background:${rgb(c)}"></span>`;
    li.append(`${d.label} ${(d.score * 100).toFixed(1)}%`);
    const coords = document.createElement("span");
    coords.className = "coords";
    coords.textContent = d.box.map(Math.round).join(", ");
    li.append(coords);
    list.append(li);
  });
  $("result").innerHTML = "";
  $("result").append(note(`${answer.detections.length} detection${answer.detections.length === 1 ? "" : "s"}`),
                     list);
}

function renderBars(predictions) {
  const box = document.createElement("div");
  box.className = "bars";
  for (const p of predictions) {
    const row = document.createElement("div");
    row.className = "bar-row";
    row.dataset.label = p.label;
    const name = document.createElement("span");
    name.className = "label";
    name.textContent = p.label;
    name.title = `class ${p.index}`;
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = `${(p.score * 100).toFixed(1)}%`;
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("div");
    fill.style.width = `${Math.max(0.5, p.score * 100)}%`;
    bar.append(fill);
    row.append(name, score, bar);
    box.append(row);
  }
  $("result").innerHTML = "";
  $("result").append(box);
}

function renderEmbedding(answer) {
  const v = answer.embedding;
  const norm = Math.sqrt(v.reduce((s, x) => s + x * x, 0));
  const min = Math.min(...v), max = Math.max(...v);
  $("result").innerHTML = "";
  $("result").append(facts({
    "size": String(v.length), "L2 norm": norm.toFixed(4), "min / max": `${min.toFixed(3)} / ${max.toFixed(3)}`,
    "normalized": answer.normalized ? "yes" : "no",
  }));
  const strip = document.createElement("canvas");
  strip.id = "strip";
  strip.width = 600;
  strip.height = 60;
  const ctx = strip.getContext("2d");
  const peak = Math.max(Math.abs(min), Math.abs(max)) || 1;
  const w = strip.width / v.length, zero = min >= 0 ? strip.height - 1 : strip.height / 2;   // the 0 line
  const room = min >= 0 ? strip.height - 2 : strip.height / 2 - 1;
  v.forEach((x, i) => {
    ctx.fillStyle = x >= 0 ? "#2563eb" : "#dc2626";
    const h = Math.abs(x) / peak * room;
    ctx.fillRect(i * w, x >= 0 ? zero - h : zero, Math.max(w, 1), h);
  });
  $("result").append(strip, note(`first values: ${v.slice(0, 6).map((x) => x.toFixed(3)).join(", ")} …`));
}

// COCO compressed RLE (pycocotools' rleFrString): counts of alternating 0/1 runs, column-major.
function decodeRle(rle) {
  const [h, w] = rle.size, s = rle.counts, counts = [];
  for (let p = 0; p < s.length;) {
    let x = 0, k = 0, more = 1;
    while (more) {
      const c = s.charCodeAt(p++) - 48;
      x |= (c & 0x1f) << (5 * k);
      more = c & 0x20;
      k++;
      if (!more && (c & 0x10)) x |= -1 << (5 * k);
    }
    if (counts.length > 2) x += counts[counts.length - 2];
    counts.push(x);
  }
  const mask = new Uint8Array(h * w);     // row-major
  let i = 0;
  counts.forEach((n, run) => {
    if (run % 2) for (let j = i; j < i + n; j++) mask[(j % h) * w + Math.floor(j / h)] = 1;
    i += n;
  });
  return mask;
}

function renderMasks(masks, everything) {
  const canvas = $("mask"), w = canvas.width, h = canvas.height;
  const ctx = canvas.getContext("2d");
  const img = ctx.createImageData(w, h);
  const px = img.data;
  masks.forEach((m, k) => {
    const c = everything ? PALETTE[k % PALETTE.length] : SAM_MASK;
    const mask = decodeRle(m.rle);
    if (m.rle.size[0] !== h || m.rle.size[1] !== w) return;   // not this image's
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) {
        const i = y * w + x;
        if (!mask[i]) continue;
        const edge = x === 0 || y === 0 || x === w - 1 || y === h - 1 || !mask[i - 1] || !mask[i + 1] ||
                     !mask[i - w] || !mask[i + w];
        px.set([c[0], c[1], c[2], edge ? 255 : 120], i * 4);
      }
    }
  });
  ctx.putImageData(img, 0, 0);
  drawPrompts();
  const list = document.createElement("ul");
  list.className = "items";
  masks.forEach((m, k) => {
    const c = everything ? PALETTE[k % PALETTE.length] : SAM_MASK;
    const li = document.createElement("li");
    li.className = "mask";
    li.innerHTML = `<span class="swatch" style="background:${rgb(c)}"></span>`;
    li.append(`score ${m.score.toFixed(3)}`);
    const coords = document.createElement("span");
    coords.className = "coords";
    coords.textContent = `${m.area} px`;
    li.append(coords);
    list.append(li);
  });
  $("result").innerHTML = "";
  const n = state.points.length;
  const prompts = [n && `${n} point${n === 1 ? "" : "s"}`, state.box && "a box"].filter(Boolean).join(" and ");
  $("result").append(note(everything ? `${masks.length} objects, largest first` : `mask for ${prompts}`), list);
}

function drawPrompts(pendingBox) {
  clearCanvas("overlay");
  const ctx = $("overlay").getContext("2d");
  const s = scale();
  for (const box of [state.box, pendingBox]) {
    if (!box) continue;
    ctx.lineWidth = 2 * s;
    ctx.setLineDash([6 * s, 4 * s]);
    ctx.strokeStyle = "#fbbf24";
    ctx.strokeRect(box[0], box[1], box[2] - box[0], box[3] - box[1]);
    ctx.setLineDash([]);
  }
  state.points.forEach(([x, y], i) => dot(ctx, x, y, 6 * s, state.labels[i] ? "#16a34a" : "#dc2626"));
}

// ---- the page around it -----------------------------------------------------------------------

function facts(entries) {
  const dl = document.createElement("dl");
  dl.className = "facts";
  for (const [k, v] of Object.entries(entries)) {
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = k;
    dd.textContent = v;
    dd.dataset.fact = k;
    dl.append(dt, dd);
  }
  return dl;
}

function note(text) {
  const p = document.createElement("p");
  p.className = "muted";
  p.textContent = text;
  return p;
}
