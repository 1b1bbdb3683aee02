"""Multi-GPU benchmark: the overnight batch on one worker, on one worker per GPU, and with one killed.

Each run starts a fresh stack the way `nightrender up --gpus` does (embedded Redis, SQLite, the uvicorn
API, one Celery worker per GPU, each pinned with CUDA_VISIBLE_DEVICES and capped at --budget GB, the
emulated consumer card), submits the same mixed-size batch over HTTP and reads every figure back from
SQL. The baseline (one worker) runs in the same invocation, on the same machine, so `speedup_vs_one`
compares like with like. The third run kills one of the two workers (SIGKILL) once a third of the batch
is done and lets the other finish: it checks that no job is lost and none runs twice.

    python bench/multi_gpu_bench.py                    # 2+ GPUs: bench/results/multi-gpu-<card>.json
    python bench/multi_gpu_bench.py --model synthetic:tiny --sizes 64x64,64x96 --steps 2 --prompts 6 \\
        --device-check off --out /tmp/multi-cpu.json   # CPU smoke test: two unpinned workers
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.service_bench import (
    DEFAULT_SIZES,
    FINISHED,
    BenchError,
    batch_body,
    card_slug,
    git_state,
    log,
    probe_device,
    read_jobs,
    stack_settings,
    timing_figures,
)
from cli.process_commands import worker_command
from cli.stack import Stack
from jobs.db import make_database, make_session_factory
from jobs.tables import Job, JobStats

ROOT = Path(__file__).resolve().parent.parent


class MultiStack(Stack):
    """The real Stack; on a machine without CUDA (a smoke test) the workers are started unpinned."""

    def __init__(self, *args: Any, cpu_workers: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cpu_workers = cpu_workers

    def start(self, *, api: bool = True, worker: bool = True) -> None:
        """The stack; then, for a CPU smoke test, the extra unpinned workers."""
        super().start(api=api, worker=worker)
        for index in range(1, self.cpu_workers):
            name = f"worker-{index}"
            self.spawn(name, worker_command(self.settings, name))
            self.wait_worker_ready(name, timeout=600)

    def worker_names(self) -> list[str]:
        """Every worker process this stack started."""
        return [name for name in self.processes if name.startswith("worker")]


def run_stack(args: argparse.Namespace, gpus: list[int], kill_after: float | None) -> dict[str, Any]:
    """One fresh stack with a worker per GPU in `gpus`, one batch, its figures; kill one worker if asked."""
    data_dir = Path(tempfile.mkdtemp(prefix=f"multi-{len(gpus)}w-", dir=args.work))
    settings = stack_settings(args, args.budget, data_dir)
    env = {"HEARTBEAT_STALE_S": str(args.stale_s), "RECONCILE_INTERVAL_S": "5", "HEARTBEAT_INTERVAL_S": "2"}
    if args.cuda:
        stack = MultiStack(settings, extra_env=env, gpus=gpus)
    else:
        stack = MultiStack(settings, extra_env=env, cpu_workers=len(gpus))
    row: dict[str, Any] = {}
    try:
        started = time.perf_counter()
        stack.start()
        row["start_s"] = round(time.perf_counter() - started, 2)
        row.update(run_batch(stack, args, kill_after))
    except Exception as error:  # recorded, and the next run goes on
        logs = {name: stack.log_tail(name, 20) for name in stack.processes if name.startswith("worker")}
        row.update(error=f"{type(error).__name__}: {error}"[:2000], worker_logs=logs)
    finally:
        stack.stop()
    return row


def run_batch(stack: MultiStack, args: argparse.Namespace, kill_after: float | None) -> dict[str, Any]:
    """Submit the mixed batch, wait (killing one worker part-way if asked), then read SQL."""
    killed = None
    with httpx.Client(base_url=stack.settings.resolved_api_url(), timeout=60) as http:
        created = http.post("/v1/batches", json=batch_body(args, "mixed"))
        if created.status_code != 201:
            raise BenchError(f"the batch was refused: {created.status_code} {created.text[:500]}")
        batch_id, total = created.json()["id"], len(created.json()["job_ids"])
        log(f"{len(stack.worker_names())} worker(s): batch {batch_id}, {total} jobs queued")
        deadline = time.monotonic() + args.batch_timeout
        while True:
            summary = http.get(f"/v1/batches/{batch_id}").json()
            done = sum(summary["counts"].get(status, 0) for status in FINISHED)
            if summary["status"] not in ("queued", "running"):
                break
            if kill_after is not None and killed is None and done >= kill_after * total:
                killed = kill_one_worker(stack)
            if not any(stack.processes[name].poll() is None for name in stack.worker_names()):
                raise BenchError(f"every worker exited mid-batch: {summary['counts']}")
            if time.monotonic() > deadline:
                raise BenchError(f"the batch did not finish within {args.batch_timeout:.0f}s: {summary}")
            time.sleep(0.5)
    created_at, jobs = read_jobs(stack.settings.resolved_database_url(), batch_id)
    row = {"batch_id": batch_id, **timing_figures(created_at, jobs)}
    row.update(exactly_once(stack, batch_id))
    return {**row, "killed": killed} if killed else row


def kill_one_worker(stack: MultiStack) -> dict[str, Any]:
    """SIGKILL the last worker while it renders: its job must be rendered again by the other, once."""
    name = stack.worker_names()[-1]
    process = stack.processes[name]
    process.send_signal(signal.SIGKILL)
    process.wait(30)
    log(f"killed {name} (pid {process.pid})")
    return {"worker": name, "pid": process.pid, "at": time.strftime("%H:%M:%S")}


def exactly_once(stack: MultiStack, batch_id: str) -> dict[str, Any]:
    """Lost and duplicated jobs, from SQL and the outputs folder, and how many jobs each worker did."""
    database = make_database(stack.settings.resolved_database_url())
    try:
        with make_session_factory(database)() as session:
            jobs = session.execute(
                select(Job.id, Job.status, Job.attempts, Job.result_path).where(Job.batch_id == batch_id)
            ).all()
            ids = [job.id for job in jobs]
            stats = session.scalar(select(func.count()).select_from(JobStats).where(JobStats.job_id.in_(ids)))
            per_worker = session.execute(
                select(JobStats.worker, func.count())
                .where(JobStats.job_id.in_(ids))
                .group_by(JobStats.worker)
            ).all()
    finally:
        database.dispose()
    images = [path for path in stack.settings.resolved_outputs_dir().rglob("*.png") if path.is_file()]
    return {
        "lost": sum(1 for job in jobs if job.status != "succeeded"),
        "stats_rows": stats,
        "image_files": len(images),
        "duplicated": max(0, len(images) - len(jobs)) + max(0, (stats or 0) - len(jobs)),
        "rerun_jobs": sum(1 for job in jobs if job.attempts > 1),
        "jobs_per_worker": {str(worker): count for worker, count in per_worker},
    }


def result_row(
    name: str, gpus: list[int], row: dict[str, Any], card: str, one: float | None
) -> dict[str, Any]:
    """The issue's fields first (name ... card), then the rest."""
    s = row.get("s_per_image")
    speedup = round(one / s, 3) if one and s else None
    workers = len(gpus) - (1 if row.get("killed") else 0)
    if len(gpus) > 1:  # wall per job minus one worker's GPU seconds means nothing with several workers
        row.pop("overhead_ms_per_job", None)
    head = {"name": name, "gpus": len(gpus), "workers": workers, "images": row.get("images")}
    head.update(s_per_image=s, speedup_vs_one=speedup, card=card)
    return {**head, **{k: v for k, v in row.items() if k not in head}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="default bench/results/multi-gpu-<card>.json")
    parser.add_argument("--cache", type=Path, default=Path("/tmp/nightrender-models"))
    parser.add_argument("--work", type=Path, default=None, help="where each run's fresh data dir goes")
    parser.add_argument("--model", default="synthetic:full")
    parser.add_argument("--budget", type=float, default=12.0, help="GB per worker: the emulated card")
    parser.add_argument("--prompts", type=int, default=24, help="x every size = the batch")
    parser.add_argument("--sizes", default=DEFAULT_SIZES)
    parser.add_argument("--steps", type=int, default=9)
    parser.add_argument("--runs", default="one,two,killed", help="one,two,killed")
    parser.add_argument("--kill-after", type=float, default=1 / 3, help="share of the batch done at the kill")
    parser.add_argument(
        "--stale-s", type=float, default=20.0, help="HEARTBEAT_STALE_S: the reconciler's wait"
    )
    parser.add_argument("--batch-timeout", type=float, default=600.0)
    parser.add_argument("--device-check", choices=("on", "off"), default="on", help="off allows a CPU run")
    parser.add_argument("--note", default=None, help="a sentence kept in the file's meta")
    return parser.parse_args(argv)


def main() -> None:
    """The one-worker baseline, then two workers, then two with one killed; rows written as they finish."""
    args = parse_args()
    device = probe_device()
    args.cuda = bool(device["cuda"])
    if args.device_check == "on" and not args.cuda:
        raise SystemExit("no CUDA device: this benchmark needs GPUs (--device-check off: CPU smoke test)")
    results = ROOT / "bench" / "results" if args.cuda else Path(tempfile.gettempdir())
    args.out = args.out or results / f"multi-gpu-{card_slug(device['card'])}.json"
    args.work = args.work or Path(tempfile.mkdtemp(prefix="nightrender-multi-"))
    args.work.mkdir(parents=True, exist_ok=True)
    meta = {
        "card": device["card"],
        "torch": device["torch"],
        "diffusers": device["diffusers"],
        "commit": git_state(),
        "model": args.model,
        "steps": args.steps,
        "budget_gb_per_worker": args.budget,
        "batch": f"{args.prompts} prompts x {args.sizes}",
        "kill_after": round(args.kill_after, 3),
        "heartbeat_stale_s": args.stale_s,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "note": args.note,
    }
    plan = {
        "one": ("1 GPU, 1 worker", [0], None),
        "two": ("2 GPUs, 2 workers", [0, 1], None),
        "killed": ("2 GPUs, 2 workers, one killed mid-batch", [0, 1], args.kill_after),
    }
    rows: list[dict[str, Any]] = []
    one: float | None = None
    for key in args.runs.split(","):
        name, gpus, kill_after = plan[key]
        log(f"{name}: starting")
        row = result_row(name, gpus, run_stack(args, gpus, kill_after), device["card"], one)
        one = row["s_per_image"] if key == "one" else one
        rows.append(row)
        print(json.dumps(row, default=str), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
