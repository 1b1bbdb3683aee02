"""Service benchmark: the product as a user runs it, fed over HTTP, with every figure read back from SQL.

For each run it starts a fresh stack the way `nightrender run` does (embedded Redis, SQLite, migrations,
the uvicorn API and one Celery worker whose VRAM_BUDGET_GB is the emulated consumer card), submits one
overnight-style batch (prompts of very different lengths x interleaved sizes) through `POST /v1/batches`,
polls it, then reads the job timestamps and the `job_stats` rows from SQL and writes one row. Before
that, a child process measures the reference (diffusers, everything on the GPU, eager, 1024², 9 steps),
the compiled compute bound and the pinned host-to-device bandwidth, and exits, so its GPU memory is gone
before any worker starts. Rows are written as they finish, so a run cut short still reports.

    python bench/service_bench.py                      # GPU machine: bench/results/service-<card>.json
    python bench/service_bench.py --model synthetic:tiny --sizes 64x64,64x96 --steps 2 --budgets 12 \\
        --stages service --device-check off --out /tmp/service-cpu.json     # CPU smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import MetaData, Table, select

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cli.stack import Stack
from jobs.db import make_database, make_session_factory
from jobs.settings import Settings
from jobs.tables import Batch, Job, JobStats

ROOT = Path(__file__).resolve().parent.parent
GB = 1024**3
DEFAULT_SIZES = "1024x1024,896x1152,1152x896,768x1344"
PROMPT_LENGTHS = (5, 40, 120)
VOCABULARY = (  # noqa: SIM905 - a paragraph of words reads better than a list literal
    "lighthouse cliff storm sea dusk harbour fishing boat lantern fog mountain valley river forest pine "
    "meadow wildflowers castle ruins tower bridge city street neon rain reflections market crowd cat fox "
    "owl horse dragon astronaut robot portrait old woman child knight samurai dancer musician violin "
    "golden hour moonlight sunrise snow desert dunes canyon waterfall glacier volcano island reef coral "
    "jellyfish whale oil painting watercolour charcoal sketch photograph cinematic wide angle close-up "
    "macro bokeh dramatic soft light volumetric rays mist warm cold palette muted vivid intricate detail "
    "texture brushstrokes baroque minimalist art nouveau ukiyo-e isometric low poly studio lighting"
).split()
FINISHED = ("succeeded", "failed", "cancelled")


class BenchError(RuntimeError):
    """A run that could not produce its figures (the reason goes into the row)."""


class BatchTimeout(BenchError):
    """A batch still unfinished at --batch-timeout."""


class BenchStack(Stack):
    """The real Stack, with a worker-ready wait long enough for a full-size load and compile warm-up."""

    ready_timeout = 900.0

    def wait_worker_ready(self, name: str = "worker", timeout: float = 300.0) -> None:
        """Wait for the worker's ready row, at least `ready_timeout` seconds."""
        super().wait_worker_ready(name, max(timeout, self.ready_timeout))


class Recorder:
    """Collects rows and meta, prints each row as a JSON line and rewrites the JSON file."""

    def __init__(self, path: Path, meta: dict[str, Any], rows: list[dict[str, Any]] | None = None) -> None:
        self.path, self.meta = path, meta
        self.rows: list[dict[str, Any]] = rows or []

    def add(self, row: dict[str, Any]) -> None:
        """Add a finished row (replacing an earlier one of the same batch and budget) and save."""
        key = (row["batch"], row["budget_gb"])
        self.rows = [r for r in self.rows if (r.get("batch"), r.get("budget_gb")) != key] + [row]
        row.update(derived(row, self.meta))
        print(json.dumps(row), flush=True)
        self.save()

    def save(self) -> None:
        """Recompute what depends on the reference, then write everything measured so far."""
        for row in self.rows:
            row.update(derived(row, self.meta))
        self.meta.pop("mixed_penalty", None)
        self.meta.pop("mixed_penalty_budget_gb", None)
        self.meta.update(mixed_penalty(self.rows, self.meta.get("uniform_budget_gb")))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps({"meta": self.meta, "rows": self.rows}, indent=2))


def derived(row: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """The figures that need the reference: ratio, and the bound max(compiled, streamed / bandwidth)."""
    s, reference, bandwidth = row.get("s_per_image"), meta.get("reference_s"), meta.get("pinned_gb_per_s")
    streamed = row.get("streamed_bytes_per_image")  # transformer blocks only; text-encoder bytes left out
    copy_s = streamed / (bandwidth * GB) if streamed is not None and bandwidth else None
    terms = [t for t in (meta.get("compiled_s"), copy_s) if t is not None]
    bound = max(terms) if terms else None
    return {
        "ratio": round(reference / s, 3) if reference and s else None,
        "copy_s_per_image": rounded(copy_s),
        "bound_s": rounded(bound),
        "of_bound": round(bound / s, 3) if bound and s else None,
    }


def previous_run(path: Path, meta: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """With --append: the earlier file's meta (this run's filling its gaps) and rows, if it matches."""
    if not path.exists():
        return meta, []
    data = json.loads(path.read_text())
    old, rows = data.get("meta", {}), data.get("rows", [])
    for key in ("card", "model", "steps", "prompts", "sizes", "compile"):
        if old.get(key) != meta.get(key):
            raise SystemExit(f"--append: {path} has {key}={old.get(key)!r}, this run {meta.get(key)!r}")
    merged = {**old, **{k: v for k, v in meta.items() if old.get(k) is None}}
    merged["budgets_gb"] = sorted(set(old.get("budgets_gb") or []) | set(meta["budgets_gb"]), reverse=True)
    return merged, rows


def mixed_penalty(rows: list[dict[str, Any]], budget: float | None) -> dict[str, Any]:
    """Mixed s/image over uniform s/image minus one, at the uniform batch's budget (once both exist)."""
    complete = [r for r in rows if r.get("budget_gb") == budget and not r.get("error")]
    found: dict[str, float] = {r["batch"]: r["s_per_image"] for r in complete if r.get("s_per_image")}
    if budget is None or "mixed" not in found or "uniform" not in found:
        return {}
    return {
        "mixed_penalty": round(found["mixed"] / found["uniform"] - 1, 4),
        "mixed_penalty_budget_gb": budget,
    }


def build_prompts(count: int, seed: int = 2024) -> list[str]:
    """Deterministic prompts of clearly different lengths (5, 40 and 120 words, in turn)."""
    rng = random.Random(seed)
    lengths = [PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)] for i in range(count)]
    return [" ".join(rng.choice(VOCABULARY) for _ in range(n)) for n in lengths]


def batch_body(args: argparse.Namespace, batch: str) -> dict[str, Any]:
    """The one batch request: mixed = prompts x every size; uniform = prompts x as many seeds, one size."""
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    body: dict[str, Any] = {"prompts": build_prompts(args.prompts), "steps": args.steps, "model": args.model}
    if batch == "mixed":
        return {**body, "sizes": sizes, "seeds": [1]}
    return {**body, "sizes": sizes[:1], "seeds": list(range(1, len(sizes) + 1))}


# ---------------------------------------------------------------------------------------------------
# The reference child: eager reference, pinned bandwidth and compiled compute, one JSON line on stdout.
# ---------------------------------------------------------------------------------------------------


def reference_child(args: argparse.Namespace) -> None:
    """Measure the reference, the pinned bandwidth and the compiled s/image; print them as one JSON line."""
    import torch

    from bench.run_bench import DEVICE, gigabytes, load, set_cap, time_diffusers

    loaded = load(args.cache, args.model)
    set_cap(None)
    pipe = loaded.pipeline.to(DEVICE)
    result: dict[str, Any] = {"card": torch.cuda.get_device_name(DEVICE)}
    result["pinned_gb_per_s"] = round(pinned_bandwidth(), 2)
    seconds, reserved = time_diffusers(pipe, args.images)
    result.update(reference_s=round(seconds, 4), reference_peak_reserved_gb=gigabytes(reserved))
    result.update(compiled_seconds(pipe, args.images))
    print(json.dumps(result), flush=True)


def pinned_bandwidth(gigabytes: int = 2) -> float:
    """GB/s of copying a pinned uint8 host tensor into a device buffer (best of three, after a warm-up)."""
    import torch

    from bench.run_bench import DEVICE, seconds_of

    host = torch.empty(gigabytes * GB, dtype=torch.uint8).pin_memory()
    target = torch.empty_like(host, device=DEVICE)

    def copy() -> None:
        target.copy_(host, non_blocking=True)

    copy()
    return gigabytes / min(seconds_of(copy) for _ in range(3))


def compiled_seconds(pipe: Any, images: int) -> dict[str, Any]:
    """s/image at 1024² with the transformer's repeated blocks compiled, after two warm-up calls."""
    from bench.run_bench import PROMPT, SIZE, STEPS, time_diffusers

    try:
        pipe.transformer.compile_repeated_blocks(fullgraph=True)
        pipe(PROMPT, width=SIZE, height=SIZE, num_inference_steps=STEPS, guidance_scale=0.0)
        seconds, _ = time_diffusers(pipe, images)  # its own warm-up call is the second
    except Exception as error:  # a compile failure must not lose the eager reference
        return {"compiled_s": None, "compile_error": f"{type(error).__name__}: {error}"[:500]}
    return {"compiled_s": round(seconds, 4)}


def stage_reference(rec: Recorder, args: argparse.Namespace) -> None:
    """Run the reference child and keep its figures in the meta (or the reason it failed)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--stages", "reference-child", "--model",
               args.model, "--cache", str(args.cache), "--images", str(args.images)]  # fmt: skip
    log(f"reference: {args.images} images after a warm-up, eager then compiled, in a child process")
    started = time.perf_counter()
    try:
        done = subprocess.run(
            command, cwd=ROOT, stdout=subprocess.PIPE, text=True, timeout=args.reference_timeout
        )
    except subprocess.TimeoutExpired:
        rec.meta["reference_error"] = f"the reference child ran past {args.reference_timeout}s"
        return
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        rec.meta["reference_error"] = f"exit {done.returncode}: {done.stdout[-2000:]}"
        return
    rec.meta.update(json.loads(lines[-1]), reference_wall_s=round(time.perf_counter() - started, 1))
    print(json.dumps({"reference": json.loads(lines[-1])}), flush=True)
    rec.save()


# ---------------------------------------------------------------------------------------------------
# One service run: a fresh stack, one batch, figures from SQL.
# ---------------------------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1 (all held open at once while picking)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def stack_settings(args: argparse.Namespace, budget: float, data_dir: Path) -> Settings:
    """One fresh stack's settings: this model only, this budget, its own data dir, database and ports."""
    redis_port, api_port = free_ports(2)
    return Settings(
        data_dir=data_dir,
        database_url=None,
        redis_url=None,
        outputs_dir=None,
        api_url=None,
        model_cache_dir=args.cache,
        worker_model=args.model,
        allowed_models=args.model,
        vram_budget_gb=f"{budget:g}",
        embedded_redis_port=redis_port,
        api_host="127.0.0.1",
        api_port=api_port,
    )


def compile_env(args: argparse.Namespace) -> dict[str, str]:
    """COMPILE passed through to the worker when given (otherwise the worker's own default holds)."""
    return {"COMPILE": args.compile} if args.compile else {}


def run_service(rec: Recorder, args: argparse.Namespace, batch: str, budget: float) -> None:
    """One fresh stack at one budget and one batch; always a row (an error row if anything failed)."""
    name = f"service {batch} @ {budget:g} GB"
    row: dict[str, Any] = {"name": name, "kind": "service", "batch": batch, "budget_gb": budget}
    row.update(card=rec.meta.get("card"), model=args.model, steps=args.steps)
    data_dir = Path(tempfile.mkdtemp(prefix=f"{batch}-{budget:g}gb-", dir=args.work))
    stack = BenchStack(stack_settings(args, budget, data_dir), extra_env=compile_env(args))
    stack.ready_timeout = args.start_timeout
    try:
        log(f"{name}: starting the stack in {data_dir}")
        started = time.perf_counter()
        stack.start()
        row["worker_start_s"] = round(time.perf_counter() - started, 2)
        row.update(run_batch(stack, args, batch, name))
    except Exception as error:  # record it and go on to the next run
        row.update(error=f"{type(error).__name__}: {error}"[:2000], worker_log=stack.log_tail("worker", 20))
    finally:
        stack.stop()
    rec.add(row)


def run_batch(stack: Stack, args: argparse.Namespace, batch: str, name: str) -> dict[str, Any]:
    """Submit the batch over HTTP, wait, and compute the row's figures from SQL (partial after a timeout)."""
    error = None
    with httpx.Client(base_url=stack.settings.resolved_api_url(), timeout=60) as http:
        created = http.post("/v1/batches", json=batch_body(args, batch))
        if created.status_code != 201:
            raise BenchError(f"the batch was refused: {created.status_code} {created.text[:500]}")
        batch_id = created.json()["id"]
        log(f"{name}: batch {batch_id}, {len(created.json()['job_ids'])} jobs queued")
        try:
            wait_for_batch(http, stack, batch_id, args.batch_timeout, name)
        except BatchTimeout as timeout:
            error = f"BatchTimeout: {timeout} (the figures are of the jobs finished by then)"
    created_at, jobs = read_jobs(stack.settings.resolved_database_url(), batch_id)
    row = {"batch_id": batch_id, **figures(created_at, jobs, args.steps, stack.settings)}
    return {**row, "error": error} if error else row


def wait_for_batch(http: httpx.Client, stack: Stack, batch_id: str, timeout: float, name: str) -> None:
    """Poll the batch until every job has finished; a progress line about every 10 s."""
    deadline, last_line = time.monotonic() + timeout, time.monotonic()
    while True:
        summary = http.get(f"/v1/batches/{batch_id}").json()
        if summary["status"] not in ("queued", "running"):
            return
        if not stack.worker_alive():
            raise BenchError(f"the worker exited mid-batch: {summary['counts']}")
        if time.monotonic() > deadline:
            raise BatchTimeout(f"the batch did not finish within {timeout:.0f}s: {summary['counts']}")
        if time.monotonic() - last_line >= 10:
            log(progress_line(name, summary))
            last_line = time.monotonic()
        time.sleep(1.0)


def progress_line(name: str, summary: dict[str, Any]) -> str:
    """One line of batch progress."""
    counts = summary["counts"]
    done = sum(counts.get(status, 0) for status in FINISHED)
    return (
        f"{name}: {done}/{summary['total']} done, {counts.get('running', 0)} running, "
        f"progress {summary.get('progress')}, eta {summary.get('eta_seconds')} s"
    )


def read_jobs(url: str, batch_id: str) -> tuple[datetime, list[dict[str, Any]]]:
    """The batch's creation time and its jobs, each with its whole job_stats row (reflected) and plan."""
    engine = make_database(url)
    try:
        stats = Table(JobStats.__tablename__, MetaData(), autoload_with=engine)
        with make_session_factory(engine)() as session:
            created = session.scalar(select(Batch.created_at).where(Batch.id == batch_id))
            jobs = session.scalars(select(Job).where(Job.batch_id == batch_id)).all()
            joined = select(stats).join(Job, Job.id == stats.c.job_id).where(Job.batch_id == batch_id)
            by_job = {row["job_id"]: dict(row) for row in session.execute(joined).mappings()}
    finally:
        engine.dispose()
    if created is None:
        raise BenchError(f"batch {batch_id} is not in the database")
    return created, [job_record(job, by_job.get(job.id, {})) for job in jobs]


def job_record(job: Job, stats: dict[str, Any]) -> dict[str, Any]:
    """What the figures need of one job: status, size, finish time, stats columns and the parsed plan."""
    plan = stats.get("plan") or {}
    if isinstance(plan, str):  # a database from before migration 0008 kept the plan as JSON text
        plan = json.loads(plan)
    return {
        "status": job.status,
        "size": f"{job.width}x{job.height}",
        "finished_at": job.finished_at,
        "stats": stats,
        "plan": plan if isinstance(plan, dict) else {},
    }


# ---------------------------------------------------------------------------------------------------
# The row's figures.
# ---------------------------------------------------------------------------------------------------


def figures(created: datetime, jobs: list[dict[str, Any]], steps: int, settings: Settings) -> dict[str, Any]:
    """Every figure of a service row that SQL alone gives (ratio and bound are derived by the Recorder)."""
    row = timing_figures(created, jobs)
    row.update(memory_figures(jobs, float(settings.vram_budget_gb) * GB))
    row.update(plan_figures(jobs))
    row.update(streamed_figures(jobs, steps))
    return row


def gpu_seconds(job: dict[str, Any]) -> float:
    """A job's encode + denoise + decode seconds."""
    stats = job["stats"]
    return float(sum(stats.get(key) or 0.0 for key in ("encode_s", "denoise_s", "decode_s")))


def mean(values: list[float]) -> float | None:
    """The mean, or None of nothing."""
    return sum(values) / len(values) if values else None


def rounded(value: float | None, digits: int = 3) -> float | None:
    """Rounded, keeping None."""
    return None if value is None else round(value, digits)


def timing_figures(created: datetime, jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch-level seconds per image, first-job latency, GPU seconds and the per-job overhead."""
    done = sorted((j for j in jobs if j["finished_at"] is not None), key=lambda j: j["finished_at"])
    succeeded = [j for j in jobs if j["status"] == "succeeded"]
    row: dict[str, Any] = {
        "images": len(succeeded),
        "jobs": len(jobs),
        "failed": len(jobs) - len(succeeded),
        "sizes": sorted({j["size"] for j in jobs}),
        "s_per_image": None,
        "first_job_latency_s": None,
        "gpu_s_per_image": rounded(mean([gpu_seconds(j) for j in succeeded])),
        "overhead_ms_per_job": None,
    }
    if not done or not succeeded:
        return row
    row["s_per_image"] = round((done[-1]["finished_at"] - created).total_seconds() / len(succeeded), 3)
    row["first_job_latency_s"] = round((done[0]["finished_at"] - created).total_seconds(), 2)
    if len(done) > 1:
        steady = (done[-1]["finished_at"] - done[0]["finished_at"]).total_seconds() / (len(done) - 1)
        row["steady_s_per_job"] = round(steady, 3)
        gpu = mean([gpu_seconds(j) for j in done[1:]]) or 0.0
        row["overhead_ms_per_job"] = round(1000 * (steady - gpu), 1)
    return row


def memory_figures(jobs: list[dict[str, Any]], budget_bytes: float) -> dict[str, Any]:
    """Peaks over the batch, the worst peak prediction and how many jobs went over the budget."""
    stats = [j["stats"] for j in jobs if j["stats"]]
    reserved = [s["peak_reserved_bytes"] for s in stats if s.get("peak_reserved_bytes") is not None]
    allocated = [s["peak_allocated_bytes"] for s in stats if s.get("peak_allocated_bytes") is not None]
    errors = [
        abs(s["predicted_peak_bytes"] - s["peak_allocated_bytes"]) / s["peak_allocated_bytes"]
        for s in stats
        if s.get("predicted_peak_bytes") is not None and s.get("peak_allocated_bytes")
    ]
    return {
        "peak_reserved_gb": rounded(max(reserved) / GB) if reserved else None,
        "peak_allocated_gb": rounded(max(allocated) / GB) if allocated else None,
        "max_predicted_error": rounded(max(errors), 4) if errors else None,
        "over_budget": sum(r > budget_bytes for r in reserved),
    }


def optional_column(jobs: list[dict[str, Any]], column: str) -> list[Any] | None:
    """A job_stats column's values over the batch, or None where this schema has no such column yet."""
    rows = [j["stats"] for j in jobs if j["stats"]]
    if not rows or not any(column in s for s in rows):
        return None
    return [s.get(column) for s in rows]


def plan_figures(jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """Out-of-memory retries, the distinct plans, re-placements, time spent placing and recompiles."""
    changed = optional_column(jobs, "placement_changed")
    place_s = optional_column(jobs, "place_s")
    recompiles = optional_column(jobs, "recompiles")
    plans = [j["plan"] for j in jobs]
    return {
        "oom_retries": sum(max(0, len(p.get("attempts") or [None]) - 1) for p in plans),
        "plans": sorted({p["description"] for p in plans if p.get("description")}),
        "replacements": None if changed is None else sum(bool(v) for v in changed),
        "place_s_total": None if place_s is None else round(sum(v or 0.0 for v in place_s), 3),
        "recompiles": None if recompiles is None else sum(v or 0 for v in recompiles),
    }


def streamed_figures(jobs: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    """Transformer bytes streamed per image: steps x the plans' streamed_bytes_per_step (mean over jobs)."""
    per_step = [j["plan"]["streamed_bytes_per_step"] for j in jobs if "streamed_bytes_per_step" in j["plan"]]
    streamed = round(steps * sum(per_step) / len(per_step)) if per_step else None
    return {
        "streamed_bytes_per_image": streamed,
        "streamed_gb_per_image": rounded(streamed / GB) if streamed is not None else None,
    }


# ---------------------------------------------------------------------------------------------------
# The run as a whole.
# ---------------------------------------------------------------------------------------------------

PROBE = (
    "import json, torch, diffusers; cuda = torch.cuda.is_available(); "
    "print(json.dumps({'cuda': cuda, 'card': torch.cuda.get_device_name(0) if cuda else 'cpu', "
    "'torch': torch.__version__, 'diffusers': diffusers.__version__}))"
)


def log(message: str) -> None:
    """A progress line on stderr (stdout carries the JSON rows)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def probe_device() -> dict[str, Any]:
    """The card and versions, from a short-lived child: this process never holds a CUDA context."""
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, check=True, capture_output=True, text=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def card_slug(card: str) -> str:
    """h100 / h200 from the device name, else the name as a slug."""
    match = re.search(r"h[12]00", card.lower())
    return match.group(0) if match else re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-") or "unknown"


def git_state() -> str | None:
    """The commit benchmarked, with '+dirty' when the tree has changes."""

    def git(*words: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", *words], cwd=ROOT, capture_output=True, text=True)

    try:
        commit, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain")
    except OSError:
        return None
    if commit.returncode:
        return None
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def run_meta(args: argparse.Namespace, device: dict[str, Any]) -> dict[str, Any]:
    """What the run was: card, versions, model, batch shape, budgets and settings."""
    return {
        "card": device["card"],
        "torch": device["torch"],
        "diffusers": device["diffusers"],
        "commit": git_state(),
        "model": args.model,
        "steps": args.steps,
        "prompts": args.prompts,
        "prompt_lengths_words": list(PROMPT_LENGTHS),
        "sizes": args.sizes.split(","),
        "budgets_gb": args.budgets,
        "uniform_budget_gb": args.uniform_budget or None,
        "compile": args.compile or "unset (worker default)",
        "reference_images": args.images,
        "work_dir": str(args.work),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def runs(args: argparse.Namespace) -> list[tuple[str, float]]:
    """Mixed at every budget, then the uniform batch at its budget."""
    mixed = [("mixed", budget) for budget in args.budgets]
    return mixed + ([("uniform", args.uniform_budget)] if args.uniform_budget else [])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/service-<card>.json")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/nightrender-models"))
    parser.add_argument("--work", type=Path, default=None, help="where each run's fresh data dir goes")
    parser.add_argument("--stages", default="reference,service", help="reference,service")
    parser.add_argument("--model", default="synthetic:full")
    parser.add_argument("--budgets", type=floats, default=[12.0, 8.0, 6.0, 4.0], help="GB, e.g. 12,8,6,4")
    parser.add_argument("--uniform-budget", type=float, default=12.0, help="GB; 0 skips the uniform batch")
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--sizes", default=DEFAULT_SIZES)
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--images", type=int, default=3, help="reference images after the warm-up")
    parser.add_argument("--compile", default=os.environ.get("COMPILE"), help="auto|on|off for the worker")
    parser.add_argument("--batch-timeout", type=float, default=400.0)
    parser.add_argument("--start-timeout", type=float, default=900.0, help="seconds for the worker to load")
    parser.add_argument("--reference-timeout", type=float, default=1800.0)
    parser.add_argument("--device-check", choices=("on", "off"), default="on", help="off allows a CPU run")
    parser.add_argument(
        "--append",
        action="store_true",
        help="add to --out (same card and batch shape): split a run into parts",
    )
    return parser.parse_args(argv)


def floats(text: str) -> list[float]:
    """'12,8,6' as numbers."""
    return [float(part) for part in text.split(",") if part.strip()]


def main() -> None:
    """Run the requested stages."""
    args = parse_args()
    stages = set(args.stages.split(","))
    if "reference-child" in stages:
        reference_child(args)
        return
    device = probe_device()
    if args.device_check == "on" and not device["cuda"]:
        raise SystemExit("no CUDA device: this benchmark needs a GPU (--device-check off: CPU smoke test)")
    results = ROOT / "bench" / "results" if device["cuda"] else Path(tempfile.gettempdir())
    args.out = args.out or results / f"service-{card_slug(device['card'])}.json"
    args.work = args.work or Path(tempfile.mkdtemp(prefix="nightrender-service-"))
    args.work.mkdir(parents=True, exist_ok=True)
    meta = run_meta(args, device)
    rows: list[dict[str, Any]] = []
    if args.append:
        meta, rows = previous_run(args.out, meta)
    rec = Recorder(args.out, meta, rows)
    if "reference" in stages:
        if device["cuda"]:
            stage_reference(rec, args)
        else:
            rec.meta["reference_error"] = "no CUDA device: no reference, so no ratio"
    if "service" in stages:
        for batch, budget in runs(args):
            run_service(rec, args, batch, budget)
    rec.save()
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
