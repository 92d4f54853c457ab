// The run page: totals and verdict, global norm (before/after clipping, clip coefficient),
// loss, layer × step heatmap, layer table and one layer's series, events and their details.
// URL state: ?layer=<name>&from=<step>&to=<step>&log=0 (linear; log scale by default). Polls while the run is running.

import { get, getAll } from "./api.js";
import { guarded, setLive, setQuery } from "./app.js";
import { COLORS, lineChart, nonFiniteSteps, seriesXY } from "./charts.js";
import { ago, el, fmt, shortId, verdictBadge } from "./format.js";
import { drawHeatmap, legend } from "./heatmap.js";
import { layerTable } from "./layers.js";

const POLL_MS = 5000;
const HEATMAP_EVERY = 3; // polls between heatmap refreshes

function intParam(params, key) {
  const value = params.get(key);
  return value !== null && /^\d+$/.test(value) ? Number(value) : null;
}

export async function renderRun(view, runId, params) {
  const state = {
    layer: params.get("layer"),
    from: intParam(params, "from"),
    to: intParam(params, "to"),
    log: params.get("log") !== "0", // norms span decades: log scale unless ?log=0
  };
  const $ = {};
  const panel = (id, title, ...body) => (
    ($[id] = el("section", { class: "panel", id }, title ? el("h2", { text: title }) : "", ...body))
  );
  $.title = el("h1");
  $.summary = el("div", { class: "summary", id: "run-summary" });
  $.range = el("span", { id: "range", class: "muted" });
  $.logToggle = el("input", { type: "checkbox", id: "log-toggle", checked: state.log });
  $.reset = el("button", { type: "button", id: "reset-zoom", text: "Whole run" });
  $.normChart = el("div", { class: "chart", id: "norm-chart" });
  $.lossChart = el("div", { class: "chart", id: "loss-chart" });
  $.heat = el("div", { class: "heatmap-wrap", id: "heatmap-wrap" });
  $.heatInfo = el("span", { class: "muted", id: "heatmap-info" });
  $.layers = el("div", { class: "layers-table" });
  $.layerPanel = el("section", { class: "panel", id: "layer-panel", hidden: true });
  $.details = el("section", { class: "panel", id: "event-details", hidden: true });
  $.events = el("div", { class: "event-list", id: "events" });
  $.health = el("div", { id: "health" });
  view.append(
    $.title,
    $.summary,
    el(
      "div",
      { class: "grid" },
      el(
        "div",
        {},
        panel(
          "norm-panel",
          "Global gradient norm",
          el(
            "div",
            { class: "toolbar" },
            el("label", {}, $.logToggle, " log scale"),
            $.reset,
            $.range,
            el("span", { class: "muted", text: "drag to zoom · double-click for the whole run · ● event (click) · ▲ skipped · ▼ non-finite" }),
          ),
          $.normChart,
        ),
        panel("loss-panel", "Loss", $.lossChart),
        panel("heatmap-panel", "Per-layer gradient norm (max per bucket)", el("div", { class: "toolbar" }, legend(), $.heatInfo), $.heat),
        $.layerPanel,
        panel("layers-panel", "Layers (most trouble first)", $.layers),
      ),
      el(
        "div",
        {},
        panel("health-panel", "Health", $.health),
        $.details,
        panel("events-panel", "Events", $.events),
      ),
    ),
  );

  let stopped = false;
  let timer = null;
  let polls = 0;
  let data = {};

  const zoom = (from, to) => {
    state.from = from;
    state.to = to;
    setQuery({ from, to }, { push: true });
    refresh({ heatmap: true });
  };
  const openLayer = (layer) => {
    state.layer = layer;
    setQuery({ layer }, { push: true });
    refresh({ heatmap: true });
  };
  $.logToggle.addEventListener("change", () => {
    state.log = $.logToggle.checked;
    setQuery({ log: state.log ? null : "0" });
    drawCharts();
  });
  $.reset.addEventListener("click", () => zoom(null, null));

  const showEvent = (event) => {
    $.details.hidden = false;
    const span = Math.max(50, (event.last_step - event.first_step) * 2);
    $.details.replaceChildren(
      el("h2", {}, "Event ", el("span", { class: `sev-${event.severity}`, text: `${event.rule} · ${event.severity}` })),
      el(
        "dl",
        { dataset: { eventId: event.id } },
        el("dt", { text: "layer" }), el("dd", { text: event.layer || "(run level)" }),
        el("dt", { text: "steps" }), el("dd", { text: `${fmt(event.first_step)}–${fmt(event.last_step)}` }),
        el("dt", { text: "detections" }), el("dd", { text: fmt(event.count) }),
        el("dt", { text: "value" }), el("dd", { text: fmt(event.value) }),
        el("dt", { text: "baseline" }), el("dd", { text: fmt(event.baseline) }),
        el("dt", { text: "seen" }), el("dd", { text: ago(event.updated_at) }),
        event.onset ? [el("dt", { text: "onset" }), el("dd", { class: "onset", text: event.onset.summary })] : "",
        (event.incidents || []).flatMap((incident) => [el("dt", { text: "incident bundle" }), el("dd", {}, incidentLine(incident))]),
      ),
      el(
        "div",
        { class: "toolbar" },
        el("button", { type: "button", onclick: () => zoom(Math.max(0, event.first_step - span), event.last_step + span) }, "Zoom to event"),
        event.layer ? el("button", { type: "button", onclick: () => openLayer(event.layer) }, "Open layer") : "",
        el("button", { type: "button", onclick: () => ($.details.hidden = true) }, "Close"),
      ),
    );
  };

  async function fetchSeries(metric, layer, points) {
    return get(`/runs/${runId}/series`, {
      metric,
      layer,
      start: state.from,
      end: state.to,
      max_points: points,
    });
  }

  async function refresh({ heatmap = false } = {}) {
    const points = Math.min(2000, Math.max(200, Math.round(($.normChart.clientWidth || 900) * 1.5)));
    const [run, health, events, layers, gn, gnc, coef, loss, skipped] = await Promise.all([
      get(`/runs/${runId}`),
      get(`/runs/${runId}/health`, { worst: 5 }),
      getAll(`/runs/${runId}/events`, { limit: 1000 }, "events", 2000),
      get(`/runs/${runId}/layers`),
      fetchSeries("global_norm", null, points),
      fetchSeries("global_norm_clipped", null, points),
      fetchSeries("clip_coef", null, points),
      fetchSeries("loss", null, points),
      fetchSeries("skipped", null, points),
    ]);
    if (stopped) return;
    data = { ...data, run, health, events, layers, gn, gnc, coef, loss, skipped };
    if (state.layer) {
      const [g, w, u] = await Promise.all(
        ["grad_norm", "weight_norm", "update_ratio"].map((m) => fetchSeries(m, state.layer, points).catch(() => null)),
      );
      data.layerSeries = { g, w, u };
    }
    drawHeader();
    drawCharts();
    drawEvents();
    $.layers.replaceChildren(layerTable(layers.layers, events, state.layer, openLayer));
    if (!window.gradwatchTimings) {
      // Read by tests and bench/ui.py: first paint with data, since navigation started.
      window.gradwatchTimings = { chartsMs: performance.now() };
    }
    if (heatmap || !data.heatmap) await loadHeatmap();
  }

  async function loadHeatmap() {
    const buckets = Math.min(1000, Math.max(100, Math.round(($.heat.clientWidth || 900) - 200)));
    const fetched = performance.now();
    const heat = await get(`/runs/${runId}/heatmap`, { metric: "grad_norm", start: state.from, end: state.to, buckets });
    if (stopped) return;
    data.heatmap = heat;
    const fetchMs = performance.now() - fetched;
    const drawn = drawHeatmap($.heat, heat, { events: data.events, selectedLayer: state.layer, onZoom: zoom, onLayer: openLayer });
    $.heatInfo.textContent = `${heat.layers.length} layers × ${heat.step.length} buckets of ${fmt(heat.bucket_width)} steps · fetched in ${fetchMs.toFixed(0)} ms, drawn in ${drawn.renderMs.toFixed(0)} ms`;
    const timings = window.gradwatchTimings || {};
    if (timings.heatmapMs === undefined) {
      Object.assign(timings, { heatmapMs: performance.now(), heatmapFetchMs: fetchMs, heatmapDrawMs: drawn.renderMs });
    }
    document.body.dataset.heatmapReady = "1";
  }

  function drawHeader() {
    const { run, health } = data;
    $.title.replaceChildren(`${run.name} `, verdictBadge(health.verdict), el("span", { class: "muted", text: ` ${run.project} · ${shortId(run.run_id)}` }));
    document.title = `${run.name} · gradwatch`;
    const item = (label, value, cls) => el("div", { class: cls }, el("b", { text: value }), label);
    $.summary.replaceChildren(
      item("status", run.status, `status-${run.status}`),
      item("steps", fmt(run.num_steps)),
      item("last step", `${fmt(run.last_step)} · ${ago(run.last_ingest_at)}`),
      item("layers", fmt(run.num_layers)),
      item("max global norm", fmt(run.max_global_norm)),
      item("clipped steps", fmt(run.clipped_steps)),
      item("skipped steps", fmt(run.skipped_steps)),
      item("non-finite steps", fmt(run.nonfinite_steps), run.nonfinite_steps ? "trouble" : ""),
    );
    const fired = Object.entries(health.detections)
      .map(([rule, bySeverity]) => [rule, Object.values(bySeverity).reduce((a, b) => a + b, 0)])
      .filter(([, n]) => n);
    $.health.replaceChildren(
      el("p", {}, "Verdict: ", verdictBadge(health.verdict), el("span", { class: "muted", text: " (events reaching the last 1000 steps)" })),
      fired.length ? el("p", { text: `Detections: ${fired.map(([r, n]) => `${r} ${n}`).join(", ")}` }) : el("p", { class: "muted", text: "No detections." }),
      health.worst_layers.length
        ? el("p", {}, "Worst layers: ", ...health.worst_layers.map((l, i) => [i ? ", " : "", el("a", { href: "#", onclick: (e) => { e.preventDefault(); openLayer(l.layer); }, text: `${l.layer} (${l.detections})` })]))
        : "",
      health.onset ? el("p", { class: "onset", text: `Onset: ${health.onset}` }) : "",
      ...(health.incidents || []).map((incident) => el("p", { class: "incident", dataset: { step: incident.step } }, "Incident bundle: ", incidentLine(incident))),
    );
    $.range.textContent = state.from !== null || state.to !== null ? `steps ${fmt(state.from ?? 0)}–${state.to === null ? "end" : fmt(state.to)}` : "whole run";
  }

  function drawCharts() {
    if (!data.run) return;
    const runEvents = data.events;
    const gn = seriesXY(data.gn, "max");
    const common = {
      log: state.log,
      syncKey: `run-${runId}`,
      onZoom: zoom,
      onEvent: showEvent,
      range: state.from !== null || state.to !== null ? [state.from ?? gn[0][0] ?? 0, state.to ?? gn[0][gn[0].length - 1] ?? 1] : null,
    };
    const skipped = seriesXY(data.skipped, "max");
    lineChart($.normChart, {
      ...common,
      xy: [gn, seriesXY(data.gnc, "max"), seriesXY(data.coef, "min")],
      series: [
        { label: "global norm", color: COLORS[0] },
        { label: "after clipping", color: COLORS[2] },
        { label: "clip coefficient", color: COLORS[3], scale: "ratio", width: 1 },
      ],
      events: runEvents,
      skipped: skipped[0].filter((s, i) => skipped[1][i] > 0),
      nonfinite: nonFiniteSteps(gn),
      height: 260,
    });
    lineChart($.lossChart, {
      ...common,
      xy: [seriesXY(data.loss, "max")],
      series: [{ label: "loss", color: COLORS[4] }],
      events: [],
      height: 160,
    });
    drawLayer();
  }

  function drawLayer() {
    if (!state.layer || !data.layerSeries) {
      $.layerPanel.hidden = true;
      return;
    }
    const { g, w, u } = data.layerSeries;
    const chart = el("div", { class: "chart", id: "layer-chart" });
    const close = el("button", { type: "button", text: "Close", onclick: () => { state.layer = null; setQuery({ layer: null }, { push: true }); $.layerPanel.hidden = true; drawHeatmapOnly(); } });
    $.layerPanel.hidden = false;
    $.layerPanel.replaceChildren(
      el("div", { class: "toolbar" }, el("h2", { id: "layer-title", text: `Layer ${state.layer}` }), close),
      chart,
    );
    const gxy = seriesXY(g, "max");
    lineChart(chart, {
      log: state.log,
      syncKey: `run-${runId}`,
      onZoom: zoom,
      onEvent: showEvent,
      range: state.from !== null || state.to !== null ? [state.from ?? 0, state.to ?? gxy[0][gxy[0].length - 1] ?? 1] : null,
      xy: [gxy, seriesXY(w, "last"), seriesXY(u, "max")],
      series: [
        { label: "grad norm", color: COLORS[0] },
        { label: "weight norm", color: COLORS[2], sparse: true },
        { label: "update ratio", color: COLORS[3], scale: "ratio", sparse: true },
      ],
      events: data.events.filter((e) => e.layer === state.layer),
      nonfinite: nonFiniteSteps(gxy),
      height: 220,
    });
  }

  function drawHeatmapOnly() {
    if (data.heatmap) drawHeatmap($.heat, data.heatmap, { events: data.events, selectedLayer: state.layer, onZoom: zoom, onLayer: openLayer });
    $.layers.replaceChildren(layerTable(data.layers.layers, data.events, state.layer, openLayer));
  }

  function drawEvents() {
    const items = data.events.map((event) =>
      el(
        "li",
        { dataset: { eventId: event.id }, onclick: () => showEvent(event) },
        el("span", { class: `sev-${event.severity}`, text: event.rule }),
        ` step ${fmt(event.first_step)}${event.last_step !== event.first_step ? `–${fmt(event.last_step)}` : ""} · ${event.layer || "run"} · ×${event.count}`,
        event.incidents && event.incidents.length ? el("span", { class: "bundle-mark", title: "an incident bundle was written for a step of this event", text: " · bundle" }) : "",
      ),
    );
    $.events.replaceChildren(items.length ? el("ul", {}, items) : el("p", { class: "muted", text: "No events." }));
  }

  async function poll() {
    polls += 1;
    await refresh({ heatmap: polls % HEATMAP_EVERY === 0 });
    schedule();
  }
  function schedule() {
    const live = data.run && data.run.status === "running";
    setLive(live);
    if (live && !stopped) timer = setTimeout(() => guarded(poll), POLL_MS);
  }

  await refresh({ heatmap: true });
  document.body.dataset.runReady = "1";
  schedule();
  const onResize = () => drawCharts();
  window.addEventListener("resize", onResize);
  return {
    stop() {
      stopped = true;
      clearTimeout(timer);
      setLive(false);
      window.removeEventListener("resize", onResize);
      delete document.body.dataset.runReady;
      delete document.body.dataset.heatmapReady;
      delete window.gradwatchTimings;
    },
  };
}

const CAUSES = { nonfinite: "non-finite gradient", skipped: "skipped by the policy", explosion: "exploding gradient" };

// One incident bundle: the step, why, where it lies and the command that replays it there.
function incidentLine(incident) {
  const command = el("code", { class: "replay", text: incident.replay });
  const copy = el("button", {
    type: "button",
    class: "copy",
    title: "Copy the replay command",
    onclick: async (e) => {
      e.stopPropagation();
      try {
        await navigator.clipboard.writeText(incident.replay);
        copy.textContent = "Copied";
      } catch {
        window.getSelection().selectAllChildren(command); // no clipboard: select it for Ctrl+C
      }
    },
  }, "Copy");
  const where = `${incident.host || "the training host"}:${incident.path}`;
  const steps = (incident.recorded && incident.recorded.step) || [];
  const around = steps.length && steps[steps.length - 1] > incident.step ? "Around it" : "Before it";
  return [
    `step ${fmt(incident.step)} (${CAUSES[incident.cause] || incident.cause}), ${(incident.bytes / 2 ** 20).toFixed(1)} MiB on `,
    el("span", { class: "path", text: where }),
    ". Replay there: ",
    command,
    " ",
    copy,
    ...[incident.learning_rate_history, incident.loss_scale_history]
      .filter(Boolean)
      .map((line) => el("span", { class: "recorded muted", text: `${around}: ${line}.` })),
  ];
}
