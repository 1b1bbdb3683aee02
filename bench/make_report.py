"""Turn bench/results/*.json into bench/RESULTS.md (a table per run) and a ratio chart per run.

Engine runs (bench/run_bench.py) come first; service runs (bench/service_bench.py, service-*.json)
get their own section.

python bench/make_report.py
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from multi_gpu_report import multi_gpu_part

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = {12: 0.90, 8: 0.75, 6: 0.60}
COLUMNS = [
    ("name", "run"),
    ("cap_gb", "cap GB"),
    ("images", "images"),
    ("s_per_image", "s/image"),
    ("ratio", "ratio"),
    ("peak_reserved_gb", "peak reserved GB"),
    ("predicted_peak_gb", "predicted peak GB"),
    ("peak_allocated_gb", "peak allocated GB"),
    ("encode_s", "encode s"),
    ("denoise_s", "denoise s"),
    ("decode_s", "decode s"),
    ("streamed_gb_per_step", "streamed GB/step"),
    ("plan", "plan"),
]


def cell(value: Any) -> str:
    """A table cell."""
    return "—" if value is None else str(value)


def table(rows: list[dict[str, Any]]) -> str:
    """The run's rows as a Markdown table."""
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row.get(key)) for key, _ in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def summary(rows: list[dict[str, Any]]) -> str:
    """The issue's targets against what this run measured."""
    lines = [
        "| cap | target | single jobs | 16 queued | peak reserved ≤ cap | predicted vs measured peak |",
        "|---|---|---|---|---|---|",
    ]
    if not any("single jobs" in str(r.get("name")) for r in rows):
        lines = []  # a run without the single-job stages (e.g. only mixed sizes): no target table
    for cap, target in TARGETS.items() if lines else []:
        mine = [
            r
            for r in rows
            if r.get("cap_gb") == cap
            and str(r.get("name")).startswith("nightrender")
            and r.get("ratio") is not None
        ]
        single = next((r for r in mine if "single" in r["name"]), None)
        queued = next((r for r in mine if "queued" in r["name"]), None)
        known = [r for r in mine if r.get("predicted_peak_gb") is not None and r.get("peak_allocated_gb")]
        under = all((r.get("peak_reserved_gb") or 0) <= cap for r in mine)
        errors = [
            abs(r["predicted_peak_gb"] - r["peak_allocated_gb"]) / r["peak_allocated_gb"] for r in known
        ]
        lines.append(
            f"| {cap} GB | ≥ {target} | {cell(single and single['ratio'])} | "
            f"{cell(queued and queued['ratio'])} | {'yes' if under else 'NO'} | "
            f"{max(errors, default=0):.1%} worst |"
        )
    for r in rows:
        if "compiled" in str(r.get("name")) and r.get("max_abs_pixel_diff") is not None:
            lines += [
                "",
                f"{r['name']}: pixels against eager with everything resident, same seeds: max |diff| "
                f"{r['max_abs_pixel_diff']}/255, mean {r.get('mean_abs_pixel_diff')}, share of pixels off by "
                f"more than 8: {r.get('share_over_8')}.",
            ]
        if "mixed" in str(r.get("name")):
            lines += [
                "",
                f"{r['name']}: {r.get('images')} jobs, out-of-memory retries {r.get('ooms')}, "
                f"jobs over the cap {r.get('over_budget')}, prediction error mean "
                f"{r.get('mean_prediction_error') or 0:.1%} / "
                f"worst {r.get('max_prediction_error') or 0:.1%}, "
                f"rungs used {r.get('rungs')}.",
            ]
    return "\n".join(lines)


def chart(run: str, rows: list[dict[str, Any]]) -> str:
    """A horizontal bar per row: throughput ratio against the reference, with the targets drawn in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if r.get("ratio") is not None]
    figure, axis = plt.subplots(figsize=(10, 0.45 * len(measured) + 1.5))
    names = [r["name"] for r in measured]
    colours = ["#2a7" if r["name"].startswith("nightrender") else "#999" for r in measured]
    axis.barh(names, [r["ratio"] for r in measured], color=colours)
    for cap, target in TARGETS.items():
        axis.axvline(target, linestyle="--", linewidth=0.8, color="#c33")
        axis.text(target, -0.9, f"{cap} GB target", fontsize=7, color="#c33", ha="center")
    axis.invert_yaxis()
    axis.set_xlabel("throughput ratio against diffusers with everything on the GPU (1.0 = same speed)")
    axis.set_title(f"{rows[0]['card']}: synthetic Z-Image-Turbo, 1024x1024, 9 steps")
    figure.tight_layout()
    path = RESULTS / f"{run}.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path.name


SERVICE_TARGETS = {12.0: 1.30, 8.0: 1.00, 6.0: 0.85, 4.0: 0.50}
SERVICE_COLUMNS = [
    ("budget_gb", "budget GB"),
    ("batch", "batch"),
    ("images", "images"),
    ("s_per_image", "s/image"),
    ("ratio", "ratio"),
    ("target", "target"),
    ("bound_s", "bound s"),
    ("of_bound", "of bound"),
    ("peak_reserved_gb", "peak reserved GB"),
    ("oom_retries", "OOM retries"),
    ("overhead_ms_per_job", "overhead ms/job"),
    ("first_job_latency_s", "first-job latency s"),
    ("replacements", "re-placements"),
]


def service_target(row: dict[str, Any]) -> str | None:
    """The mixed batch's target ratio at this budget, and whether the row met it."""
    target = SERVICE_TARGETS.get(row.get("budget_gb") or 0.0)
    if row.get("batch") != "mixed" or target is None:
        return None
    ratio = row.get("ratio")
    verdict = "" if ratio is None else (" met" if ratio >= target else " MISSED")
    verdict += " (incomplete)" if row.get("error") else ""
    return f"≥ {target:.2f}{verdict}"


def service_table(rows: list[dict[str, Any]]) -> str:
    """The service rows as a Markdown table (an error row says why it has no figures)."""
    lines = ["| " + " | ".join(t for _, t in SERVICE_COLUMNS) + " |", "|" + "---|" * len(SERVICE_COLUMNS)]
    for row in rows:
        budget = row.get("budget_gb")
        values = {
            **row,
            "target": service_target(row),
            "budget_gb": None if budget is None else f"{budget:g}",
        }
        lines.append("| " + " | ".join(cell(values.get(key)) for key, _ in SERVICE_COLUMNS) + " |")
    errors = [f"- {r.get('name', '?')}: {error_line(str(r['error']))}" for r in rows if r.get("error")]
    return "\n".join(lines + (["", *errors] if errors else []))


def error_line(error: str) -> str:
    """An error on one line: its first line and, for a log tail, its last."""
    lines = [line.strip() for line in error.splitlines() if line.strip()] or ["?"]
    text = lines[0] if len(lines) == 1 else f"{lines[0]} … {lines[-1]}"
    return text[:400]


def service_notes(meta: dict[str, Any]) -> str:
    """The run's reference, bounds, batch shape and mixed-size penalty."""

    def get(key: str) -> str:
        return cell(meta.get(key))

    penalty = meta.get("mixed_penalty")
    at = f" at {get('mixed_penalty_budget_gb')} GB" if penalty is not None else ""
    notes = [meta["note"]] if meta.get("note") else []
    notes += [
        f"Reference (diffusers, everything on the GPU, eager, 1024², 9 steps): {get('reference_s')} s/image; "
        f"compiled: {get('compiled_s')} s/image; pinned host-to-device: {get('pinned_gb_per_s')} GB/s.",
        f"Model {get('model')}, {get('prompts')} prompts of {get('prompt_lengths_words')} words, "
        f"sizes {get('sizes')}, COMPILE {get('compile')}, commit {get('commit')}.",
        f"Mixed-size penalty{at} (mixed s/image / uniform s/image - 1): "
        + ("—" if penalty is None else f"{penalty:+.1%}"),
    ]
    for key in ("reference_error", "compile_error"):
        if meta.get(key):
            notes.append(f"{key.replace('_', ' ')}: {str(meta[key]).strip().splitlines()[-1][:300]}")
    return "\n\n".join(notes)


def service_chart(stem: str, meta: dict[str, Any], rows: list[dict[str, Any]]) -> str | None:
    """Bars of the ratio by budget, mixed beside uniform, with each budget's target; None if no ratios."""
    measured = [r for r in rows if r.get("ratio") is not None and r.get("budget_gb") is not None]
    if not measured:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = sorted({r["budget_gb"] for r in measured}, reverse=True)
    figure, axis = plt.subplots(figsize=(2.0 + 1.4 * len(budgets), 4.5))
    for offset, batch, colour in ((-0.2, "mixed", "#2a7"), (0.2, "uniform", "#47b")):
        ratios = {r["budget_gb"]: r["ratio"] for r in measured if r.get("batch") == batch}
        xs = [i + offset for i, b in enumerate(budgets) if b in ratios]
        bars = axis.bar(
            xs, [ratios[b] for b in budgets if b in ratios], width=0.38, color=colour, label=batch
        )
        axis.bar_label(bars, fmt="%.2f", fontsize=8)
    for i, budget in enumerate(budgets):
        if budget in SERVICE_TARGETS:
            axis.hlines(SERVICE_TARGETS[budget], i - 0.45, i + 0.45, colors="#c33", linestyles="--")
    axis.plot([], [], color="#c33", linestyle="--", label="mixed target")
    axis.axhline(1.0, color="#999", linewidth=0.6)
    axis.set_xticks(range(len(budgets)), [f"{b:g} GB" for b in budgets])
    axis.set_ylabel("throughput ratio against diffusers all on the GPU")
    axis.set_title(f"{meta.get('card', '?')}: service, {meta.get('model', '?')}", fontsize=10)
    axis.legend(fontsize=8)
    figure.tight_layout()
    path = RESULTS / f"{stem}.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path.name


def service_section(path: Path) -> list[str]:
    """A service results file as a report section: notes, chart and table."""
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        return []
    meta, rows = data.get("meta") or {}, data.get("rows") or []
    chart_name = service_chart(path.stem, meta, rows)
    return [
        f"### {path.stem}: {meta.get('card', '?')}, torch {meta.get('torch', '?')}",
        "",
        service_notes(meta),
        "",
        *([f"![service ratios](results/{chart_name})", ""] if chart_name else []),
        service_table(rows),
        "",
    ]


def service_part() -> list[str]:
    """The service benchmark section, from every service-*.json (nothing if there are none)."""
    paths = sorted(RESULTS.glob("service-*.json"))
    if not paths:
        return []
    parts = [
        "## Service benchmark",
        "",
        "Written by `bench/service_bench.py`: the real stack (embedded Redis, SQLite, the API and one Celery "
        "worker, the budget being the worker's own VRAM_BUDGET_GB), one batch submitted over HTTP, figures "
        "read from SQL. s/image = (last job finished - batch created) ÷ images; ratio = reference s/image ÷ "
        "s/image; bound = max(compiled s/image, streamed bytes per image ÷ pinned bandwidth); overhead = "
        "steady wall per job - GPU seconds per job; re-placements = jobs whose placement changed.",
        "",
    ]
    for path in paths:
        parts += service_section(path)
    return parts


def main() -> None:
    """Write RESULTS.md from every results file."""
    parts = [
        "# Benchmark results",
        "",
        "Generated by `bench/make_report.py` from `bench/results/*.json`, "
        "written by `bench/run_bench.py` on the GPU machine. Each ratio is throughput against diffusers "
        "with everything on the GPU, measured in the same run on the same card.",
        "",
    ]
    for path in sorted(RESULTS.glob("*.json")):
        if path.stem.startswith(("service-", "api-", "multi-gpu-")):
            continue  # sections of their own below; the API load results are in the README
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or "rows" not in data:
            continue
        rows, meta = data["rows"], data.get("meta") or {}
        parts += [
            f"## {path.stem}: {meta.get('card', '?')}, torch {meta.get('torch', '?')}",
            "",
            summary(rows),
            "",
            f"![ratios]({'results/' + chart(path.stem, rows)})",
            "",
            table(rows),
            "",
        ]
    parts += service_part()
    parts += multi_gpu_part()
    (RESULTS.parent / "RESULTS.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main()
