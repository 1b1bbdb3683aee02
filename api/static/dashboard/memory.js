// Memory: the measured "VRAM by resolution" table from /v1/stats, drawn as charts by size and plan (rung),
// with the worker's budget from /v1/workers as a line.

import { getJson } from "./api.js";
import { categoryChart } from "./charts.js";
import { formatBytes, formatSeconds, formatTime, h, table } from "./dom.js";

export function memoryPage(main) {
  let charts = [];
  let shown = "";
  const body = h("div");
  main.append(h("h1", {}, "Memory by resolution"), body);

  async function refresh() {
    const [stats, workers] = await Promise.all([getJson("v1/stats"), getJson("v1/workers")]);
    const key = JSON.stringify([
      stats.rows,
      workers.workers.map((w) => [w.node, w.state, w.live, w.vram_budget_bytes]),
    ]);
    if (key === shown) return;
    shown = key;
    render(stats.rows, workers.workers);
  }

  function render(rows, workers) {
    for (const chart of charts) chart.destroy();
    charts = [];
    const worker = workers.find((w) => w.live) || workers[0] || null;
    const budget = worker ? worker.vram_budget_bytes : null;
    body.replaceChildren(
      h(
        "p",
        {},
        budget
          ? `The budget line is ${worker.node}'s VRAM budget on ${worker.device_name}: ${formatBytes(budget)}.`
          : "No worker has reported a VRAM budget (a CPU worker has none).",
      ),
    );
    if (!rows.length) {
      body.append(h("p", { class: "muted" }, "Nothing measured yet: the table fills as jobs succeed."));
    } else {
      drawCharts(rows, budget);
      body.append(Object.assign(statsTable(rows), { id: "stats-table" }));
    }
    body.append(h("h2", {}, "Workers"), workersTable(workers));
  }

  function drawCharts(rows, budget) {
    const sizes = [...new Map(rows.map((r) => [`${r.width}×${r.height}`, r.width * r.height])).entries()]
      .sort((a, b) => a[1] - b[1])
      .map(([label]) => label);
    const devices = new Set(rows.map((r) => r.device_name));
    const seriesName = (r) => (devices.size > 1 ? `${r.rung} (${r.device_name})` : r.rung);
    const names = [...new Set(rows.map(seriesName))];
    const valuesOf = (field) =>
      names.map((name) => ({
        label: name,
        values: sizes.map((size) => {
          const row = rows.find((r) => seriesName(r) === name && `${r.width}×${r.height}` === size);
          return row ? row[field] : null;
        }),
      }));
    const section = h("section", { id: "memory-charts", "aria-label": "Charts" });
    body.append(section);
    if (rows.some((r) => r.peak_reserved_bytes_max)) {
      charts.push(
        categoryChart(section, {
          title: "Peak reserved VRAM by size and plan",
          labels: sizes,
          xLabel: "size",
          yLabel: "memory",
          bars: false,
          format: formatBytes,
          series: valuesOf("peak_reserved_bytes_max"),
          limit: budget ? { label: "VRAM budget", value: budget } : null,
        }),
      );
    } else {
      section.append(
        h(
          "p",
          { id: "no-vram", class: "muted" },
          "No VRAM measured yet: jobs rendered on the CPU record none.",
        ),
      );
    }
    charts.push(
      categoryChart(section, {
        title: "Seconds per image by size and plan",
        labels: sizes,
        xLabel: "size",
        yLabel: "seconds",
        bars: false,
        format: (v) => formatSeconds(v),
        series: valuesOf("seconds_per_image_mean"),
        limit: null,
      }),
    );
  }

  return {
    refresh,
    destroy() {
      for (const chart of charts) chart.destroy();
    },
  };
}

function statsTable(rows) {
  return table(
    [
      "Size",
      "Plan (rung)",
      "Device",
      "Jobs",
      "Peak allocated (max)",
      "Peak reserved (max)",
      "Peak reserved (mean)",
      "s/image",
      "Denoise s",
    ],
    rows.map((r) => [
      `${r.width}×${r.height}`,
      r.rung,
      r.device_name,
      String(r.jobs),
      formatBytes(r.peak_allocated_bytes_max),
      formatBytes(r.peak_reserved_bytes_max),
      formatBytes(r.peak_reserved_bytes_mean),
      formatSeconds(r.seconds_per_image_mean),
      formatSeconds(r.denoise_seconds_mean),
    ]),
    "Measured on succeeded jobs",
  );
}

function workersTable(workers) {
  if (!workers.length) return h("p", { class: "muted" }, "No worker has reported yet.");
  return table(
    ["Worker", "Host", "State", "Model", "Device", "VRAM budget", "Last heard", "Live"],
    workers.map((w) => [
      w.node,
      w.host,
      w.state,
      `${w.model || "—"} ${w.dtype ? `(${w.dtype})` : ""}`,
      w.gpu_index === null || w.gpu_index === undefined
        ? w.device_name || "—"
        : `GPU ${w.gpu_index}: ${w.device_name || "—"}`,
      formatBytes(w.vram_budget_bytes),
      formatTime(w.beat_at),
      w.live ? "yes" : "no",
    ]),
    "Workers, newest first",
  );
}
