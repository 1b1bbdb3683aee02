// Small helpers: build elements without innerHTML (no markup from data, ever), and format numbers for people.

export function h(tag, attrs = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) element.addEventListener(name.slice(2), value);
    else if (name === "class") element.className = value;
    else if (name in element && typeof value !== "string") element[name] = value;
    else element.setAttribute(name, value === true ? "" : value);
  }
  element.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return element;
}

export function button(label, onClick, attrs = {}) {
  return h("button", { type: "button", ...attrs, onclick: onClick }, label);
}

// Runs an action once per click: the button is disabled while it runs, and errors are shown, not thrown.
export function actionButton(label, action, attrs = {}) {
  const element = button(
    label,
    async () => {
      element.disabled = true;
      try {
        await action();
      } catch (error) {
        notify(error.message, true);
      } finally {
        element.disabled = false;
      }
    },
    attrs,
  );
  return element;
}

export function notify(message, isError = false) {
  const box = document.getElementById("notice");
  box.textContent = message;
  box.classList.toggle("error", isError);
  clearTimeout(notify.timer);
  notify.timer = setTimeout(() => (box.textContent = ""), isError ? 10_000 : 4_000);
}

export function setText(element, text) {
  if (element.textContent !== text) element.textContent = text;
}

export const STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"];

export function statusBadge(status) {
  return h("span", { class: `status status-${status}` }, status);
}

export function countsText(counts) {
  const parts = STATUSES.filter((s) => counts[s]).map((s) => `${counts[s].toLocaleString()} ${s}`);
  return parts.join(" · ") || "no jobs";
}

export function formatBytes(bytes) {
  if (bytes === null || bytes === undefined) return "—";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(unit === 0 ? 0 : 1)} ${units[unit]}`;
}

export function formatSeconds(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 90) return `${seconds.toFixed(1)} s`;
  const minutes = Math.round(seconds / 60);
  if (minutes < 90) return `${minutes} min`;
  return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
}

export function formatEta(batch) {
  if (batch.status !== "queued" && batch.status !== "running") return "done";
  return batch.eta_seconds === null || batch.eta_seconds === undefined
    ? "unknown yet"
    : formatSeconds(batch.eta_seconds);
}

export function formatTime(iso) {
  if (!iso) return "—";
  return new Date(iso).toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

export function shortId(id) {
  return id.slice(0, 8);
}

export function table(headings, rows, caption) {
  return h(
    "table",
    {},
    caption ? h("caption", {}, caption) : null,
    h(
      "thead",
      {},
      h(
        "tr",
        {},
        headings.map((text) => h("th", { scope: "col" }, text)),
      ),
    ),
    h(
      "tbody",
      {},
      rows.map((cells) =>
        h(
          "tr",
          {},
          cells.map((cell) => h("td", {}, cell)),
        ),
      ),
    ),
  );
}

export function definitionList(pairs) {
  return h(
    "dl",
    {},
    pairs.flatMap(([term, value]) => [h("dt", {}, term), h("dd", {}, value)]),
  );
}
