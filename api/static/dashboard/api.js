// The JSON API as the dashboard calls it: the key from this browser session, JSON in and out, errors as text.
//
// The key lives in sessionStorage (gone when the tab's session ends) and travels only in the Authorization
// header: no cookie, so no other site's page can make this browser act with it.

const KEY_ITEM = "nightrender.apiKey";

export class ApiError extends Error {
  constructor(status, detail) {
    super(detail);
    this.status = status;
  }
}

export function storedKey() {
  return sessionStorage.getItem(KEY_ITEM);
}

export function storeKey(key) {
  if (key) sessionStorage.setItem(KEY_ITEM, key);
  else sessionStorage.removeItem(KEY_ITEM);
}

function headers(extra = {}) {
  const key = storedKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

// Every 401 reaches the app, which asks for a key again.
export const unauthorized = new EventTarget();

async function send(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { ...options, headers: headers(options.headers) });
  } catch (error) {
    throw new ApiError(0, `the API did not answer (${error.message})`);
  }
  if (response.status === 401) unauthorized.dispatchEvent(new Event("unauthorized"));
  if (!response.ok) throw new ApiError(response.status, await problemText(response));
  return response;
}

async function problemText(response) {
  try {
    const body = await response.json();
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) {
      return body.detail.map((e) => `${(e.loc || []).slice(1).join(".")}: ${e.msg}`).join("; ");
    }
  } catch {
    // not JSON: the status line says enough
  }
  return `${response.status} ${response.statusText}`;
}

export async function getJson(path) {
  return (await send(path)).json();
}

export async function postJson(path, body = {}) {
  const options = {
    method: "POST",
    body: JSON.stringify(body),
    headers: { "Content-Type": "application/json" },
  };
  return (await send(path, options)).json();
}

export async function postForm(path, form) {
  return (await send(path, { method: "POST", body: form })).json();
}

// An image or file fetched with the key, as an object URL the caller must revoke.
export async function blobUrl(path) {
  const blob = await (await send(path)).blob();
  return URL.createObjectURL(blob);
}

// Save a file the API serves (the key rides in the header, so a plain link would not do).
export async function download(path, filename, onProgress) {
  const response = await send(path);
  const expected = Number(response.headers.get("X-Archive-Estimated-Bytes")) || 0;
  const reader = response.body.getReader();
  const parts = [];
  let received = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    parts.push(value);
    received += value.length;
    if (onProgress) onProgress(received, expected);
  }
  const url = URL.createObjectURL(new Blob(parts));
  const link = Object.assign(document.createElement("a"), { href: url, download: filename });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}
