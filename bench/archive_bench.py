"""Archive benchmark: first byte and total time of a finished 1,000-image batch's zip from the real API.

For each backend it makes a fresh SQLite file or PostgreSQL database, migrates it, and builds a finished
batch the way the worker leaves one: the batch and its jobs inserted by `jobs.submit.insert_batch`, each
job claimed and finished through `jobs.lifecycle` with its stats, and a small noise PNG (it does not
compress to nothing) written under the outputs folder. It then starts the API alone as a real uvicorn
process (`cli.stack.Stack`, no worker) and downloads the archive over HTTP, one warm-up and then
`--runs` times in turn. First byte = from sending the request to the first byte of the body; total =
to the last byte. A run fails on an exception, a status other than 200, or a zip that does not hold
every image and the manifest.

    python bench/archive_bench.py                                  # sqlite, and postgres when reachable
    python bench/archive_bench.py --backends sqlite --jobs 200 --out /tmp/api-archive.json
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from PIL import Image
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cli.stack import Stack
from jobs import migrate
from jobs.db import make_database, make_session_factory, transaction
from jobs.lifecycle import claim_job, finish_job
from jobs.params import GenerationParams
from jobs.results import stored_result_path
from jobs.settings import Settings
from jobs.submit import insert_batch

ROOT = Path(__file__).resolve().parent.parent
MODEL = "synthetic:tiny"
NAME = "archive_first_byte_1k"
POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
STATS = {
    "peak_allocated_bytes": 10**8,
    "peak_reserved_bytes": 2 * 10**8,
    "rung": "none",
    "encode_s": 0.01,
    "denoise_s": 0.1,
    "decode_s": 0.01,
    "save_s": 0.01,
    "device_name": "bench",
    "torch_version": "2.x",
    "diffusers_version": "0.x",
}


@dataclass
class Download:
    """One archive download: seconds to the first body byte and to the last, and whether it was right."""

    first_byte_s: float
    total_s: float
    size: int
    failure: str | None


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def postgres_reachable(admin_url: str) -> bool:
    """Whether the PostgreSQL server answers."""
    engine = create_engine(admin_url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect():
            return True
    except OperationalError:
        return False
    finally:
        engine.dispose()


def create_postgres_database(admin_url: str) -> str:
    """A fresh, empty PostgreSQL database for this run; returns its URL."""
    name = f"nr_archive_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


def drop_postgres_database(admin_url: str, url: str) -> None:
    """Drop the run's database, closing whatever connections are left on it."""
    name = url.rsplit("/", 1)[1]
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def make_settings(workdir: Path, database_url: str | None) -> Settings:
    """Settings for one run: its own folders, ports, queue and embedded Redis."""
    return Settings(
        data_dir=workdir / "data",
        database_url=database_url,
        redis_url=None,
        embedded_redis_port=free_port(),
        api_port=free_port(),
        queue_name=f"nr-archive-{uuid.uuid4().hex[:10]}",
        model_cache_dir=workdir / "models",
        worker_model=MODEL,
        default_model=MODEL,
    )


def write_png(path: Path, rng: random.Random, side: int) -> int:
    """A noise PNG of side x side pixels; returns its size in bytes."""
    pixels = rng.randbytes(side * side * 3)
    Image.frombytes("RGB", (side, side), pixels).save(path, format="PNG")
    return path.stat().st_size


def build_finished_batch(settings: Settings, jobs: int, side: int) -> tuple[str, int]:
    """A batch of `jobs` succeeded jobs with stats and a PNG each; returns its id and the PNGs' bytes."""
    migrate.upgrade(settings.resolved_database_url())
    engine = make_database(settings.resolved_database_url())
    factory = make_session_factory(engine)
    outputs = settings.resolved_outputs_dir()
    outputs.mkdir(parents=True, exist_ok=True)
    params = [
        GenerationParams(prompt=f"archive bench {i}", width=64, height=64, steps=2, seed=i, model=MODEL)
        for i in range(jobs)
    ]
    rng = random.Random(0)
    written = 0
    try:
        with transaction(factory) as session:
            submission = insert_batch(session, params=params, priority=0, max_attempts=3)
        with transaction(factory) as session:
            for job_id in submission.job_ids:
                claim = claim_job(session, job_id=job_id)
                assert claim is not None
                path = outputs / f"{job_id}.png"
                written += write_png(path, rng, side)
                relative = stored_result_path(outputs, path)  # as the worker's writer stores it
                stored = finish_job(
                    session, job_id=job_id, lease_token=claim.lease_token, result_path=relative, stats=STATS
                )
                assert stored
    finally:
        engine.dispose()
    assert submission.batch_id is not None
    return submission.batch_id, written


def download(client: httpx.Client, batch_id: str, jobs: int) -> Download:
    """Stream the archive once, timing the first body byte and the last, then check the zip."""
    started = time.perf_counter()
    first: float | None = None
    body = bytearray()
    try:
        with client.stream("GET", f"/v1/batches/{batch_id}/archive") as response:
            for chunk in response.iter_raw():
                if first is None and chunk:
                    first = time.perf_counter() - started
                body.extend(chunk)
            status = response.status_code
    except httpx.HTTPError as error:
        elapsed = time.perf_counter() - started
        return Download(elapsed, elapsed, len(body), f"{type(error).__name__}: {error}")
    total = time.perf_counter() - started
    failure = f"status {status}" if status != 200 else check_zip(bytes(body), jobs)
    return Download(first if first is not None else total, total, len(body), failure)


def check_zip(data: bytes, jobs: int) -> str | None:
    """None if the zip holds `jobs` images and a manifest listing every job; else what is wrong."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = archive.namelist()
            listed = len(json.loads(archive.read("manifest.json"))["jobs"])
    except (zipfile.BadZipFile, KeyError, ValueError) as error:
        return f"bad zip: {error}"
    if len(names) != jobs + 1 or listed != jobs:
        return f"zip holds {len(names)} entries and {listed} manifest jobs for {jobs} jobs"
    return None


def percentile_ms(values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile of seconds, in milliseconds."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(0, math.ceil(fraction * len(ordered)) - 1)] * 1000, 1)


def make_row(backend: str, downloads: list[Download], jobs: int, png_bytes: int) -> dict[str, Any]:
    """The results row of one backend."""
    first = [d.first_byte_s for d in downloads]
    totals = [d.total_s for d in downloads]
    failures = [d.failure for d in downloads if d.failure]
    return {
        "name": NAME,
        "backend": backend,
        "errors": len(failures),
        "p99_ms": percentile_ms(first, 0.99),
        "seconds": round(statistics.median(totals), 3),
        "runs": len(downloads),
        "first_byte_p50_ms": percentile_ms(first, 0.50),
        "total_p99_s": round(max(totals), 3),
        "jobs": jobs,
        "png_bytes": png_bytes,
        "zip_bytes": downloads[0].size if downloads else 0,
        "machine": f"{os.cpu_count()}-core CPU",
        "failures": failures[:3],
    }


def run_backend(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    """Build the batch, start the API, download the archive `runs` times, and tear everything down."""
    workdir = Path(tempfile.mkdtemp(prefix=f"nr-archive-{backend}-"))
    database_url = create_postgres_database(args.postgres_admin_url) if backend == "postgres" else None
    stack: Stack | None = None
    try:
        settings = make_settings(workdir, database_url)
        print(
            f"[{backend}] building a finished {args.jobs}-job batch in {workdir}", file=sys.stderr, flush=True
        )
        batch_id, png_bytes = build_finished_batch(settings, args.jobs, args.side)
        stack = Stack(settings)
        stack.start(worker=False)
        with httpx.Client(base_url=settings.resolved_api_url(), timeout=args.timeout) as client:
            download(client, batch_id, args.jobs)  # warm-up: the server's first request, not measured
            downloads = [download(client, batch_id, args.jobs) for _ in range(args.runs)]
        return make_row(backend, downloads, args.jobs, png_bytes)
    finally:
        if stack is not None:
            stack.stop()
        if database_url is not None:
            drop_postgres_database(args.postgres_admin_url, database_url)
        shutil.rmtree(workdir, ignore_errors=True)


def git_commit() -> str | None:
    """The checked-out commit, with '+dirty' when the tree has changes; None outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("+dirty" if dirty.stdout.strip() else "")


def run_meta(args: argparse.Namespace) -> dict[str, Any]:
    """What the rows were measured with."""
    return {
        "benchmark": "api-archive",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": f"{os.cpu_count()}-core CPU",
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "jobs": args.jobs,
        "png_side": args.side,
        "runs": args.runs,
        "p99_ms": "first byte of the body, from sending the request, nearest-rank over the runs",
        "seconds": "median time to the last byte",
        "target": "first byte <= 200 ms",
        **({"note": args.note} if args.note else {}),
    }


def save_row(path: Path, meta: dict[str, Any], row: dict[str, Any]) -> None:
    """Merge the row into the results file, replacing a row of the same name and backend."""
    data = json.loads(path.read_text()) if path.exists() else {"meta": {}, "rows": []}
    key = (row["name"], row["backend"])
    rows = [r for r in data.get("rows", []) if (r.get("name"), r.get("backend")) != key] + [row]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": {**data.get("meta", {}), **meta}, "rows": rows}, indent=2) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backends", default="sqlite,postgres", help="comma-separated: sqlite, postgres")
    parser.add_argument("--jobs", type=int, default=1000, help="images in the finished batch")
    parser.add_argument("--side", type=int, default=64, help="side of each noise PNG in pixels")
    parser.add_argument("--runs", type=int, default=20, help="measured downloads per backend")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before a download fails")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "api-archive.json")
    parser.add_argument("--postgres-admin-url", default=POSTGRES_ADMIN_URL)
    parser.add_argument("--note", default="", help="a line stored in the results' meta")
    args = parser.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(args.backends) - {"sqlite", "postgres"}
    if unknown:
        parser.error(f"unknown backends: {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every backend in turn; PostgreSQL is skipped, with a note, when it does not answer."""
    args = parse_args(argv)
    failed = 0
    for backend in args.backends:
        if backend == "postgres" and not postgres_reachable(args.postgres_admin_url):
            print("[postgres] not reachable; skipped", file=sys.stderr, flush=True)
            continue
        try:
            row = run_backend(backend, args)
        except Exception as error:  # report it and go on with the next backend
            print(f"[{backend}] failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
            failed += 1
            continue
        save_row(args.out, run_meta(args), row)
        print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
