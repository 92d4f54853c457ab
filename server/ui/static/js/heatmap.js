// Layer × step heatmap on a canvas, from GET /api/v1/runs/<id>/heatmap (max per bucket).
// Log colour scale (viridis), NaN and +Inf in colours of their own, empty cells grey.
// Drag across it to zoom (the caller fetches finer buckets); click a row to open the layer.

import { num } from "./api.js";
import { el, fmt } from "./format.js";

const NAN_COLOR = [255, 0, 255]; // magenta
const INF_COLOR = [255, 40, 40]; // red
const EMPTY_COLOR = [236, 238, 241];
const LABEL_WIDTH = 190;
// viridis, 9 stops
const STOPS = [
  [68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
  [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37],
];

function ramp(t) {
  const x = Math.min(1, Math.max(0, t)) * (STOPS.length - 1);
  const i = Math.min(STOPS.length - 2, Math.floor(x));
  const f = x - i;
  return STOPS[i].map((c, k) => Math.round(c + (STOPS[i + 1][k] - c) * f));
}

export function legend() {
  const gradient = STOPS.map((c, i) => `rgb(${c}) ${(i / (STOPS.length - 1)) * 100}%`).join(",");
  const sw = (c) => el("span", { class: "swatch", style: `background:rgb(${c})` });
  return el(
    "div",
    { class: "legend" },
    el("span", {}, "low ", el("span", { class: "ramp", style: `background:linear-gradient(90deg,${gradient})` }), " high (log)"),
    el("span", {}, sw(NAN_COLOR), "NaN"),
    el("span", {}, sw(INF_COLOR), "+Inf"),
    el("span", {}, sw(EMPTY_COLOR), "no data"),
    el("span", {}, el("span", { class: "swatch", style: "background:#b91c1c" }), "layer with critical events (▶ first to blow up)"),
  );
}

/**
 * Draw `data` (a HeatmapOut) into `wrap`.
 * opts: { events, selectedLayer, onZoom(from, to), onLayer(name) }
 * Returns { firstLayer, hottestLayer, renderMs }.
 */
export function drawHeatmap(wrap, data, opts) {
  const started = performance.now();
  wrap.replaceChildren();
  const rows = data.layers.length;
  const cols = data.step.length;
  const canvas = el("canvas", { id: "heatmap", "aria-label": "layer by step heatmap" });
  const tooltip = el("div", { class: "tooltip", hidden: true });
  wrap.append(canvas, tooltip);
  const cssWidth = Math.max(400, wrap.clientWidth || 900);
  const rowHeight = rows ? Math.max(1, Math.min(22, Math.floor(600 / rows))) : 14;
  const cssHeight = Math.max(30, rows * rowHeight) + 18;
  const ratio = devicePixelRatio || 1;
  canvas.width = Math.round(cssWidth * ratio);
  canvas.height = Math.round(cssHeight * ratio);
  canvas.style.height = `${cssHeight}px`;
  const ctx = canvas.getContext("2d");
  ctx.scale(ratio, ratio);
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, cssWidth, cssHeight);
  const plotLeft = LABEL_WIDTH;
  const plotWidth = cssWidth - LABEL_WIDTH - 4;
  const plotHeight = rows * rowHeight;

  // Colour scale: log10 of the finite positive values, 1st to 99.9th percentile.
  const logs = [];
  let hottest = { value: -Infinity, layer: null };
  const values = data.max.map((row, r) =>
    row.map((cell) => {
      const v = cell === null ? null : num(cell);
      if (typeof v === "number" && Number.isFinite(v) && v > 0) logs.push(Math.log10(v));
      if (typeof v === "number" && !Number.isNaN(v) && v > hottest.value) {
        hottest = { value: v, layer: data.layers[r] };
      }
      return v;
    }),
  );
  logs.sort((a, b) => a - b);
  const lo = logs.length ? logs[Math.floor(logs.length * 0.01)] : 0;
  const hi = logs.length ? logs[Math.min(logs.length - 1, Math.floor(logs.length * 0.999))] : 1;
  const span = hi - lo || 1;

  // One pixel per cell in an offscreen image, scaled up without smoothing.
  if (rows && cols) {
    const image = new ImageData(cols, rows);
    const nanCells = new Set(data.nan_cells.map(([r, b]) => r * cols + b));
    for (let r = 0; r < rows; r++) {
      for (let b = 0; b < cols; b++) {
        const v = values[r][b];
        let color;
        if (v === null) color = nanCells.has(r * cols + b) ? NAN_COLOR : EMPTY_COLOR;
        else if (Number.isNaN(v) || nanCells.has(r * cols + b)) color = NAN_COLOR;
        else if (v === Infinity) color = INF_COLOR;
        else if (v <= 0) color = STOPS[0];
        else color = ramp((Math.log10(v) - lo) / span);
        const o = (r * cols + b) * 4;
        image.data[o] = color[0];
        image.data[o + 1] = color[1];
        image.data[o + 2] = color[2];
        image.data[o + 3] = 255;
      }
    }
    const off = document.createElement("canvas");
    off.width = cols;
    off.height = rows;
    off.getContext("2d").putImageData(image, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(off, plotLeft, 0, plotWidth, plotHeight);
  }

  // Layers with critical events; the one whose first such event is earliest blew up first.
  const critical = new Map();
  for (const event of opts.events || []) {
    if (!event.layer || event.severity !== "critical") continue;
    const seen = critical.get(event.layer);
    if (seen === undefined || event.first_step < seen) critical.set(event.layer, event.first_step);
  }
  let firstLayer = null;
  for (const [layer, step] of critical) {
    if (firstLayer === null || step < critical.get(firstLayer)) firstLayer = layer;
  }
  ctx.font = "11px system-ui, sans-serif";
  ctx.textBaseline = "middle";
  data.layers.forEach((layer, r) => {
    const y = r * rowHeight;
    const marked = critical.has(layer);
    if (marked) {
      ctx.fillStyle = "#b91c1c";
      ctx.fillRect(plotLeft - 6, y, 4, Math.max(1, rowHeight));
    }
    if (layer === opts.selectedLayer) {
      ctx.strokeStyle = "#2563eb";
      ctx.lineWidth = 1;
      ctx.strokeRect(plotLeft + 0.5, y + 0.5, plotWidth - 1, Math.max(1, rowHeight) - 1);
    }
    if (rowHeight >= 9) {
      ctx.fillStyle = marked ? "#b91c1c" : "#374151";
      const label = `${layer === firstLayer ? "▶ " : ""}${layer}`;
      ctx.fillText(clip(ctx, label, LABEL_WIDTH - 12), 2, y + rowHeight / 2);
    }
  });
  if (rowHeight < 9 && firstLayer) {
    const r = data.layers.indexOf(firstLayer);
    ctx.fillStyle = "#b91c1c";
    ctx.fillText(clip(ctx, `▶ ${firstLayer}`, LABEL_WIDTH - 12), 2, r * rowHeight + rowHeight / 2);
  }
  ctx.fillStyle = "#6b7280";
  if (cols) {
    ctx.fillText(`step ${fmt(data.step[0])}`, plotLeft, plotHeight + 9);
    const end = `${fmt(data.end)}`;
    ctx.fillText(end, plotLeft + plotWidth - ctx.measureText(end).width, plotHeight + 9);
  }

  const cellAt = (event) => {
    const box = canvas.getBoundingClientRect();
    const x = event.clientX - box.left - plotLeft;
    const y = event.clientY - box.top;
    if (x < 0 || x > plotWidth || y < 0 || y >= plotHeight || !cols) return null;
    return { r: Math.floor(y / rowHeight), b: Math.min(cols - 1, Math.floor((x / plotWidth) * cols)), x };
  };
  const stepAt = (x) => data.step[0] + Math.round((x / plotWidth) * cols * data.bucket_width);
  let dragFrom = null;
  canvas.addEventListener("mousemove", (event) => {
    const cell = cellAt(event);
    if (!cell) {
      tooltip.hidden = true;
      return;
    }
    const from = data.step[cell.b];
    tooltip.hidden = false;
    tooltip.textContent = `${data.layers[cell.r]} · steps ${fmt(from)}–${fmt(from + data.bucket_width - 1)} · max ${fmt(data.max[cell.r][cell.b])}`;
    tooltip.style.left = `${Math.min(event.offsetX + 12, cssWidth - 320)}px`;
    tooltip.style.top = `${event.offsetY + 12}px`;
  });
  canvas.addEventListener("mouseleave", () => (tooltip.hidden = true));
  canvas.addEventListener("mousedown", (event) => {
    const cell = cellAt(event);
    dragFrom = cell ? cell.x : null;
  });
  canvas.addEventListener("mouseup", (event) => {
    const cell = cellAt(event);
    if (dragFrom === null || !cell) return;
    if (Math.abs(cell.x - dragFrom) < 4) {
      opts.onLayer && opts.onLayer(data.layers[cell.r]);
    } else if (opts.onZoom) {
      const [a, b] = [Math.min(dragFrom, cell.x), Math.max(dragFrom, cell.x)];
      opts.onZoom(Math.max(0, stepAt(a)), stepAt(b));
    }
    dragFrom = null;
  });
  canvas.addEventListener("dblclick", () => opts.onZoom && opts.onZoom(null, null));

  const renderMs = performance.now() - started;
  canvas.dataset.firstLayer = firstLayer || "";
  canvas.dataset.hottestLayer = hottest.layer || "";
  canvas.dataset.markedLayers = JSON.stringify([...critical.keys()]);
  canvas.dataset.rows = String(rows);
  canvas.dataset.cols = String(cols);
  canvas.dataset.renderMs = renderMs.toFixed(1);
  return { firstLayer, hottestLayer: hottest.layer, renderMs };
}

function clip(ctx, text, width) {
  if (ctx.measureText(text).width <= width) return text;
  let s = text;
  while (s.length > 4 && ctx.measureText(`…${s}`).width > width) s = s.slice(1);
  return `…${s}`;
}
