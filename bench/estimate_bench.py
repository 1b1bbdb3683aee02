"""Estimate benchmark: how close the dashboard's budget hint comes to what the batch then does.

For each budget it starts a fresh stack (as `nightrender run` does), asks `POST /v1/estimate` before any
job has run (so the answer is the worker's planner forecast), submits the same batch over HTTP, waits,
asks again (now from measured stats), and reads the truth back from SQL: seconds per image and peak
reserved VRAM per size, and the batch's wall time from its first start to its last finish.

    python bench/estimate_bench.py                       # GPU machine: bench/results/estimate-<card>.json
    python bench/estimate_bench.py --model synthetic:tiny --sizes 64x64,64x96 --steps 2 --budgets 12 \\
        --prompts 4 --device-check off --out /tmp/estimate-cpu.json        # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.service_bench import (
    GB,
    ROOT,
    BenchStack,
    build_prompts,
    card_slug,
    git_state,
    log,
    probe_device,
    stack_settings,
    wait_for_batch,
)
from jobs.db import make_database, make_session_factory
from jobs.tables import Job, JobStats


def sizes_of(text: str) -> list[tuple[int, int]]:
    """'1024x1024,768x1344' as (width, height) pairs."""
    return [(int(w), int(h)) for w, h in (part.lower().split("x") for part in text.split(",") if part)]


def estimate(http: httpx.Client, args: argparse.Namespace) -> dict[str, Any]:
    """The dashboard's hint for this batch, as the API answers it now."""
    sizes = [{"width": w, "height": h} for w, h in sizes_of(args.sizes)]
    body = {"model": args.model, "steps": args.steps, "sizes": sizes, "jobs_per_size": args.prompts}
    answer = http.post("/v1/estimate", json=body)
    answer.raise_for_status()
    return dict(answer.json())


def measured_truth(stack: BenchStack, batch_id: str) -> dict[str, Any]:
    """Seconds per image and peak reserved per size, and the batch's wall time, from SQL."""
    database = make_database(stack.settings.resolved_database_url())
    try:
        with make_session_factory(database)() as session:
            rows = session.execute(
                select(Job.width, Job.height, Job.started_at, Job.finished_at, JobStats)
                .join(JobStats, JobStats.job_id == Job.id)
                .where(Job.batch_id == batch_id)
            ).all()
    finally:
        database.dispose()
    per_size: dict[str, dict[str, Any]] = {}
    for width, height, _, _, stats in rows:
        entry = per_size.setdefault(f"{width}x{height}", {"seconds": [], "peaks": []})
        entry["seconds"].append(stats.encode_s + stats.denoise_s + stats.decode_s + stats.save_s)
        entry["peaks"].append(stats.peak_reserved_bytes or 0)
    wall = max(r[3] for r in rows) - min(r[2] for r in rows)
    return {
        "jobs": [job_row(w, h, s, f, st) for w, h, s, f, st in sorted(rows, key=lambda r: r[2])],
        "wall_s": round(wall.total_seconds(), 2),
        "sizes": {
            size: {
                "s_per_image": round(statistics.mean(e["seconds"]), 4),
                "peak_reserved_bytes": max(e["peaks"]),
            }
            for size, e in per_size.items()
        },
    }


def job_row(width: int, height: int, started: Any, finished: Any, stats: JobStats) -> dict[str, Any]:
    """One job's phases and times, for looking at the ETA's inputs afterwards."""
    phases = ("load_s", "encode_s", "denoise_s", "decode_s", "save_s", "recompiles")
    return {"size": f"{width}x{height}", "started": started.isoformat(), "finished": finished.isoformat(),
            **{name: getattr(stats, name) for name in phases}}  # fmt: skip


def compare(before: dict[str, Any], after: dict[str, Any], truth: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per size: forecast and measured-estimate against what the jobs did."""
    rows = []
    for ahead, later in zip(before["sizes"], after["sizes"], strict=True):
        size = f"{ahead['width']}x{ahead['height']}"
        real = truth["sizes"].get(size, {})
        rows.append({
            "size": size,
            "forecast_source": ahead["source"],
            "forecast_s_per_image": ahead["seconds_per_image"],
            "forecast_peak_gb": _gb(ahead["peak_bytes"]),
            "forecast_fits": ahead["fits"],
            "measured_estimate_s_per_image": later["seconds_per_image"],
            "real_s_per_image": real.get("s_per_image"),
            "real_peak_gb": _gb(real.get("peak_reserved_bytes")),
            "forecast_over_real": _ratio(ahead["seconds_per_image"], real.get("s_per_image")),
        })  # fmt: skip
    return rows


def _gb(value: int | None) -> float | None:
    return None if value is None else round(value / GB, 2)


def _ratio(guess: float | None, real: float | None) -> float | None:
    return None if guess is None or not real else round(guess / real, 3)


def run_budget(args: argparse.Namespace, budget: float) -> dict[str, Any]:
    """A fresh stack at one budget: estimate, render, estimate again, and the truth."""
    data_dir = Path(tempfile.mkdtemp(prefix=f"estimate-{budget:g}gb-", dir=args.work))
    stack = BenchStack(stack_settings(args, budget, data_dir), extra_env={})
    try:
        log(f"{budget:g} GB: starting the stack in {data_dir}")
        stack.start()
        with httpx.Client(base_url=stack.settings.resolved_api_url(), timeout=60) as http:
            before = estimate(http, args)
            log(f"{budget:g} GB: before: {before['summary']}")
            body = {"prompts": build_prompts(args.prompts), "steps": args.steps, "model": args.model,
                    "sizes": [f"{w}x{h}" for w, h in sizes_of(args.sizes)], "seeds": [1]}  # fmt: skip
            created = http.post("/v1/batches", json=body)
            created.raise_for_status()
            batch_id = created.json()["id"]
            wait_for_batch(http, stack, batch_id, args.timeout, f"{budget:g} GB")
            after = estimate(http, args)
            log(f"{budget:g} GB: after: {after['summary']}")
        truth = measured_truth(stack, batch_id)
    finally:
        stack.stop()
    return {
        "budget_gb": budget,
        "summary_before": before["summary"],
        "summary_after": after["summary"],
        "forecast_total_s": before["seconds_total"],
        "measured_estimate_total_s": after["seconds_total"],
        "real_wall_s": truth["wall_s"],
        "forecast_total_over_real": _ratio(before["seconds_total"], truth["wall_s"]),
        "sizes": compare(before, after, truth),
        "jobs": truth["jobs"],
    }


def table(result: dict[str, Any]) -> str:
    """The rows as a markdown table, for the README and the note."""
    lines = [
        f"Card: {result['card']}; model {result['model']}, {result['steps']} steps, "
        f"{result['prompts']} jobs per size.",
        "",
        "| budget | size | source | forecast s/img | real s/img | forecast/real | forecast peak "
        "| real peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        for row in run["sizes"]:
            lines.append(
                f"| {run['budget_gb']:g} GB | {row['size']} | {row['forecast_source']} | "
                f"{row['forecast_s_per_image']} | {row['real_s_per_image']} | {row['forecast_over_real']} | "
                f"{row['forecast_peak_gb']} GB | {row['real_peak_gb']} GB |"
            )
        lines.append(
            f"| {run['budget_gb']:g} GB | whole batch | | {run['forecast_total_s']} s | "
            f"{run['real_wall_s']} s | {run['forecast_total_over_real']} | | |"
        )
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    """The benchmark's options."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="synthetic:full")
    parser.add_argument("--sizes", default="512x512,1024x1024,768x1344")
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--prompts", type=int, default=12, help="jobs per size")
    parser.add_argument("--budgets", default="12,6")
    parser.add_argument("--cache", type=Path, default=ROOT / ".nightrender" / "models")
    parser.add_argument("--compile", default=None)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--device-check", choices=("on", "off"), default="on")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args()


def main() -> None:
    """Every budget, then the JSON and the table."""
    args = parse_args()
    device = probe_device()
    if args.device_check == "on" and not device["cuda"]:
        raise SystemExit("no CUDA device: this benchmark needs a GPU (--device-check off: CPU smoke test)")
    args.work = args.work or Path(tempfile.mkdtemp(prefix="nightrender-estimate-"))
    out = args.out or ROOT / "bench" / "results" / f"estimate-{card_slug(device['card'])}.json"
    result: dict[str, Any] = {"card": device["card"], "model": args.model, "steps": args.steps,
                              "prompts": args.prompts, "commit": git_state(), "runs": []}  # fmt: skip
    for budget in (float(b) for b in args.budgets.split(",")):
        result["runs"].append(run_budget(args, budget))
        out.write_text(json.dumps(result, indent=2))
    result["table"] = table(result)
    out.write_text(json.dumps(result, indent=2))
    print(result["table"])
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
