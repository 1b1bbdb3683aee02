// Batch: its progress, a paginated gallery of cached thumbnails (never the full PNGs), failed jobs with their
// reasons and retry, and the zip.

import { blobUrl, download, getJson, postJson, storedKey } from "./api.js";
import {
  actionButton,
  countsText,
  formatBytes,
  formatEta,
  h,
  notify,
  setText,
  shortId,
  statusBadge,
} from "./dom.js";

const PER_PAGE = 48;

export function batchPage(main, { id }) {
  const thumbnails = new Map(); // job id -> object URL, revoked when the page goes
  // A thumbnail is fetched when its card comes near the screen: a page of 48 costs only what is seen.
  const waiting = new Map(); // picture element -> its job
  const nearScreen = new IntersectionObserver(showVisible, { rootMargin: "300px" });
  const cards = new Map(); // job id -> {element, status}
  const cursors = [null]; // cursors[i] opens page i
  let pageIndex = 0;
  let nextCursor = null;
  let lastCounts = "";
  let stale = true;

  const status = h("span", { id: "batch-status" });
  const progress = h("progress", { id: "batch-progress", max: 1, value: 0, "aria-label": "Batch progress" });
  const percent = h("span", { class: "percent" });
  const counts = h("span", { id: "batch-counts" });
  const eta = h("span", { id: "batch-eta" });
  // Queued jobs whose model no running worker serves: they wait (nothing fails) until one starts.
  const unserved = h("p", { class: "muted", id: "batch-unserved", "aria-live": "polite", hidden: true });
  const cancel = actionButton("Cancel batch", () => act("cancel"), { id: "cancel-batch", hidden: true });
  const retry = actionButton("Retry failed jobs", () => act("retry"), { id: "retry-batch", hidden: true });
  const gallery = h("ul", { class: "gallery", id: "gallery", "aria-label": "Jobs of this batch" });
  const pageLabel = h("span", { "aria-live": "polite" });
  const previous = actionButton("Previous page", () => turn(-1), { id: "previous-page", disabled: true });
  const next = actionButton("Next page", () => turn(1), { id: "next-page", disabled: true });

  main.append(
    h("p", { class: "crumbs" }, h("a", { href: "#/" }, "Queue"), " / batch"),
    h("h1", {}, `Batch ${shortId(id)}`),
    h(
      "div",
      { class: "batch-summary" },
      status,
      h("span", { class: "progress-cell" }, progress, percent),
      counts,
      h("span", {}, "ETA: ", eta),
    ),
    unserved,
    h("div", { class: "toolbar" }, cancel, retry, archiveControl()),
    h("h2", {}, "Images"),
    gallery,
    h("nav", { class: "pager", "aria-label": "Gallery pages" }, previous, pageLabel, next),
  );

  function archiveControl() {
    const name = `batch-${id}.zip`;
    // Without a key the browser can stream the zip to disk itself; with one the key must ride in a header.
    if (!storedKey())
      return h("a", { class: "button", href: `v1/batches/${id}/archive`, download: name }, "Download zip");
    const note = h("span", { class: "muted", "aria-live": "polite" });
    const start = actionButton(
      "Download zip",
      async () => {
        await download(`v1/batches/${id}/archive`, name, (got, expected) =>
          setText(
            note,
            expected ? `${formatBytes(got)} of about ${formatBytes(expected)}` : formatBytes(got),
          ),
        );
        setText(note, "saved");
      },
      { id: "download-zip" },
    );
    return h("span", {}, start, " ", note);
  }

  async function refresh() {
    const [batch, queue] = await Promise.all([getJson(`v1/batches/${id}`), getJson("v1/queue")]);
    if (status.dataset.status !== batch.status) {
      status.dataset.status = batch.status;
      status.replaceChildren(statusBadge(batch.status));
    }
    progress.value = batch.progress;
    setText(percent, `${Math.floor(batch.progress * 100)}%`);
    setText(counts, `${batch.total.toLocaleString()} jobs: ${countsText(batch.counts)}`);
    const active = batch.status === "queued" || batch.status === "running";
    setText(eta, queue.paused && active ? "paused (the queue is paused)" : formatEta(batch));
    const waiting = batch.unserved_models || [];
    unserved.hidden = !waiting.length;
    setText(
      unserved,
      waiting.length
        ? `Waiting: no running worker serves ${waiting.join(", ")}; those jobs stay queued until one starts.`
        : "",
    );
    cancel.hidden = !(batch.counts.queued + batch.counts.running);
    retry.hidden = !(batch.counts.failed + batch.counts.cancelled);
    setText(retry, `Retry failed jobs (${batch.counts.failed + batch.counts.cancelled})`);
    const countsNow = JSON.stringify(batch.counts);
    if (stale || countsNow !== lastCounts || batch.counts.running) await loadPage();
    lastCounts = countsNow;
  }

  async function loadPage() {
    const cursor = cursors[pageIndex];
    const page = await getJson(`v1/batches/${id}/jobs?limit=${PER_PAGE}${cursor ? `&cursor=${cursor}` : ""}`);
    stale = false;
    nextCursor = page.next_cursor;
    previous.disabled = pageIndex === 0;
    next.disabled = !nextCursor;
    setText(pageLabel, `Page ${pageIndex + 1}`);
    showJobs(page.jobs);
  }

  function showJobs(jobs) {
    const ids = jobs.map((job) => job.id);
    for (const job of jobs) {
      const known = cards.get(job.id);
      if (!known || known.status !== job.status)
        cards.set(job.id, { element: card(job), status: job.status });
    }
    const shown = ids.map((jobId) => cards.get(jobId).element);
    if ([...gallery.children].some((el, i) => el !== shown[i]) || gallery.children.length !== shown.length) {
      gallery.replaceChildren(...shown);
    }
  }

  function card(job) {
    const label = `Job ${job.batch_index + 1}: ${job.prompt}`;
    const picture = h(
      "div",
      { class: "thumb", "data-status": job.status },
      job.status === "succeeded" ? "" : job.status,
    );
    if (job.status === "succeeded") {
      waiting.set(picture, job);
      nearScreen.observe(picture);
    }
    return h(
      "li",
      { class: "card", "data-job": job.id, "data-status": job.status },
      h(
        "a",
        { href: `#/job/${job.id}`, class: "thumb-link", "aria-label": `${label} (open image and metadata)` },
        picture,
      ),
      h("p", { class: "prompt", title: job.prompt }, job.prompt),
      h("p", { class: "meta" }, `seed ${job.seed} · ${job.width}×${job.height} · `, statusBadge(job.status)),
      job.error ? h("p", { class: "error" }, job.error) : null,
      h(
        "p",
        { class: "card-actions" },
        h("a", { href: `#/job/${job.id}` }, "Image and metadata"),
        job.status === "succeeded"
          ? actionButton("PNG", () => download(`v1/jobs/${job.id}/image`, `${job.id}.png`), {
              "aria-label": `Download the PNG of job ${job.batch_index + 1}`,
            })
          : null,
        job.status === "failed" || job.status === "cancelled"
          ? actionButton("Retry", () => retryJob(job), { "aria-label": `Retry job ${job.batch_index + 1}` })
          : null,
      ),
    );
  }

  function showVisible(entries) {
    for (const entry of entries.filter((e) => e.isIntersecting && waiting.has(e.target))) {
      nearScreen.unobserve(entry.target);
      showThumbnail(waiting.get(entry.target), entry.target);
      waiting.delete(entry.target);
    }
  }

  async function showThumbnail(job, picture) {
    try {
      let url = thumbnails.get(job.id);
      if (!url) {
        url = await blobUrl(`v1/jobs/${job.id}/thumbnail`);
        thumbnails.set(job.id, url);
      }
      picture.replaceChildren(h("img", { src: url, alt: job.prompt }));
    } catch (error) {
      setText(picture, "no thumbnail");
    }
  }

  async function turn(step) {
    if (step > 0) cursors[pageIndex + 1] = nextCursor;
    pageIndex += step;
    stale = true;
    await loadPage();
    gallery.querySelector("a")?.focus();
  }

  async function act(action) {
    const answer = await postJson(`v1/batches/${id}/${action}`);
    notify(action === "retry" ? `${answer.retried} jobs queued again.` : "Batch cancelled.");
    stale = true;
    await refresh();
  }

  async function retryJob(job) {
    await postJson(`v1/jobs/${job.id}/retry`);
    notify(`Job ${job.batch_index + 1} queued again.`);
    stale = true;
    await refresh();
  }

  return {
    refresh,
    destroy() {
      nearScreen.disconnect();
      for (const url of thumbnails.values()) URL.revokeObjectURL(url);
    },
  };
}
