"""Rich renderings for the CLI: live batch progress and the memory table."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli.client import Client
from jobs.states import TERMINAL

PAUSED_LINE = "the queue is paused: no job starts until `nightrender resume`"
SERVED_AGAIN_LINE = "every queued job's model has a worker again"


class WorkerGone(RuntimeError):
    """Every worker this CLI started has exited while jobs were left (one of several dying is outlived)."""


def follow_batch(
    client: Client,
    batch_id: str,
    console: Console,
    poll_s: float = 0.5,
    worker_alive: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Show a live progress bar until every job of the batch is finished; returns the final summary."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console) as progress:
        summary = client.batch(batch_id)
        task = progress.add_task("rendering", total=summary["total"], detail="")
        was_paused = False
        was_unserved: list[str] = []
        while True:
            done = sum(summary["counts"][state] for state in TERMINAL)
            paused = done < summary["total"] and client.queue()["paused"]
            if paused != was_paused:  # said once as a line too: the bar is not drawn outside a terminal
                progress.console.print(PAUSED_LINE if paused else "the queue is running again")
                was_paused = paused
            unserved = summary.get("unserved_models", [])
            if unserved != was_unserved:
                progress.console.print(unserved_line(unserved) if unserved else SERVED_AGAIN_LINE)
                was_unserved = unserved
            progress.update(task, completed=done, detail=progress_detail(summary, paused=paused))
            if done >= summary["total"]:
                return summary
            if worker_alive is not None and not worker_alive():
                raise WorkerGone("the worker exited before the batch finished; see `nightrender logs worker`")
            time.sleep(poll_s)
            summary = client.batch(batch_id)


def unserved_line(models: list[str]) -> str:
    """What the CLI says while queued jobs wait for a worker of their model (nothing fails meanwhile)."""
    names = ", ".join(repr(model) for model in models)
    starts = " or ".join(f"WORKER_MODEL={model}" for model in models)
    return (
        f"[yellow]waiting:[/yellow] no running worker serves {names}; those jobs stay queued until one "
        f"starts (nightrender worker with {starts})"
    )


def warnings_text(answer: dict[str, Any]) -> list[str]:
    """The API's warnings on a submission, each as a line to print."""
    return [f"[yellow]warning:[/yellow] {warning}" for warning in answer.get("warnings", [])]


def progress_detail(summary: dict[str, Any], *, paused: bool) -> str:
    """Counts and the ETA, or "paused" (no ETA) while the queue is paused."""
    counts = summary["counts"]
    tally = f"ok {counts['succeeded']} failed {counts['failed']} running {counts['running']}"
    return f"{tally} {eta_text(summary.get('eta_seconds'), paused=paused)}"


def eta_text(eta_seconds: float | None, *, paused: bool) -> str:
    """`eta 1h 16m`, `eta --` while nothing measured says, or `paused` (a paused queue has no ETA)."""
    if paused:
        return "[yellow]paused[/yellow] (`nightrender resume` continues)"
    if eta_seconds is None:
        return "eta --"
    return f"eta {duration(eta_seconds)}"


def duration(seconds: float) -> str:
    """Seconds as `45s`, `12m 05s` or `3h 20m`."""
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def memory_table(jobs: list[dict[str, Any]]) -> Table | str:
    """Peak memory and time per resolution and rung from the jobs' recorded stats (or a line saying none)."""
    groups: dict[tuple[int, int, str], list[dict[str, Any]]] = defaultdict(list)
    for job in jobs:
        memory = job.get("memory")
        if memory:
            params = job["params"]
            groups[(params["width"], params["height"], memory["rung"])].append(memory)
    if not groups:
        return "no job recorded memory"
    table = Table(title="Memory by resolution (measured)")
    for header in ("size", "rung", "device", "jobs", "peak alloc", "peak reserved", "host RSS", "s/image"):
        table.add_column(header, justify="right" if header not in ("rung", "device") else "left")
    for (width, height, rung), rows in sorted(groups.items(), key=lambda kv: kv[0][0] * kv[0][1]):
        table.add_row(*_memory_row(f"{width}x{height}", rung, rows))
    return table


def _memory_row(size: str, rung: str, rows: list[dict[str, Any]]) -> list[str]:
    seconds = [r["encode_s"] + r["denoise_s"] + r["decode_s"] + r["save_s"] for r in rows]
    return [
        size,
        rung,
        rows[0]["device_name"],
        str(len(rows)),
        gigabytes(max_or_none(r["peak_allocated_bytes"] for r in rows)),
        gigabytes(max_or_none(r["peak_reserved_bytes"] for r in rows)),
        gigabytes(max_or_none(r["host_rss_bytes"] for r in rows)),
        f"{sum(seconds) / len(seconds):.3f}",
    ]


def max_or_none(values: Any) -> int | None:
    """The largest value that is not None, or None."""
    present = [v for v in values if v is not None]
    return max(present) if present else None


def gigabytes(value: int | None) -> str:
    """Bytes as GB (1024**3, as card sizes and budgets are meant) with two decimals; n/a on the CPU."""
    return "n/a" if value is None else f"{value / 1024**3:.2f} GB"
