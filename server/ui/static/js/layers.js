// The layer table, most trouble first: non-finite values, then critical and warning
// detections, then how far the largest gradient norm is above the latest one.

import { num } from "./api.js";
import { el, fmt } from "./format.js";

export function troubleScore(layer, detections) {
  const max = num(layer.max_grad_norm);
  const latest = num(layer.latest_grad_norm);
  let score = 0;
  if (layer.nonfinite_values > 0 || (typeof max === "number" && !Number.isFinite(max))) score += 1e12;
  score += (detections.critical || 0) * 1e6 + (detections.warning || 0) * 1e3;
  if (Number.isFinite(max) && Number.isFinite(latest) && latest > 0) score += Math.min(999, max / latest);
  return score;
}

export function layerTable(layers, events, selected, onLayer) {
  const byLayer = new Map();
  for (const event of events) {
    if (!event.layer) continue;
    const d = byLayer.get(event.layer) || {};
    d[event.severity] = (d[event.severity] || 0) + event.count;
    byLayer.set(event.layer, d);
  }
  const rows = layers
    .map((layer) => ({ layer, detections: byLayer.get(layer.name) || {} }))
    .map((row) => ({ ...row, score: troubleScore(row.layer, row.detections) }))
    .sort((a, b) => b.score - a.score || a.layer.index - b.layer.index);
  const head = ["layer", "latest", "max", "non-finite", "weight norm", "update ratio", "detections"];
  return el(
    "table",
    { id: "layers-table" },
    el("thead", {}, el("tr", {}, head.map((h, i) => el("th", { class: i ? "num" : "", text: h })))),
    el(
      "tbody",
      {},
      rows.map(({ layer, detections }) => {
        const total = (detections.critical || 0) + (detections.warning || 0);
        return el(
          "tr",
          {
            class: layer.name === selected ? "selected" : "",
            dataset: { layer: layer.name },
            onclick: () => onLayer(layer.name),
          },
          el("td", { title: layer.name, text: layer.name }),
          el("td", { class: "num", text: fmt(layer.latest_grad_norm) }),
          el("td", { class: "num", text: fmt(layer.max_grad_norm) }),
          el("td", { class: `num ${layer.nonfinite_values ? "trouble" : ""}`, text: fmt(layer.nonfinite_values) }),
          el("td", { class: "num", text: fmt(layer.latest_weight_norm) }),
          el("td", { class: "num", text: fmt(layer.latest_update_ratio) }),
          el("td", { class: `num ${detections.critical ? "trouble" : ""}`, text: total ? fmt(total) : "" }),
        );
      }),
    ),
  );
}
