// The runs list: newest first, filters in the URL, paged, auto-refresh while runs are live.

import { get } from "./api.js";
import { guarded, navigate, setLive } from "./app.js";
import { ago, el, fmt, verdictBadge } from "./format.js";

const PAGE = 25;
const REFRESH_MS = 5000;

export async function renderRuns(view, params) {
  const filters = {
    project: params.get("project") || "",
    status: params.get("status") || "",
    name: params.get("name") || "",
  };
  const cursor = params.get("cursor") || "";
  const form = el(
    "form",
    { class: "filters", id: "run-filters" },
    el("label", {}, "project", el("input", { name: "project", value: filters.project, size: 14 })),
    el(
      "label",
      {},
      "status",
      el(
        "select",
        { name: "status" },
        ["", "running", "finished", "failed"].map((s) =>
          el("option", { value: s, selected: s === filters.status }, s || "any"),
        ),
      ),
    ),
    el("label", {}, "name contains", el("input", { name: "name", value: filters.name, size: 18 })),
    el("button", { type: "submit" }, "Filter"),
    el("span", { class: "spacer" }),
    el("button", { type: "button", id: "compare-selected", disabled: true }, "Compare selected"),
  );
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const data = new FormData(form);
    const query = new URLSearchParams();
    for (const key of ["project", "status", "name"]) {
      if (data.get(key)) query.set(key, data.get(key));
    }
    navigate(`/${query.toString() ? `?${query}` : ""}`);
  });
  const body = el("tbody");
  const table = el(
    "table",
    { id: "runs-table" },
    el(
      "thead",
      {},
      el(
        "tr",
        {},
        el("th", {}, ""),
        ["name", "project", "status", "health"].map((h) => el("th", { text: h })),
        ["steps", "last step", "max global norm", "clipped", "skipped", "non-finite"].map((h) =>
          el("th", { class: "num", text: h }),
        ),
      ),
    ),
    body,
  );
  const pager = el("div", { class: "pager" });
  view.append(el("h1", { text: "Runs" }), form, table, pager);

  const selected = new Set();
  const compareButton = form.querySelector("#compare-selected");
  compareButton.addEventListener("click", () =>
    navigate(`/compare?runs=${[...selected].join(",")}`),
  );

  let timer = null;
  let stopped = false;
  async function load() {
    const page = await get("/runs", { ...filters, cursor, limit: PAGE });
    const healths = await Promise.all(
      page.runs.map((run) =>
        get(`/runs/${run.run_id}/health`, { worst: 0 }).catch(() => ({ verdict: "unknown" })),
      ),
    );
    if (stopped) return;
    body.replaceChildren(
      ...page.runs.map((run, i) => runRow(run, healths[i].verdict, selected, compareButton)),
    );
    if (!page.runs.length) {
      body.append(el("tr", {}, el("td", { colspan: 11, class: "muted", text: "No runs yet." })));
    }
    pager.replaceChildren(
      cursor ? el("a", { href: pageUrl(filters, ""), text: "« newest" }) : "",
      page.next_cursor ? el("a", { href: pageUrl(filters, page.next_cursor), text: "older »" }) : "",
    );
    const live = page.runs.some((run) => run.status === "running");
    setLive(live);
    if (live && !stopped) timer = setTimeout(() => guarded(load), REFRESH_MS);
  }
  await load();
  return {
    stop() {
      stopped = true;
      clearTimeout(timer);
      setLive(false);
    },
  };
}

function pageUrl(filters, cursor) {
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(filters)) if (value) query.set(key, value);
  if (cursor) query.set("cursor", cursor);
  return `/${query.toString() ? `?${query}` : ""}`;
}

function runRow(run, verdict, selected, compareButton) {
  const box = el("input", {
    type: "checkbox",
    "aria-label": `select ${run.name}`,
    checked: selected.has(run.run_id),
  });
  box.addEventListener("change", () => {
    if (box.checked) selected.add(run.run_id);
    else selected.delete(run.run_id);
    compareButton.disabled = selected.size < 2 || selected.size > 8;
  });
  return el(
    "tr",
    { dataset: { runId: run.run_id, name: run.name } },
    el("td", {}, box),
    el("td", {}, el("a", { href: `/runs/${run.run_id}`, text: run.name })),
    el("td", { text: run.project }),
    el("td", { class: `status-${run.status}`, text: run.status }),
    el("td", { class: "health" }, verdictBadge(verdict)),
    el("td", { class: "num", text: fmt(run.num_steps) }),
    el("td", { class: "num", title: run.last_ingest_at || "" }, `${fmt(run.last_step)} · ${ago(run.last_ingest_at)}`),
    el("td", { class: "num", text: fmt(run.max_global_norm) }),
    el("td", { class: "num", text: fmt(run.clipped_steps) }),
    el("td", { class: "num", text: fmt(run.skipped_steps) }),
    el("td", { class: `num ${run.nonfinite_steps ? "trouble" : ""}`, text: fmt(run.nonfinite_steps) }),
  );
}
