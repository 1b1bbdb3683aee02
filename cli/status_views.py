"""Rich views of what the API reports: a batch's status with its failures, one job, and the batches."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.table import Column, Table
from rich.text import Text

from cli.render_views import eta_text, gigabytes, unserved_line
from jobs.states import TERMINAL, JobStatus

# Failed jobs listed under a batch's status; `--json` and `nightrender job ID` give the rest.
FAILED_SHOWN = 20
PROMPT_CHARS = 60


def batch_status_view(
    summary: dict[str, Any], *, paused: bool, failed: list[dict[str, Any]]
) -> RenderableType:
    """The batch's state, counts per status, ETA (none while paused) and the failed jobs with their error."""
    counts = summary["counts"]
    done = sum(counts[state] for state in TERMINAL)
    finished = done >= summary["total"]
    line = f"batch {summary['id']}: [bold]{summary['status']}[/bold], {done} of {summary['total']} done"
    if not finished:
        line += f", {eta_text(summary.get('eta_seconds'), paused=paused)}"
    table = Table(*[status.value for status in JobStatus])
    table.add_row(*[str(counts[status.value]) for status in JobStatus])
    parts: list[RenderableType] = [line, table]
    if summary.get("unserved_models"):
        parts.append(unserved_line(summary["unserved_models"]))
    if failed:
        parts.append(failed_jobs_view(failed, total_failed=counts["failed"]))
    return Group(*parts)


def failed_jobs_view(failed: list[dict[str, Any]], *, total_failed: int) -> RenderableType:
    """The first failed jobs of a batch, grouped by their error: why, then which prompts at which size."""
    by_error: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for job in failed:
        by_error[job["error"] or "(no reason recorded)"].append(job)
    parts: list[RenderableType] = [Text(f"\n{total_failed} failed:", style="bold")]
    for error, jobs in by_error.items():
        parts += [Text(error, style="red"), _failed_table(jobs)]
    if total_failed > len(failed):
        parts.append(f"and {total_failed - len(failed)} more (GET /v1/batches/ID/jobs lists every job)")
    return Group(*parts)


def _failed_table(jobs: list[dict[str, Any]]) -> Table:
    # Ids are copied from here (`nightrender job ID`): never cut one.
    table = Table("#", Column("job", no_wrap=True), "prompt", "size", box=box.SIMPLE)
    for job in jobs:
        table.add_row(
            str(job["batch_index"]), job["id"], _short(job["prompt"]), f"{job['width']}x{job['height']}"
        )
    return table


def job_view(job: dict[str, Any]) -> Table:
    """One job: its state, parameters, attempts, error and measured memory."""
    params = job["params"]
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    rows = {
        "job": job["id"],
        "batch": job["batch_id"] or "-",
        "status": _status_text(job),
        "prompt": job["prompt"],
        "negative prompt": params["negative_prompt"] or "-",
        "size": f"{params['width']}x{params['height']}",
        "steps": str(params["steps"]),
        "guidance": f"{params['guidance_scale']:g}",
        "seed": str(params["seed"]),
        "model": f"{params['model']} ({params['dtype']})",
        "priority": str(job["priority"]),
        "attempts": str(job["attempts"]),
        "retry of": job["retry_of"] or "-",
        "created": job["created_at"],
        "finished": job["finished_at"] or "-",
    }
    if job["memory"]:
        rows.update(_memory_rows(job["memory"]))
    for name, value in rows.items():
        table.add_row(name, value)
    if job["error"]:
        table.add_row("error", Text(job["error"], style="red"))
    return table


def _status_text(job: dict[str, Any]) -> str:
    status = job["status"]
    if status == JobStatus.QUEUED and job.get("unserved"):
        return f"{status} (no running worker serves its model: it waits for one)"
    if status == JobStatus.QUEUED and job["queue_position"] is not None:
        return f"{status} ({job['queue_position']} ahead of it)"
    if status == JobStatus.RUNNING:
        return f"{status} (step {job['progress']['step']} of {job['progress']['total']})"
    return str(status)


def _memory_rows(memory: dict[str, Any]) -> dict[str, str]:
    """The job's measured memory and time, as rows of its view."""
    seconds = memory["encode_s"] + memory["denoise_s"] + memory["decode_s"] + memory["save_s"]
    rows = {
        "rung": f"{memory['rung']} on {memory['device_name']}",
        "peak VRAM": f"{gigabytes(memory['peak_allocated_bytes'])} allocated, "
        f"{gigabytes(memory['peak_reserved_bytes'])} reserved",
        "predicted peak": gigabytes(memory["predicted_peak_bytes"]),
        "VRAM budget": gigabytes(memory["vram_budget_bytes"]),
        "host RSS": gigabytes(memory["host_rss_bytes"]),
        "seconds": f"{seconds:.3f} rendering, {memory['load_s']:.3f} loading",
    }
    if memory["oom_attempts"]:
        rows["out of memory"] = f"{memory['oom_attempts']} attempt(s); `--json` has plan.attempts"
    return rows


def batches_table(batches: list[dict[str, Any]]) -> Table:
    """Batches, newest first: when, state, progress and failures."""
    # Ids are copied from here: never cut one (and the table fits 80 columns).
    table = Table(Column("batch", no_wrap=True), "created", "status", "done", "failed", box=box.SIMPLE)
    for batch in batches:
        counts = batch["counts"]
        done = sum(counts[state] for state in TERMINAL)
        table.add_row(
            batch["id"],
            batch["created_at"][5:16].replace("T", " "),
            batch["status"],
            f"{done}/{batch['total']}",
            str(counts["failed"]),
        )
    return table


def _short(prompt: str) -> str:
    return prompt if len(prompt) <= PROMPT_CHARS else prompt[: PROMPT_CHARS - 1] + "…"
