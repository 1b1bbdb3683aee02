"""What one webhook pass costs when nothing is due, on a database full of old batches.

For each backend it builds a fresh database (the migrations, then bulk rows): `--batches` finished batches of
`--jobs` jobs each, every `--webhook-every`-th one with a webhook_url and a delivered delivery row, some of
them with a retried job (and that finish delivered too), plus a few running webhook batches. Then it times
the pass's SQL (`record_finished` and `due_deliveries`, no HTTP) `--repeats` times and writes one row per
backend: median and p99 in ms. The API runs this every WEBHOOK_INTERVAL_S (2 s) in each process.

    python bench/webhook_pass.py
    python bench/webhook_pass.py --backends sqlite --batches 2000 --out /tmp/webhook-pass.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, insert, text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jobs import migrate
from jobs.db import make_database, make_session_factory
from jobs.tables import Batch, Job, WebhookDelivery
from jobs.webhook_sending import due_deliveries
from jobs.webhooks import record_finished

POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def job_values(batch_id: str, index: int, status: str, retry_of: str | None = None) -> dict[str, Any]:
    """One job row."""
    return {
        "id": str(uuid.uuid4()), "batch_id": batch_id, "batch_index": index, "prompt": "p",
        "width": 64, "height": 64, "steps": 2, "guidance_scale": 0.0, "seed": index, "model": "m",
        "dtype": "bf16", "status": status, "retry_of": retry_of, "created_at": NOW,
        "finished_at": NOW if status in ("succeeded", "failed") else None,
    }  # fmt: skip


def batch_rows(
    args: argparse.Namespace, number: int
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict]]:
    """A batch, its jobs and its delivery rows."""
    batch_id = str(uuid.uuid4())
    hooked = number % args.webhook_every == 0
    running = hooked and number < args.webhook_every * args.running
    url = "https://hooks.example/x" if hooked else None
    batch = {"id": batch_id, "total_jobs": args.jobs, "webhook_url": url, "created_at": NOW}
    statuses = ["running" if running and i == 0 else "succeeded" for i in range(args.jobs)]
    retried = hooked and not running and number % (args.webhook_every * 10) == 0
    if retried:
        statuses[-1] = "failed"
    jobs = [job_values(batch_id, i, status) for i, status in enumerate(statuses)]
    if retried:
        jobs.append(job_values(batch_id, args.jobs - 1, "succeeded", retry_of=jobs[-1]["id"]))
    finishes = 0 if running or not hooked else (2 if retried else 1)
    deliveries = [
        {"id": str(uuid.uuid4()), "batch_id": batch_id, "sequence": seq, "url": "https://hooks.example/x",
         "payload": "{}", "status": "delivered", "attempts": 1, "created_at": NOW, "delivered_at": NOW}
        for seq in range(1, finishes + 1)
    ]  # fmt: skip
    return batch, jobs, deliveries


def fill(url: str, args: argparse.Namespace) -> None:
    """Bulk rows, in chunks that any driver accepts."""
    engine = create_engine(url)
    with engine.begin() as connection:
        for start in range(0, args.batches, 500):
            rows = [batch_rows(args, n) for n in range(start, min(start + 500, args.batches))]
            connection.execute(insert(Batch), [b for b, _, _ in rows])
            jobs = [j for _, js, _ in rows for j in js]
            originals = [j for j in jobs if j["retry_of"] is None]
            connection.execute(insert(Job), originals)
            if len(originals) < len(jobs):
                connection.execute(insert(Job), [j for j in jobs if j["retry_of"] is not None])
            deliveries = [d for _, _, ds in rows for d in ds]
            if deliveries:
                connection.execute(insert(WebhookDelivery), deliveries)
    if url.startswith("postgresql"):
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text("ANALYZE"))
    engine.dispose()


def time_pass(url: str, repeats: int) -> list[float]:
    """Seconds each pass's SQL took; every pass must find nothing to record and nothing due."""
    engine = make_database(url)
    factory = make_session_factory(engine)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        recorded = record_finished(factory, limit=20, now=NOW)
        with factory() as session:
            due = due_deliveries(session, now=NOW, limit=20)
        times.append(time.perf_counter() - started)
        assert recorded == 0 and due == [], (recorded, due)
    engine.dispose()
    return times


def database(backend: str, folder: Path) -> tuple[str, Any]:
    """A fresh empty database URL and a function that drops it."""
    if backend == "sqlite":
        return f"sqlite:///{folder / 'webhooks.db'}", lambda: None
    name = f"nr_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}", drop


def run(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    """One backend's row."""
    with tempfile.TemporaryDirectory() as folder:
        url, drop = database(backend, Path(folder))
        try:
            migrate.upgrade(url)
            fill(url, args)
            times = sorted(time_pass(url, args.repeats))
        finally:
            drop()
    return {
        "name": "webhook_pass_idle",
        "backend": backend,
        "batches": args.batches,
        "jobs": args.batches * args.jobs,
        "webhook_batches": args.batches // args.webhook_every,
        "errors": 0,
        "median_ms": round(statistics.median(times) * 1000, 2),
        "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))] * 1000, 2),
        "seconds": round(sum(times), 3),
        # Other work on the machine shows here: the figures are only as quiet as the machine was.
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    """Parse arguments, run each backend, write the JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--batches", type=int, default=20_000)
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--webhook-every", type=int, default=10)
    parser.add_argument("--running", type=int, default=5, help="webhook batches still running")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "webhook-pass.json"))
    args = parser.parse_args()
    rows = [run(backend, args) for backend in args.backends.split(",")]
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
