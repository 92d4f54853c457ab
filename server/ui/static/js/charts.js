// uPlot line charts with event markers (clickable), skipped / non-finite step ticks,
// drag-to-zoom reported to the caller (which refetches finer buckets) and a log-scale option.

import { num } from "./api.js";
import { el, fmt } from "./format.js";

export const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#db2777", "#0891b2", "#65a30d"];

/** Turn a /series reply into [steps, values] using `field` of buckets (max, min, last). */
export function seriesXY(reply, field = "max") {
  if (!reply) return [[], []];
  const values = reply.downsampled ? reply[field] : reply.value;
  return [reply.step, values.map(num)];
}

/** Steps whose value is non-finite (NaN or ±Inf). */
export function nonFiniteSteps([steps, values]) {
  const out = [];
  values.forEach((v, i) => {
    if (typeof v === "number" && !Number.isFinite(v)) out.push(steps[i]);
  });
  return out;
}

function cleanForScale(values, log) {
  return values.map((v) => {
    if (v === null || v === undefined || !Number.isFinite(v)) return null;
    if (log && v <= 0) return null;
    return v;
  });
}

/**
 * Draw a chart into `container`.
 * opts: { xy: [[steps, values], ...], series: [{label, color, scale, width}], log, height,
 *   events: [event], skipped: [step], nonfinite: [step], onZoom(from|null, to|null),
 *   onEvent(event), syncKey, range: [from, to] | null }
 */
export function lineChart(container, opts) {
  container.replaceChildren();
  const tables = opts.xy.map(([x, y], i) => [
    x,
    cleanForScale(y, opts.log && opts.series[i].scale !== "ratio"),
  ]);
  const data = tables.length ? uPlot.join(tables) : [[]];
  // uPlot.join aligns the tables on one x array; the "ratio" scale is never log.
  const scales = { x: { time: false } };
  const usedScales = new Set(opts.series.map((s) => s.scale || "y"));
  for (const scale of usedScales) {
    scales[scale] = scale === "ratio" || !opts.log ? { auto: true } : { distr: 3, log: 10, auto: true };
  }
  if (opts.range) scales.x = { time: false, min: opts.range[0], max: opts.range[1] };
  const axes = [{ label: "step", values: (u, ticks) => ticks.map((t) => fmt(t)) }];
  [...usedScales].forEach((scale, i) =>
    axes.push({
      scale,
      side: i === 0 ? 3 : 1,
      grid: { show: i === 0 },
      size: 72,
      space: 24,
      values: (u, ticks) => ticks.map((t) => tickLabel(t, opts.log && scale !== "ratio")),
    }),
  );
  const width = Math.max(320, container.clientWidth || 800);
  const plot = new uPlot(
    {
      width,
      height: opts.height || 220,
      scales,
      axes,
      legend: { live: true },
      cursor: {
        drag: { x: true, y: false, setScale: false },
        sync: opts.syncKey ? { key: opts.syncKey } : undefined,
      },
      series: [
        { label: "step", value: (u, v) => (v === null ? "–" : fmt(v)) },
        ...opts.series.map((s, i) => ({
          label: s.label,
          stroke: s.color || COLORS[i % COLORS.length],
          width: s.width || 1.5,
          scale: s.scale || "y",
          spanGaps: !!s.sparse,
          points: { show: !!s.sparse, size: 5 },
          value: (u, v) => fmt(v),
        })),
      ],
      hooks: {
        setSelect: [
          (u) => {
            if (u.select.width < 3) return;
            const from = Math.max(0, Math.floor(u.posToVal(u.select.left, "x")));
            const to = Math.ceil(u.posToVal(u.select.left + u.select.width, "x"));
            u.setSelect({ left: 0, width: 0, top: 0, height: 0 }, false);
            if (opts.onZoom && to > from) opts.onZoom(from, to);
          },
        ],
        draw: [(u) => drawTicks(u, opts)],
      },
    },
    data,
    container,
  );
  plot.over.addEventListener("dblclick", () => opts.onZoom && opts.onZoom(null, null));
  container.dataset.seriesCount = String(opts.series.length);
  container.dataset.points = String(data[0].length);
  container._plot = plot;
  return plot;
}

function tickLabel(value, log) {
  if (value === null || value === undefined) return "";
  if (log) {
    const exponent = Math.log10(value);
    if (Math.abs(exponent - Math.round(exponent)) > 1e-9) return "";
    const e = Math.round(exponent);
    return e >= -2 && e <= 3 ? String(10 ** e >= 1 ? 10 ** e : Number((10 ** e).toFixed(-e))) : `1e${e}`;
  }
  const a = Math.abs(value);
  return a >= 1e5 || (a > 0 && a < 1e-3) ? value.toExponential(1).replace("e+", "e") : fmt(value, 3);
}

function drawTicks(u, opts) {
  const ctx = u.ctx;
  const ratio = devicePixelRatio || 1;
  const { left, top, height, width } = u.bbox;
  const tick = (steps, color, atTop) => {
    ctx.save();
    ctx.fillStyle = color;
    for (const step of steps || []) {
      const x = u.valToPos(step, "x", true);
      if (x < left || x > left + width) continue;
      const y = atTop ? top : top + height;
      const s = 5 * ratio;
      ctx.beginPath();
      ctx.moveTo(x, y);
      ctx.lineTo(x - s, atTop ? y + 2 * s : y - 2 * s);
      ctx.lineTo(x + s, atTop ? y + 2 * s : y - 2 * s);
      ctx.fill();
    }
    ctx.restore();
  };
  tick(opts.skipped, "#d97706", false);
  tick(opts.nonfinite, "#c026d3", true);
  // Event lines, then their clickable markers (DOM, so they can be focused and clicked).
  ctx.save();
  for (const event of opts.events || []) {
    const x = u.valToPos(event.first_step, "x", true);
    if (x < left || x > left + width) continue;
    ctx.strokeStyle = event.severity === "critical" ? "rgba(185,28,28,.55)" : "rgba(180,83,9,.55)";
    ctx.setLineDash([4 * ratio, 3 * ratio]);
    ctx.beginPath();
    ctx.moveTo(x, top);
    ctx.lineTo(x, top + height);
    ctx.stroke();
  }
  ctx.restore();
  placeMarkers(u, opts);
}

function placeMarkers(u, opts) {
  for (const old of u.over.querySelectorAll(".event-marker")) old.remove();
  const [min, max] = [u.scales.x.min, u.scales.x.max];
  const seen = new Set();
  for (const event of opts.events || []) {
    if (event.first_step < min || event.first_step > max) continue;
    const left = Math.round(u.valToPos(event.first_step, "x"));
    const key = `${left}`;
    if (seen.has(key)) continue; // one marker per pixel column; the list shows them all
    seen.add(key);
    const marker = el("button", {
      type: "button",
      class: `event-marker ${event.severity}`,
      title: `${event.rule} ${event.severity} at step ${event.first_step}${event.layer ? ` (${event.layer})` : ""}`,
      "aria-label": `event ${event.rule} at step ${event.first_step}`,
      dataset: { eventId: event.id },
      style: `left:${left}px`,
    });
    marker.addEventListener("mousedown", (e) => e.stopPropagation());
    marker.addEventListener("click", (e) => {
      e.stopPropagation();
      if (opts.onEvent) opts.onEvent(event);
    });
    u.over.append(marker);
  }
}
