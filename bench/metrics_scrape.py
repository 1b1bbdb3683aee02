"""What one `GET /metrics` costs as the job tables grow, on SQLite and PostgreSQL.

For each backend and table size it makes a fresh migrated database, fills `jobs` and `job_stats` with
generated rows in the database itself (1% of jobs queued, ten running, 1% of stats with an out-of-memory
attempt, plans of realistic length), then times scrapes of the real app in-process: the SQL-derived
collector plus the exposition. With `--with-index` it repeats each size after adding an index on
`job_stats.recorded_at`, the index the recent-jobs window would use.

    python bench/metrics_scrape.py                        # 10k, 100k and 1M jobs on both backends
    python bench/metrics_scrape.py --sizes 10000 --backends sqlite --out /tmp/scrape.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import Engine, create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api.app import create_app
from jobs import migrate
from jobs.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/0"
RENDERED = {"plan": "stream 20/34", "rung": "stream", "outcome": "ok", "seconds": 1.234}
RAN_OUT = {
    "plan": "resident 34/34",
    "rung": "resident",
    "outcome": "out of memory: CUDA out of memory",
    "seconds": 0.5,
}
RECORD = {"rung": "stream", "transformer_resident": 20, "attempts": [RENDERED], "filler": "x" * 500}
PLAN = json.dumps(RECORD)
OOM_PLAN = json.dumps({**RECORD, "attempts": [RAN_OUT, RENDERED]})  # recovered on the next rung
SCRAPES = 30


def fill_sql(backend: str, jobs: int) -> list[str]:
    """INSERT ... SELECT statements that generate `jobs` jobs and their stats inside the database."""
    if backend == "postgres":
        series = f"FROM generate_series(1, {jobs}) AS s(i)"
        new_id = "md5(i::text || random()::text)::uuid::text"
        age = f"now() - ({jobs} - i) * interval '1 second'"
        false = "false"
        as_json = "::jsonb"
    else:
        numbers = f"WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {jobs})"
        series = f"FROM ({numbers} SELECT i FROM s)"
        new_id = "lower(hex(randomblob(16)))"
        age = f"strftime('%Y-%m-%d %H:%M:%f', 'now', '-' || ({jobs} - i) || ' seconds')"
        false = "0"
        as_json = ""
    status = "CASE WHEN i % 100 = 0 THEN 'queued' ELSE 'succeeded' END"
    return [
        "INSERT INTO jobs (id, batch_index, prompt, width, height, steps, guidance_scale, seed, model, "
        "dtype, priority, status, attempts, max_attempts, cancel_requested, progress_step, created_at, "
        "owner) "
        f"SELECT {new_id}, i, 'a lighthouse at dusk', 512 + (i % 4) * 128, 512, 9, 0, i, 'synthetic:tiny', "
        f"'bf16', 0, {status}, 1, 3, {false}, 9, {age}, '' {series}",
        "INSERT INTO job_stats (job_id, peak_allocated_bytes, peak_reserved_bytes, rung, plan, oom_attempts, "
        "load_s, encode_s, denoise_s, decode_s, save_s, place_s, placement_changed, recompiles, device_name, "
        "torch_version, diffusers_version, recorded_at) "
        f"SELECT id, 4000000000 + seed, 5000000000 + seed, 'stream', "
        f"(CASE WHEN seed % 100 = 7 THEN '{OOM_PLAN}' ELSE '{PLAN}' END){as_json}, "
        "CASE WHEN seed % 100 = 7 THEN 1 ELSE 0 END, 0.0, 0.15, 0.9 + (seed % 10) * 0.1, "
        f"0.12, 0.03, 0.0, {false}, 0, 'bench', '2.x', '0.x', created_at "
        "FROM jobs WHERE status = 'succeeded'",
        "UPDATE jobs SET status = 'running', started_at = created_at, heartbeat_at = created_at "
        "WHERE status = 'queued' AND seed <= 1000",
    ]


def fresh_database(backend: str, folder: Path) -> tuple[str, Any]:
    """A new empty database and a function that drops it."""
    if backend == "sqlite":
        return f"sqlite:///{folder / f'scrape-{uuid.uuid4().hex[:8]}.db'}", lambda: None
    name = f"nr_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    return POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}", drop


def fill(engine: Engine, backend: str, jobs: int) -> float:
    """Generate the rows; returns the seconds it took."""
    started = time.perf_counter()
    with engine.begin() as connection:
        for statement in fill_sql(backend, jobs):
            connection.execute(text(statement))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.execute(text("VACUUM ANALYZE" if backend == "postgres" else "ANALYZE"))
    return time.perf_counter() - started


def time_scrapes(settings: Settings) -> dict[str, Any]:
    """Median and worst of SCRAPES scrapes after one warm-up, and the body's size."""
    # From loopback, as the keyless local user: the API serves no one else while no API key exists.
    app = create_app(settings, reconcile=False)
    with TestClient(app, base_url="http://127.0.0.1", client=("127.0.0.1", 50000)) as client:
        body = client.get("/metrics").text
        assert "nightrender_metrics_database_up 1.0" in body, body[-500:]
        seconds = []
        for _ in range(SCRAPES):
            started = time.perf_counter()
            client.get("/metrics")
            seconds.append(time.perf_counter() - started)
    return {
        "median_ms": round(statistics.median(seconds) * 1000, 1),
        "max_ms": round(max(seconds) * 1000, 1),
        "body_bytes": len(body),
    }


def measure(backend: str, jobs: int, with_index: bool, folder: Path) -> list[dict[str, Any]]:
    """One database of `jobs` jobs: scrapes without, then (optionally) with the recorded_at index."""
    url, drop = fresh_database(backend, folder)
    try:
        migrate.upgrade(url)
        engine = create_engine(url)
        fill_s = fill(engine, backend, jobs)
        # A queue of its own per database: the broker records which stack (database) a queue belongs to.
        queue = f"bench-scrape-{uuid.uuid4().hex[:8]}"
        settings = Settings(database_url=url, redis_url=REDIS_URL, data_dir=folder, queue_name=queue)
        rows = [{"backend": backend, "jobs": jobs, "index": False, "fill_s": round(fill_s, 1)}]
        rows[0].update(time_scrapes(settings))
        if with_index:
            with engine.begin() as connection:
                connection.execute(text("CREATE INDEX ix_bench_stats_recorded_at ON job_stats (recorded_at)"))
            rows.append({"backend": backend, "jobs": jobs, "index": True, **time_scrapes(settings)})
        engine.dispose()
        return rows
    finally:
        drop()


def main() -> None:
    """Run every backend and size; print and write the results."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--with-index", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/metrics-scrape.json")
    args = parser.parse_args()
    results = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        for backend in args.backends.split(","):
            for jobs in (int(size) for size in args.sizes.split(",")):
                for row in measure(backend, jobs, args.with_index, Path(folder)):
                    print(json.dumps(row), flush=True)
                    results.append(row)
    meta = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {platform.processor() or '?'}, python {platform.python_version()}",
        "scrapes": SCRAPES,
        # Other work on the machine inflates the figures: the 1-minute load average before and after.
        "load_average_1m": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "cpus": os.cpu_count(),
        "metrics_recent_jobs": Settings().metrics_recent_jobs,
    }
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
