// Queue: the queue's switch (paused or running) and this key's batches, newest first, with live progress.

import { getJson, postJson } from "./api.js";
import {
  actionButton,
  countsText,
  STATUSES,
  formatEta,
  formatTime,
  h,
  notify,
  setText,
  shortId,
  statusBadge,
} from "./dom.js";

const PAGE = 20;
const MAX_SHOWN = 200;
const ACTIVE = new Set(["queued", "running"]);

export function queuePage(main) {
  const rows = new Map(); // batch id -> the row's elements and its last detail
  let shown = PAGE;
  let paused = false;
  const state = h("strong", { id: "queue-state" }, "…");
  const load = h("span", { id: "queue-load" });
  const pause = actionButton("Pause queue", () => switchQueue("pause"), { id: "pause-queue", hidden: true });
  const resume = actionButton("Resume queue", () => switchQueue("resume"), {
    id: "resume-queue",
    hidden: true,
  });
  const body = h("tbody", { id: "batch-rows" });
  const empty = h("p", { hidden: true }, "No batches yet. ", h("a", { href: "#/submit" }, "Submit one"), ".");
  const older = actionButton(
    "Show older batches",
    () => ((shown = Math.min(MAX_SHOWN, shown + PAGE)), refresh()),
    {
      hidden: true,
    },
  );
  main.append(
    h("h1", {}, "Queue"),
    h(
      "section",
      { class: "queue-switch", "aria-label": "Queue state" },
      "The queue is ",
      state,
      " ",
      load,
      " ",
      pause,
      resume,
    ),
    h(
      "table",
      { class: "batches" },
      h("caption", {}, "Your batches, newest first"),
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          ["Batch", "Created", "Priority", "Status", "Progress", "Jobs", "ETA", "Actions"].map((t) =>
            h("th", { scope: "col" }, t),
          ),
        ),
      ),
      body,
    ),
    empty,
    older,
  );

  async function switchQueue(action) {
    const answer = await postJson(`v1/queue/${action}`);
    notify(
      answer.paused ? "Queue paused: workers finish their current job and take no more." : "Queue resumed.",
    );
    await refresh();
  }

  async function refresh() {
    const [queue, page] = await Promise.all([getJson("v1/queue"), getJson(`v1/batches?limit=${shown}`)]);
    paused = queue.paused;
    setText(state, queue.paused ? "paused" : "running");
    state.className = queue.paused ? "paused" : "running";
    setText(load, `(${queue.queued} queued, ${queue.running} running)`);
    pause.hidden = queue.paused;
    resume.hidden = !queue.paused;
    empty.hidden = page.batches.length > 0;
    older.hidden = !page.next_cursor || shown >= MAX_SHOWN;
    await Promise.all(page.batches.map(refreshRow));
    placeRows(page.batches.map((b) => b.id));
  }

  async function refreshRow(summary) {
    let row = rows.get(summary.id);
    if (!row) {
      row = newRow(summary);
      rows.set(summary.id, row);
    }
    // A finished batch's detail is read once; an active one's every poll (its progress and ETA move).
    // The detail may be up to a second older than the list (the API caches it): it is read again until
    // its counts agree with the list's, so a batch never stays shown at a stale step.
    const agrees = row.detail && sameCounts(summary.counts, row.detail.counts);
    if (!agrees || ACTIVE.has(summary.status)) {
      row.detail = await getJson(`v1/batches/${summary.id}`);
    }
    updateRow(row, summary, row.detail);
  }

  function newRow(summary) {
    const row = {
      progress: h("progress", { max: 1, value: 0, "aria-label": `Progress of batch ${shortId(summary.id)}` }),
      percent: h("span", { class: "percent" }),
      status: h("span"),
      jobs: h("span"),
      eta: h("span"),
      cancel: actionButton("Cancel", () => act(summary.id, "cancel"), {
        "aria-label": `Cancel batch ${shortId(summary.id)}`,
      }),
      retry: actionButton("Retry", () => act(summary.id, "retry"), {
        "aria-label": `Retry failed and cancelled jobs of batch ${shortId(summary.id)}`,
      }),
    };
    row.element = h(
      "tr",
      { "data-batch": summary.id },
      h("td", {}, h("a", { href: `#/batch/${summary.id}` }, shortId(summary.id))),
      h("td", {}, formatTime(summary.created_at)),
      h("td", {}, String(summary.priority)),
      h("td", {}, row.status),
      h("td", { class: "progress-cell" }, row.progress, row.percent),
      h("td", {}, row.jobs),
      h("td", {}, row.eta),
      h("td", { class: "actions" }, row.cancel, row.retry),
    );
    return row;
  }

  function updateRow(row, summary, detail) {
    row.progress.value = detail.progress;
    setText(row.percent, `${Math.floor(detail.progress * 100)}%`);
    if (row.status.dataset.status !== detail.status) {
      row.status.dataset.status = detail.status;
      row.status.replaceChildren(statusBadge(detail.status));
    }
    setText(row.jobs, `${detail.total.toLocaleString()}: ${countsText(detail.counts)}`);
    // While paused nothing moves, so no ETA is honest (the CLI says the same).
    setText(row.eta, paused && ACTIVE.has(detail.status) ? "paused" : formatEta(detail));
    row.cancel.hidden = !(detail.counts.queued + detail.counts.running);
    row.retry.hidden = !(detail.counts.failed + detail.counts.cancelled);
  }

  function placeRows(ids) {
    // Rows move only when the order changes: moving a node takes the keyboard focus off its buttons.
    const current = [...body.children].map((tr) => tr.dataset.batch);
    if (current.join() === ids.join()) return;
    body.replaceChildren(...ids.map((id) => rows.get(id).element));
  }

  async function act(batchId, action) {
    const answer = await postJson(`v1/batches/${batchId}/${action}`);
    notify(
      action === "retry" ? `${answer.retried} jobs queued again.` : `Batch ${shortId(batchId)} cancelled.`,
    );
    await refresh();
  }

  return { refresh, destroy() {} };
}

function sameCounts(a, b) {
  return STATUSES.every((status) => (a[status] || 0) === (b[status] || 0));
}
