// The REST client of the UI: /api/v1 only, with the read token of this browser tab.
// Non-finite numbers arrive as the strings "NaN", "Infinity", "-Infinity" (the wire format).

const TOKEN_KEY = "gradwatch.token";

export class AuthRequired extends Error {}

export function getToken() {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function setToken(token) {
  if (token) sessionStorage.setItem(TOKEN_KEY, token);
  else sessionStorage.removeItem(TOKEN_KEY);
  document.getElementById("sign-out").hidden = !token;
}

/** A number from the wire: "NaN"/"Infinity"/"-Infinity" strings become numbers. */
export function num(value) {
  if (typeof value === "string") {
    if (value === "NaN") return NaN;
    if (value === "Infinity") return Infinity;
    if (value === "-Infinity") return -Infinity;
  }
  return value;
}

/** GET /api/v1<path> as JSON; throws AuthRequired on 401/403 (asks for a token). */
export async function get(path, params = {}) {
  const url = new URL(`/api/v1${path}`, location.origin);
  for (const [key, value] of Object.entries(params)) {
    if (value === undefined || value === null || value === "") continue;
    if (Array.isArray(value)) value.forEach((v) => url.searchParams.append(key, v));
    else url.searchParams.set(key, value);
  }
  const headers = { Accept: "application/json" };
  const token = getToken();
  if (token) headers.Authorization = `Bearer ${token}`;
  const response = await fetch(url, { headers });
  if (response.status === 401 || (response.status === 403 && !token)) {
    throw new AuthRequired((await response.json().catch(() => ({}))).detail || "token required");
  }
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    const error = new Error(body.detail || `${response.status} ${response.statusText}`);
    error.status = response.status;
    throw error;
  }
  return response.json();
}

/** Every page of a keyset-paged list (runs, events), up to `max` items. */
export async function getAll(path, params, key, max = 5000) {
  const items = [];
  let cursor;
  do {
    const page = await get(path, { ...params, cursor });
    items.push(...page[key]);
    cursor = page.next_cursor;
  } while (cursor && items.length < max);
  return items;
}

/** Ask for a token in the dialog; resolves once one is stored. */
export function askToken(message) {
  const dialog = document.getElementById("token-dialog");
  const error = document.getElementById("token-error");
  error.hidden = !message || !getToken();
  error.textContent = getToken() ? `The token was refused: ${message}` : "";
  setToken(null);
  return new Promise((resolve) => {
    const form = document.getElementById("token-form");
    form.onsubmit = (event) => {
      event.preventDefault();
      const value = document.getElementById("token-input").value.trim();
      if (!value) return;
      setToken(value);
      dialog.close();
      resolve();
    };
    if (!dialog.open) dialog.showModal();
  });
}
