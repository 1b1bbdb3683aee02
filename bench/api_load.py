"""API load benchmark: an open loop of status polls against the real stack while a worker renders.

For each backend it starts a fresh stack the way `nightrender up` does (embedded Redis, migrations, the
uvicorn API and one Celery worker on synthetic:tiny) against a fresh SQLite file or a fresh PostgreSQL
database, submits one batch over HTTP so the worker renders throughout, then sends `GET /v1/jobs/{id}` and
`GET /v1/batches/{id}` in turn at a fixed rate. The loop is open: every request leaves at its own
precomputed time whether or not earlier ones have answered. A request fails on an exception, on a timeout
or on a status >= 500 (503 is also counted as `shed`). Latency percentiles are over every request, failed
ones included at the time they took to fail. After the window it times how long `/healthz` takes to answer
200 again, and reads from SQL how many of the batch's jobs had succeeded by the window's end.

With `--submit-prompts N` it measures submission instead, on a stack with the API alone: it POSTs a
batch of N prompts `--repeats` times, while polling `GET /healthz` every `--healthz-every-ms` in an open
loop, and writes two rows per backend: `submit_10k` (the POST's time to its 201) and
`healthz_during_submit_10k` (the polls sent while a POST was in flight). It then checks that Redis
holds one message per submitted job.

    python bench/api_load.py                                          # both backends, 200/s for 60 s
    python bench/api_load.py --backends sqlite --seconds 20 --out /tmp/api-load.json
    python bench/api_load.py --submit-prompts 10000                   # submission, both backends
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, func, select, text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cli.stack import Stack
from jobs.queue import Publisher
from jobs.settings import Settings
from jobs.tables import Job

ROOT = Path(__file__).resolve().parent.parent
MODEL = "synthetic:tiny"
POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
PROGRESS_EVERY_S = 10.0
HEALTHZ_CAP_S = 60.0
SUBJECTS = ("a lighthouse at dusk", "a cat on a windowsill", "a neon street in rain", "a fox in snow")


@dataclass
class Sample:
    """One request: when it was due, when it left, how long it took, and its outcome."""

    lag_s: float
    latency_s: float
    status: int | None
    failure: str | None


@dataclass
class LoadState:
    """What the open loop has sent and received so far."""

    samples: list[Sample] = field(default_factory=list)
    sent: int = 0
    in_flight: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


# ---------------------------------------------------------------------------------------------------
# The stack and its database
# ---------------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def create_postgres_database(admin_url: str) -> str:
    """A fresh, empty PostgreSQL database for this run; returns its URL."""
    name = f"nr_load_{uuid.uuid4().hex[:12]}"
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


def make_settings(workdir: Path, database_url: str | None, model_cache: Path) -> Settings:
    """Settings for one run: its own folders, ports, queue and embedded Redis; the tiny model only."""
    return Settings(
        data_dir=workdir / "data",
        database_url=database_url,
        redis_url=None,
        embedded_redis_port=free_port(),
        api_port=free_port(),
        queue_name=f"nr-load-{uuid.uuid4().hex[:10]}",
        model_cache_dir=model_cache,
        worker_model=MODEL,
        default_model=MODEL,
        allowed_models=MODEL,
    )


def succeeded_jobs(database_url: str, batch_id: str) -> int | None:
    """Jobs of the batch that have succeeded, straight from SQL (None if the database will not answer)."""
    connect_args = {"timeout": 5} if database_url.startswith("sqlite") else {"connect_timeout": 5}
    engine = create_engine(database_url, connect_args=connect_args)
    try:
        with engine.connect() as connection:
            query = select(func.count()).where(Job.batch_id == batch_id, Job.status == "succeeded")
            return int(connection.execute(query).scalar_one())
    except Exception as error:  # the figure is optional; a locked database must not stop the run
        print(f"could not count succeeded jobs: {error}", file=sys.stderr)
        return None
    finally:
        engine.dispose()


# ---------------------------------------------------------------------------------------------------
# The batch the worker renders during the measurement
# ---------------------------------------------------------------------------------------------------


def batch_body(prompts: int, steps: int, size: str) -> dict[str, Any]:
    """One batch of short prompts at one small size."""
    texts = [f"load test {i}: {SUBJECTS[i % len(SUBJECTS)]}" for i in range(prompts)]
    return {"prompts": texts, "sizes": [size], "steps": steps, "model": MODEL}


def submit_batch(api_url: str, body: dict[str, Any]) -> tuple[str, list[str]]:
    """POST the batch; returns its id and its job ids."""
    response = httpx.post(f"{api_url}/v1/batches", json=body, timeout=60.0)
    response.raise_for_status()
    created = response.json()
    return str(created["id"]), [str(job_id) for job_id in created["job_ids"]]


def wait_rendering(api_url: str, batch_id: str, timeout: float = 60.0) -> None:
    """Block until the worker has claimed a job of the batch, so it renders during the whole window."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = httpx.get(f"{api_url}/v1/batches/{batch_id}", timeout=10.0).json()["counts"]
        if any(count for state, count in counts.items() if state != "queued"):
            return
        time.sleep(0.2)
    raise RuntimeError(f"the worker claimed no job of batch {batch_id} within {timeout:.0f}s")


# ---------------------------------------------------------------------------------------------------
# The open loop
# ---------------------------------------------------------------------------------------------------


def build_schedule(
    rate: float, seconds: float, batch_id: str, job_ids: list[str], burst: int = 0
) -> list[tuple[float, str]]:
    """(offset in seconds, path) for every request: jobs and the batch in turn, random jobs.

    With `burst`, that many requests all start at once instead (the pattern that deadlocked the pool).
    """
    rng = random.Random(20240)
    count = burst or round(rate * seconds)
    return [
        (
            0.0 if burst else i / rate,
            f"/v1/jobs/{rng.choice(job_ids)}" if i % 2 == 0 else f"/v1/batches/{batch_id}",
        )
        for i in range(count)
    ]


def classify(status: int) -> str | None:
    """The failure a status stands for, or None for an answer."""
    if status == 503:
        return "shed"
    return f"status_{status}" if status >= 500 else None


async def one_request(
    client: httpx.AsyncClient, state: LoadState, path: str, due: float, timeout: float
) -> None:
    """Send one GET now and record its latency from the moment it was sent."""
    sent = time.perf_counter()
    state.in_flight += 1
    status: int | None = None
    failure: str | None = None
    try:
        async with asyncio.timeout(timeout):
            response = await client.get(path)
        status = response.status_code
        failure = classify(status)
    except (TimeoutError, httpx.TimeoutException):
        failure = "timeout"
    except httpx.HTTPError as error:
        failure = type(error).__name__
    finally:
        state.in_flight -= 1
    state.samples.append(Sample(sent - due, time.perf_counter() - sent, status, failure))


async def dispatch(
    client: httpx.AsyncClient,
    state: LoadState,
    schedule: list[tuple[float, str]],
    seconds: float,
    timeout: float,
) -> float:
    """Start every request at its scheduled time; returns the window's actual length in seconds."""
    start = time.perf_counter()
    for offset, path in schedule:
        due = start + offset
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one_request(client, state, path, due, timeout))
        state.tasks.add(task)
        task.add_done_callback(state.tasks.discard)
        state.sent += 1
    rest = start + seconds - time.perf_counter()
    if rest > 0:
        await asyncio.sleep(rest)
    return time.perf_counter() - start


async def report_progress(state: LoadState, label: str) -> None:
    """Every PROGRESS_EVERY_S, one line on stderr: sent, answered, failed, shed and in flight."""
    start = time.perf_counter()
    while True:
        await asyncio.sleep(PROGRESS_EVERY_S)
        failures = Counter(s.failure for s in state.samples if s.failure)
        print(
            f"[{label}] {time.perf_counter() - start:4.0f} s: sent {state.sent}, done {len(state.samples)}, "
            f"errors {sum(failures.values())}, shed {failures['shed']}, in flight {state.in_flight}",
            file=sys.stderr,
            flush=True,
        )


async def healthz_recovery(api_url: str, cap: float = HEALTHZ_CAP_S) -> float | None:
    """Seconds until GET /healthz answers 200, from a client of its own; None if not within `cap`."""
    start = time.perf_counter()
    async with httpx.AsyncClient(base_url=api_url) as client:
        while (elapsed := time.perf_counter() - start) < cap:
            try:
                async with asyncio.timeout(min(2.0, cap - elapsed)):
                    response = await client.get("/healthz", timeout=2.0)
                if response.status_code == 200:
                    return time.perf_counter() - start
            except (TimeoutError, httpx.HTTPError):
                pass
            await asyncio.sleep(0.1)
    return None


async def measure(
    settings: Settings, batch_id: str, job_ids: list[str], args: argparse.Namespace, label: str
) -> dict[str, Any]:
    """Run the open loop, then time the recovery and count the jobs done; returns the raw figures."""
    api_url = settings.resolved_api_url()
    schedule = build_schedule(args.rate, args.seconds, batch_id, job_ids, args.burst)
    connections = int(args.rate * args.timeout * 2) + 100
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    state = LoadState()
    async with httpx.AsyncClient(base_url=api_url, timeout=args.timeout, limits=limits) as client:
        progress = asyncio.create_task(report_progress(state, label))
        try:
            window = await dispatch(client, state, schedule, args.seconds, args.timeout)
        finally:
            progress.cancel()
        done = asyncio.create_task(
            asyncio.to_thread(succeeded_jobs, settings.resolved_database_url(), batch_id)
        )
        recovery = await healthz_recovery(api_url)
        await asyncio.gather(*list(state.tasks))
        return {"samples": state.samples, "window": window, "recovery": recovery, "jobs_done": await done}


# ---------------------------------------------------------------------------------------------------
# A big submission, and /healthz while it is accepted
# ---------------------------------------------------------------------------------------------------


def submission_bytes(prompts: int, repeat: int) -> bytes:
    """A batch of `prompts` distinct prompts, encoded once so the client's JSON work is not timed."""
    texts = [f"submission {repeat}.{i}: {SUBJECTS[i % len(SUBJECTS)]}" for i in range(prompts)]
    return json.dumps({"prompts": texts, "sizes": ["64x64"], "steps": 4, "model": MODEL}).encode()


async def poll_healthz_until(
    client: httpx.AsyncClient, state: LoadState, done: asyncio.Event, every_s: float, timeout: float
) -> None:
    """Send GET /healthz every `every_s` (each on its own task, open loop) until `done` is set."""
    start = time.perf_counter()
    for index in range(1_000_000):
        due = start + index * every_s
        delay = due - time.perf_counter()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), delay)
        if done.is_set():
            return
        task = asyncio.create_task(one_request(client, state, "/healthz", due, timeout))
        state.tasks.add(task)
        task.add_done_callback(state.tasks.discard)
        state.sent += 1


async def timed_submission(
    client: httpx.AsyncClient, body: bytes, state: LoadState, args: argparse.Namespace
) -> tuple[float, int | None]:
    """POST one batch while /healthz is polled; returns the POST's seconds and status (None: failed)."""
    done = asyncio.Event()
    poller = asyncio.create_task(poll_healthz_until(client, state, done, args.healthz_every_ms / 1000, 5.0))
    start = time.perf_counter()
    try:
        response = await client.post(
            "/v1/batches", content=body, headers={"content-type": "application/json"}
        )
        status: int | None = response.status_code
    except httpx.HTTPError as error:
        print(f"submission failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        status = None
    elapsed = time.perf_counter() - start
    done.set()
    await poller
    return elapsed, status


async def measure_submissions(settings: Settings, args: argparse.Namespace) -> dict[str, Any]:
    """Submit the big batch `args.repeats` times, each with /healthz polled alongside."""
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    state = LoadState()
    timings: list[tuple[float, int | None]] = []
    async with httpx.AsyncClient(
        base_url=settings.resolved_api_url(), timeout=120.0, limits=limits
    ) as client:
        for repeat in range(args.repeats):
            body = submission_bytes(args.submit_prompts, repeat)
            timings.append(await timed_submission(client, body, state, args))
            await asyncio.gather(*list(state.tasks))  # polls sent during the POST finish before the next
            await asyncio.sleep(0.5)
    return {"timings": timings, "healthz": state.samples}


def submission_rows(backend: str, args: argparse.Namespace, figures: dict[str, Any]) -> list[dict[str, Any]]:
    """The `submit_10k` and `healthz_during_submit_10k` rows of one backend's run."""
    suffix = "10k" if args.submit_prompts == 10_000 else str(args.submit_prompts)
    seconds = [elapsed for elapsed, _ in figures["timings"]]
    polls: list[Sample] = figures["healthz"]
    failures = Counter(s.failure or (None if s.status == 200 else f"status_{s.status}") for s in polls)
    failures.pop(None, None)
    common = {
        "backend": backend,
        "machine": f"{os.cpu_count()}-core CPU",
        "prompts": args.submit_prompts,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "load_avg_1m": round(os.getloadavg()[0], 2),  # at the end, this run included: the machine is shared
    }
    submit = {
        "name": f"submit_{suffix}",
        **common,
        "requests": len(seconds),
        "errors": sum(status != 201 for _, status in figures["timings"]),
        "p50_ms": percentile_ms(seconds, 0.50),
        "p99_ms": percentile_ms(seconds, 0.99),
        "seconds": round(max(seconds), 3),  # the slowest of the repeats
        "each_s": [round(value, 3) for value in seconds],
        "messages_in_redis": figures["messages"],
    }
    healthz = {
        "name": f"healthz_during_submit_{suffix}",
        **common,
        "requests": len(polls),
        "errors": sum(failures.values()),
        "p50_ms": percentile_ms([s.latency_s for s in polls], 0.50),
        "p99_ms": percentile_ms([s.latency_s for s in polls], 0.99),
        "max_ms": percentile_ms([s.latency_s for s in polls], 1.0),
        "seconds": round(sum(seconds), 3),  # how long submissions were in flight, all repeats
        "every_ms": args.healthz_every_ms,
        "error_kinds": dict(sorted(failures.items())),
    }
    return [submit, healthz]


# ---------------------------------------------------------------------------------------------------
# Rows and the results file
# ---------------------------------------------------------------------------------------------------


def percentile_ms(values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile of seconds, in milliseconds."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(0, math.ceil(fraction * len(ordered)) - 1)] * 1000, 1)


def make_row(backend: str, args: argparse.Namespace, figures: dict[str, Any]) -> dict[str, Any]:
    """The row for one backend from the raw figures of its run."""
    samples: list[Sample] = figures["samples"]
    latencies = [s.latency_s for s in samples]
    failures = Counter(s.failure for s in samples if s.failure)
    recovery = figures["recovery"]
    name = f"status polls at {args.rate:g}/s for {args.seconds:g} s, a worker rendering"
    if args.burst:
        # A burst is overload by design: a 503 with Retry-After is the right answer, not an error.
        name = f"a burst of {args.burst} status polls at once, a worker rendering"
    return {
        "name": name,
        "backend": backend,
        "requests": len(samples),
        "errors": sum(failures.values()) - (failures["shed"] if args.burst else 0),
        "shed": failures["shed"],
        "p50_ms": percentile_ms(latencies, 0.50),
        "p99_ms": percentile_ms(latencies, 0.99),
        "max_ms": percentile_ms(latencies, 1.0),
        "seconds": round(figures["window"], 2),
        "achieved_rate": round(len(samples) / figures["window"], 1),
        "healthz_recovery_s": round(recovery if recovery is not None else HEALTHZ_CAP_S, 2),
        "healthz_recovered": recovery is not None,
        "jobs_done_during": figures["jobs_done"],
        "machine": f"{os.cpu_count()}-core CPU",
        "error_kinds": dict(sorted(failures.items())),
        "send_lag_p99_ms": percentile_ms([s.lag_s for s in samples], 0.99),
    }


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
    """What the rows were measured with (a submission run leaves the polling runs' settings alone)."""
    common = {
        "benchmark": "api-load",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": f"{os.cpu_count()}-core CPU",
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "model": MODEL,
    }
    if args.submit_prompts:
        submission = {"repeats": args.repeats, "healthz_every_ms": args.healthz_every_ms}
        return {**common, "submit_prompts": args.submit_prompts, **submission}
    return {
        **common,
        "rate": args.rate,
        "seconds": args.seconds,
        "timeout_s": args.timeout,
        "prompts": args.prompts,
        "steps": args.steps,
        "size": args.size,
        "latency": "from send to response, every request; failed ones at the time they took to fail",
    }


def save_row(path: Path, meta: dict[str, Any], row: dict[str, Any]) -> None:
    """Merge the row into the results file, replacing a row of the same name and backend."""
    data = json.loads(path.read_text()) if path.exists() else {"meta": {}, "rows": []}
    key = (row["name"], row["backend"])
    rows = [r for r in data.get("rows", []) if (r.get("name"), r.get("backend")) != key] + [row]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": {**data.get("meta", {}), **meta}, "rows": rows}, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------
# One backend, start to finish
# ---------------------------------------------------------------------------------------------------


def run_submissions(settings: Settings, backend: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Time the big submissions on a running API and check every job got its message."""
    figures = asyncio.run(measure_submissions(settings, args))
    figures["messages"] = Publisher(settings).queue_length()
    expected = sum(status == 201 for _, status in figures["timings"]) * args.submit_prompts
    if figures["messages"] != expected:
        print(f"[{backend}] {figures['messages']} messages in Redis, {expected} expected", file=sys.stderr)
    return submission_rows(backend, args, figures)


def run_backend(backend: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Start a stack on the backend, submit the batch, load it, and always tear everything down."""
    workdir = Path(tempfile.mkdtemp(prefix=f"nr-load-{backend}-"))
    database_url = create_postgres_database(args.postgres_admin_url) if backend == "postgres" else None
    stack: Stack | None = None
    try:
        settings = make_settings(workdir, database_url, args.model_cache)
        stack = Stack(settings)
        print(f"[{backend}] starting the stack in {workdir}", file=sys.stderr, flush=True)
        if args.submit_prompts:
            stack.start(worker=False)  # the API alone: what is measured is accepting the batch
            return run_submissions(settings, backend, args)
        stack.start()
        api_url = settings.resolved_api_url()
        batch_id, job_ids = submit_batch(api_url, batch_body(args.prompts, args.steps, args.size))
        wait_rendering(api_url, batch_id)
        print(f"[{backend}] {len(job_ids)} jobs rendering; loading", file=sys.stderr, flush=True)
        return [make_row(backend, args, asyncio.run(measure(settings, batch_id, job_ids, args, backend)))]
    finally:
        if stack is not None:
            stack.stop()
        if database_url is not None:
            drop_postgres_database(args.postgres_admin_url, database_url)
        if not args.keep_data:
            shutil.rmtree(workdir, ignore_errors=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backends", default="sqlite,postgres", help="comma-separated: sqlite, postgres")
    parser.add_argument("--rate", type=float, default=200.0, help="requests per second")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the load window")
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="seconds before a request counts as failed"
    )
    parser.add_argument(
        "--burst", type=int, default=0, help="send this many polls at once instead of the open loop"
    )
    parser.add_argument("--prompts", type=int, default=300, help="prompts in the batch the worker renders")
    parser.add_argument(
        "--submit-prompts",
        type=int,
        default=0,
        help="measure submitting a batch of this many prompts instead",
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="submissions per backend with --submit-prompts"
    )
    parser.add_argument("--healthz-every-ms", type=float, default=20.0, help="/healthz poll interval")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", default="64x64")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "api-load.json")
    parser.add_argument("--model-cache", type=Path, default=Path(tempfile.gettempdir()) / "nr-load-models")
    parser.add_argument("--postgres-admin-url", default=POSTGRES_ADMIN_URL)
    parser.add_argument("--keep-data", action="store_true", help="keep each run's data dir (logs, images)")
    args = parser.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(args.backends) - {"sqlite", "postgres"}
    if unknown:
        parser.error(f"unknown backends: {', '.join(sorted(unknown))}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run every backend in turn; a backend that fails is reported and the others still run."""
    args = parse_args(argv)
    failed = 0
    for backend in args.backends:
        try:
            rows = run_backend(backend, args)
        except Exception as error:  # report it and go on with the next backend
            print(f"[{backend}] failed: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
            failed += 1
            continue
        for row in rows:
            save_row(args.out, run_meta(args), row)
            print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
