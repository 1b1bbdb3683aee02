// Job: the image, its parameters, memory and time per phase as charts, the plan, its attempts (out-of-memory
// retries included) and how many transformer blocks stayed resident or were streamed.

import { blobUrl, download, getJson, postJson } from "./api.js";
import { categoryChart } from "./charts.js";
import {
  actionButton,
  definitionList,
  formatBytes,
  formatSeconds,
  formatTime,
  h,
  notify,
  setText,
  shortId,
  statusBadge,
  table,
} from "./dom.js";

const PHASES = ["load", "place", "encode", "denoise", "decode", "save"];

export function jobPage(main, { id }) {
  let charts = [];
  let imageUrl = null;
  let shownAs = "";
  const progress = h("span", { id: "job-progress" });
  const body = h("div");
  main.append(h("p", { class: "crumbs" }, h("a", { href: "#/" }, "Queue"), " / job"), body);

  async function refresh() {
    const job = await getJson(`v1/jobs/${id}`);
    setText(progress, job.status === "running" ? `step ${job.progress.step} of ${job.progress.total}` : "");
    const key = `${job.status}|${job.memory ? job.memory.recorded_at : ""}`;
    if (key === shownAs) return;
    shownAs = key;
    if (job.status === "succeeded" && !imageUrl)
      imageUrl = await blobUrl(`v1/jobs/${id}/image`).catch(() => null);
    render(job);
  }

  function render(job) {
    for (const chart of charts) chart.destroy();
    charts = [];
    const memory = job.memory;
    const parts = [
      h("h1", {}, `Job ${shortId(job.id)} `, statusBadge(job.status), " ", progress),
      job.error ? h("p", { class: "error", id: "job-error" }, job.error) : null,
      h("div", { class: "toolbar" }, actions(job)),
      h(
        "div",
        { class: "job-top" },
        picture(job),
        h("section", { "aria-label": "Parameters" }, h("h2", {}, "Parameters"), parameters(job)),
      ),
      h(
        "section",
        { id: "job-memory", "aria-label": "Memory and time" },
        h("h2", {}, "Memory and time per phase"),
        memory
          ? null
          : h(
              "p",
              { class: "muted" },
              "Nothing measured yet: the worker records memory and time when the job ends.",
            ),
      ),
      memory ? planSection(memory) : null,
    ];
    body.replaceChildren(...parts.filter(Boolean));
    if (memory) drawCharts(memory, document.getElementById("job-memory"));
  }

  function actions(job) {
    const active = job.status === "queued" || job.status === "running";
    const retryable = job.status === "failed" || job.status === "cancelled";
    return [
      job.batch_id ? h("a", { class: "button", href: `#/batch/${job.batch_id}` }, "Back to the batch") : null,
      active ? actionButton("Cancel job", () => act("cancel"), { id: "cancel-job" }) : null,
      retryable ? actionButton("Retry job", () => act("retry"), { id: "retry-job" }) : null,
      job.status === "succeeded"
        ? actionButton("Download PNG", () => download(`v1/jobs/${id}/image`, `${id}.png`))
        : null,
    ];
  }

  function picture(job) {
    if (!imageUrl)
      return h(
        "div",
        { class: "image-placeholder" },
        job.status === "succeeded" ? "image not available" : `no image: ${job.status}`,
      );
    const small = job.params.width < 384 ? "small" : null;
    return h(
      "figure",
      { class: "job-image" },
      h("img", {
        src: imageUrl,
        alt: job.prompt,
        width: job.params.width,
        height: job.params.height,
        class: small,
      }),
    );
  }

  function parameters(job) {
    const p = job.params;
    return definitionList([
      ["Prompt", job.prompt],
      ["Negative prompt", p.negative_prompt || "—"],
      ["Size", `${p.width}×${p.height}`],
      ["Steps", String(p.steps)],
      ["Guidance", String(p.guidance_scale)],
      ["Seed", String(p.seed)],
      ["Model", `${p.model} (${p.dtype})`],
      ["Priority", String(job.priority)],
      ["Attempts", String(job.attempts)],
      ["Queue position", job.queue_position === null ? "—" : String(job.queue_position)],
      ["Created", formatTime(job.created_at)],
      ["Finished", formatTime(job.finished_at)],
      ["Retry of", job.retry_of ? h("a", { href: `#/job/${job.retry_of}` }, shortId(job.retry_of)) : "—"],
    ]);
  }

  function drawCharts(memory, section) {
    const times = PHASES.map((phase) => memory[`${phase}_s`]);
    charts.push(
      categoryChart(section, {
        title: "Seconds per phase",
        labels: PHASES,
        yLabel: "seconds",
        bars: true,
        format: (v) => formatSeconds(v),
        series: [{ label: "seconds", values: times }],
        limit: null,
      }),
    );
    const measures = [
      ["predicted peak", memory.predicted_peak_bytes],
      ["peak allocated", memory.peak_allocated_bytes],
      ["peak reserved", memory.peak_reserved_bytes],
      ["device used at start", memory.device_used_start_bytes],
      ["device used at end", memory.device_used_end_bytes],
      ["host RSS", memory.host_rss_bytes],
    ];
    const budget = memory.vram_budget_bytes;
    charts.push(
      categoryChart(section, {
        title: `Memory on ${memory.device_name}`,
        labels: measures.map(([name]) => name),
        yLabel: "memory",
        bars: true,
        format: formatBytes,
        series: [{ label: "bytes", values: measures.map(([, value]) => value) }],
        limit: budget ? { label: "VRAM budget", value: budget } : null,
      }),
    );
    section.append(
      table(
        ["Measure", "Value"],
        [
          ...measures.map(([name, value]) => [name, formatBytes(value)]),
          ["VRAM budget", formatBytes(budget)],
          ...PHASES.map((phase) => [`${phase} time`, formatSeconds(memory[`${phase}_s`])]),
        ],
        "The charts' numbers",
      ),
    );
  }

  async function act(action) {
    const answer = await postJson(`v1/jobs/${id}/${action}`);
    if (action === "retry") {
      notify("Queued again as a new job.");
      location.hash = `#/job/${answer.id}`;
      return;
    }
    notify("Job cancelled.");
    await refresh();
  }

  return {
    refresh,
    destroy() {
      for (const chart of charts) chart.destroy();
      if (imageUrl) URL.revokeObjectURL(imageUrl);
    },
  };
}

function planSection(memory) {
  const plan = memory.plan || {};
  const resident = plan.transformer_resident;
  const blocks = plan.transformer_blocks;
  const notes = plan.notes || {};
  return h(
    "section",
    { id: "job-plan", "aria-label": "Plan and attempts" },
    h("h2", {}, "Plan and attempts"),
    definitionList([
      ["Rung", memory.rung],
      ["Plan", plan.description || "—"],
      [
        "Transformer blocks",
        blocks ? `${resident} resident, ${blocks - resident} streamed (of ${blocks})` : "—",
      ],
      [
        "Text encoder",
        plan.text_encoder_streamed === undefined ? "—" : plan.text_encoder_streamed ? "streamed" : "resident",
      ],
      ["Streamed per step", formatBytes(plan.streamed_bytes_per_step)],
      ["Pinned host memory", formatBytes(plan.pinned_host_bytes)],
      ["VAE decode", plan.vae_tiled ? "tiled" : "whole"],
      ["Planned for", plan.planned_for ? plan.planned_for.join("×") : "—"],
      ["Compiled blocks", plan.compiled ? "yes" : "no"],
      ["Out-of-memory retries", String(memory.oom_attempts)],
      ["Shared encoder pass", notes.group ? `${notes.group} prompts` : "—"],
      ["Notes", [notes.retry, ...(notes.warnings || [])].filter(Boolean).join("; ") || "—"],
    ]),
    table(
      ["#", "Rung", "Plan", "Outcome", "Seconds"],
      (plan.attempts || []).map((a, i) => [
        String(i + 1),
        a.rung,
        a.plan,
        h("span", { class: a.outcome.startsWith("out of memory") ? "oom" : "" }, a.outcome),
        formatSeconds(a.seconds),
      ]),
      "Attempts, in order (an out-of-memory attempt is retried a rung lower)",
    ),
  );
}
