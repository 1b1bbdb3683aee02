"""The multi-GPU section of bench/RESULTS.md: a chart and a table per bench/results/multi-gpu-*.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_SPEEDUP = 1.9  # issue 12: two GPUs give at least 1.9x the throughput of one
COLUMNS = [
    ("name", "run"),
    ("gpus", "GPUs"),
    ("workers", "workers at the end"),
    ("images", "images"),
    ("s_per_image", "s/image"),
    ("speedup_vs_one", "speedup vs 1"),
    ("jobs_per_worker", "jobs per worker"),
    ("lost", "lost"),
    ("duplicated", "done twice"),
    ("rerun_jobs", "jobs run again"),
]


def multi_gpu_part() -> list[str]:
    """The section, from every multi-gpu-*.json (nothing if there are none)."""
    paths = sorted(RESULTS.glob("multi-gpu-*.json"))
    if not paths:
        return []
    parts = [
        "## Multi-GPU benchmark",
        "",
        "Written by `bench/multi_gpu_bench.py`: a fresh stack per run as `nightrender up --gpus` starts it "
        "(one Celery worker per GPU, each pinned with CUDA_VISIBLE_DEVICES and capped at the emulated card's "
        "VRAM_BUDGET_GB), the same mixed-size batch over HTTP, figures from SQL. s/image = (last job "
        "finished - batch created) ÷ images; speedup = the one-worker run's s/image ÷ this run's, same "
        f"invocation, same machine. Target: 2 GPUs ≥ {TARGET_SPEEDUP}x.",
        "",
    ]
    for path in paths:
        parts += section(path)
    return parts


def section(path: Path) -> list[str]:
    """One results file: notes, chart and table."""
    data = json.loads(path.read_text())
    meta, rows = data.get("meta") or {}, data.get("rows") or []
    chart_name = chart(path.stem, meta, rows)
    return [
        f"### {path.stem}: {meta.get('card', '?')}, torch {meta.get('torch', '?')}",
        "",
        f"{meta.get('batch')}, {meta.get('steps')} steps, {meta.get('model')}, "
        f"{meta.get('budget_gb_per_worker')} GB per worker. {meta.get('note') or ''}".strip(),
        "",
        *([f"![multi-GPU throughput](results/{chart_name})", ""] if chart_name else []),
        table(rows),
        "",
    ]


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table."""
    lines = ["| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(row.get(key)) for key, _ in COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def cell(value: Any) -> str:
    """A table cell; a worker count map as `name: n` pairs."""
    if isinstance(value, dict):
        return ", ".join(f"{name.split('@')[0]}: {count}" for name, count in sorted(value.items()))
    return "—" if value is None else str(value)


def chart(stem: str, meta: dict[str, Any], rows: list[dict[str, Any]]) -> str | None:
    """Images per minute for each run, with the target line; None if nothing was measured."""
    measured = [r for r in rows if r.get("s_per_image")]
    if not measured:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7.5, 4.2))
    per_minute = [60.0 / r["s_per_image"] for r in measured]
    bars = axis.bar(range(len(measured)), per_minute, color=["#47b", "#2a7", "#c93"][: len(measured)])
    labels = [f"{p:.0f}/min" + (f"\n{r['speedup_vs_one']}x" if r.get("speedup_vs_one") else "")
              for p, r in zip(per_minute, measured, strict=True)]  # fmt: skip
    axis.bar_label(bars, labels=labels, fontsize=8)
    one = next((r for r in measured if r.get("gpus") == 1), None)
    if one:
        axis.axhline(TARGET_SPEEDUP * 60.0 / one["s_per_image"], color="#c33", linestyle="--", linewidth=1)
        axis.plot([], [], color="#c33", linestyle="--", label=f"target: {TARGET_SPEEDUP}x one GPU")
        axis.legend(fontsize=8, loc="upper left")
    axis.set_xticks(
        range(len(measured)), [r["name"].replace(", one", ",\none") for r in measured], fontsize=8
    )
    axis.set_ylabel("images per minute (whole batch)")
    axis.set_title(f"{meta.get('card', '?')}: {meta.get('batch')}", fontsize=9)
    axis.set_ylim(0, max(per_minute) * 1.3)
    figure.tight_layout()
    path = RESULTS / f"{stem}.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path.name
