// Charts drawn with the vendored uPlot (a global from vendor/uPlot.iife.min.js): categories along x, bars or
// lines up y, and a limit (the worker's budget) as a dashed line. Each chart sits beside a table of the same
// numbers, so nothing is only in the picture.

import { h } from "./dom.js";

const PALETTE = ["#3563c9", "#d9822b", "#2a9d6f", "#8e44ad", "#c0392b", "#6b7280"];
const LIMIT_COLOR = "#c0392b";

// spec: {title, labels, yLabel, format, bars: bool, series: [{label, values}], limit: {label, value} | null}
export function categoryChart(container, spec) {
  const wrapper = h("figure", { class: "chart", role: "img", "aria-label": spec.title });
  container.append(wrapper);
  const width = () => Math.max(320, Math.min(wrapper.clientWidth || 640, 900));
  const chart = new uPlot(chartOptions(spec, width()), chartData(spec), wrapper);
  const observer = new ResizeObserver(() => chart.setSize({ width: width(), height: 260 }));
  observer.observe(wrapper);
  return {
    destroy() {
      observer.disconnect();
      chart.destroy();
      wrapper.remove();
    },
  };
}

function chartData(spec) {
  const xs = spec.labels.map((_, i) => i);
  const data = [xs, ...spec.series.map((s) => s.values)];
  if (spec.limit) data.push(xs.map(() => spec.limit.value));
  return data;
}

function chartOptions(spec, width) {
  const bars = spec.bars ? uPlot.paths.bars({ size: [0.6, 80] }) : null;
  const series = spec.series.map((s, i) => ({
    label: s.label,
    stroke: PALETTE[i % PALETTE.length],
    fill: spec.bars ? `${PALETTE[i % PALETTE.length]}99` : undefined,
    width: 2,
    paths: bars || undefined,
    points: { show: !spec.bars, size: 7 },
    spanGaps: true,
    value: (u, v) => (v === null || v === undefined ? "—" : spec.format(v)),
  }));
  if (spec.limit) {
    series.push({
      label: spec.limit.label,
      stroke: LIMIT_COLOR,
      dash: [8, 5],
      width: 2,
      points: { show: false },
      value: (u, v) => (v === null || v === undefined ? "—" : spec.format(v)),
    });
  }
  const count = spec.labels.length;
  return {
    title: spec.title,
    width,
    height: 260,
    scales: {
      x: { time: false, range: [-0.5, count - 0.5] },
      y: { range: (u, min, max) => [0, yTop(spec, max)] },
    },
    axes: [
      {
        splits: () => spec.labels.map((_, i) => i),
        values: (u, splits) => splits.map((i) => spec.labels[i] ?? ""),
      },
      { label: spec.yLabel, size: 80, values: (u, ticks) => ticks.map((v) => spec.format(v)) },
    ],
    series: [{ label: spec.xLabel || "", value: (u, i) => spec.labels[i] ?? "" }, ...series],
    cursor: { drag: { x: false, y: false } },
  };
}

function yTop(spec, max) {
  const highest = Math.max(max || 0, spec.limit ? spec.limit.value : 0);
  return highest > 0 ? highest * 1.1 : 1;
}
