// Compare 2–8 runs: global norm and loss overlaid on one step axis. URL: ?runs=<id>,<id>,…

import { get } from "./api.js";
import { navigate } from "./app.js";
import { COLORS, lineChart, seriesXY } from "./charts.js";
import { el, fmt, verdictBadge } from "./format.js";

const MAX_RUNS = 8;

export async function renderCompare(view, params) {
  const ids = (params.get("runs") || "").split(",").map((s) => s.trim()).filter(Boolean).slice(0, MAX_RUNS);
  const log = params.get("log") !== "0"; // norms span decades: log scale unless ?log=0
  const recent = await get("/runs", { limit: 50 });
  const chosen = new Set(ids);
  const picker = el(
    "div",
    { class: "picker", id: "compare-picker" },
    recent.runs.map((run) =>
      el(
        "label",
        {},
        el("input", {
          type: "checkbox",
          value: run.run_id,
          checked: chosen.has(run.run_id),
          onchange: (e) => {
            if (e.target.checked) chosen.add(run.run_id);
            else chosen.delete(run.run_id);
            apply.disabled = chosen.size < 2 || chosen.size > MAX_RUNS;
          },
        }),
        ` ${run.name} `,
        el("span", { class: "muted", text: `${run.project} · ${run.status} · ${fmt(run.num_steps)} steps` }),
      ),
    ),
  );
  const apply = el("button", { type: "button", id: "compare-apply", disabled: chosen.size < 2, text: "Compare" });
  apply.addEventListener("click", () => navigate(`/compare?runs=${[...chosen].join(",")}${log ? "" : "&log=0"}`));
  const logToggle = el("input", { type: "checkbox", id: "log-toggle", checked: log });
  logToggle.addEventListener("change", () => navigate(`/compare?runs=${ids.join(",")}${logToggle.checked ? "" : "&log=0"}`, { replace: true }));
  view.append(el("h1", { text: "Compare runs" }), el("details", { open: ids.length < 2 }, el("summary", { text: `Pick 2–${MAX_RUNS} runs` }), picker, apply));
  if (ids.length < 2) {
    view.append(el("p", { class: "notice", text: "Pick at least two runs to overlay their global norm and loss." }));
    return { stop() {} };
  }
  const runs = await Promise.all(ids.map((id) => get(`/runs/${id}`)));
  const [healths, norms, losses] = await Promise.all([
    Promise.all(ids.map((id) => get(`/runs/${id}/health`, { worst: 0 }))),
    Promise.all(ids.map((id) => get(`/runs/${id}/series`, { metric: "global_norm", max_points: 1500 }))),
    Promise.all(ids.map((id) => get(`/runs/${id}/series`, { metric: "loss", max_points: 1500 }))),
  ]);
  const legendRows = runs.map((run, i) =>
    el(
      "tr",
      { dataset: { runId: run.run_id } },
      el("td", {}, el("span", { class: "swatch", style: `background:${COLORS[i]}` })),
      el("td", {}, el("a", { href: `/runs/${run.run_id}`, text: run.name })),
      el("td", {}, verdictBadge(healths[i].verdict)),
      el("td", { class: "num", text: fmt(run.num_steps) }),
      el("td", { class: "num", text: fmt(run.max_global_norm) }),
      el("td", { class: "num", text: fmt(run.clipped_steps) }),
    ),
  );
  const normChart = el("div", { class: "chart", id: "compare-norm" });
  const lossChart = el("div", { class: "chart", id: "compare-loss" });
  view.append(
    el(
      "table",
      { id: "compare-table" },
      el("thead", {}, el("tr", {}, ["", "run", "health"].map((h) => el("th", { text: h })), ["steps", "max global norm", "clipped"].map((h) => el("th", { class: "num", text: h })))),
      el("tbody", {}, legendRows),
    ),
    el("section", { class: "panel" }, el("div", { class: "toolbar" }, el("h2", { text: "Global gradient norm" }), el("label", {}, logToggle, " log scale")), normChart),
    el("section", { class: "panel" }, el("h2", { text: "Loss" }), lossChart),
  );
  const series = runs.map((run, i) => ({ label: run.name, color: COLORS[i] }));
  lineChart(normChart, { xy: norms.map((r) => seriesXY(r, "max")), series, log, syncKey: "compare", height: 300 });
  lineChart(lossChart, { xy: losses.map((r) => seriesXY(r, "max")), series, log, syncKey: "compare", height: 220 });
  document.body.dataset.compareReady = "1";
  return { stop() { delete document.body.dataset.compareReady; } };
}
