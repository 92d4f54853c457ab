// The single-page router: the URL is the whole view state (see server/ui/routes.py).
//   /                       runs list (?project=&status=&name=)
//   /runs/<id>              a run (?layer=<name>&from=<step>&to=<step>&log=0)
//   /compare?runs=<id>,…    2–8 runs overlaid

import { AuthRequired, askToken, getToken, setToken } from "./api.js";
import { el } from "./format.js";
import { renderCompare } from "./compare.js";
import { renderRun } from "./run.js";
import { renderRuns } from "./runs.js";

let current = null; // { stop() } of the view on screen

export function navigate(url, { replace = false } = {}) {
  if (replace) history.replaceState(null, "", url);
  else history.pushState(null, "", url);
  route();
}

/** Change the query of the current URL without a new view (in-view state, e.g. a zoom). */
export function setQuery(changes, { push = false } = {}) {
  const url = new URL(location.href);
  for (const [key, value] of Object.entries(changes)) {
    if (value === null || value === undefined || value === "" || value === false) {
      url.searchParams.delete(key);
    } else url.searchParams.set(key, value === true ? "1" : value);
  }
  if (push) history.pushState(null, "", url);
  else history.replaceState(null, "", url);
}

async function route() {
  if (current) current.stop();
  current = null;
  const view = document.getElementById("view");
  view.replaceChildren();
  const path = location.pathname;
  const params = new URLSearchParams(location.search);
  for (const link of document.querySelectorAll("[data-nav]")) {
    link.classList.toggle(
      "active",
      (link.dataset.nav === "runs" && path === "/") || path.startsWith(`/${link.dataset.nav}`),
    );
  }
  const match = path.match(/^\/runs\/([0-9a-fA-F-]{36})\/?$/);
  try {
    if (path === "/") current = await renderRuns(view, params);
    else if (match) current = await renderRun(view, match[1], params);
    else if (path === "/compare") current = await renderCompare(view, params);
    else view.append(el("p", { class: "error", text: `No page at ${path}.` }));
  } catch (error) {
    if (error instanceof AuthRequired) {
      await askToken(error.message);
      return route();
    }
    view.append(el("p", { class: "error", text: `Could not load: ${error.message}` }));
    console.warn(error);
  }
}

/** Run `task` now; on an AuthRequired error ask for a token and run the page again. */
export async function guarded(task) {
  try {
    return await task();
  } catch (error) {
    if (error instanceof AuthRequired) {
      await askToken(error.message);
      route();
      return undefined;
    }
    throw error;
  }
}

export function setLive(on) {
  document.getElementById("live").hidden = !on;
}

document.addEventListener("click", (event) => {
  const link = event.target.closest("a[href]");
  if (!link || event.defaultPrevented || event.button !== 0) return;
  if (event.metaKey || event.ctrlKey || event.shiftKey || link.target) return;
  const url = new URL(link.href);
  if (url.origin !== location.origin) return;
  if (!(url.pathname === "/" || url.pathname.startsWith("/runs/") || url.pathname === "/compare")) {
    return;
  }
  event.preventDefault();
  navigate(url.pathname + url.search);
});

window.addEventListener("popstate", () => route());
document.getElementById("sign-out").addEventListener("click", () => {
  setToken(null);
  route();
});
setToken(getToken());
route();
