"""The commands and environments of the stack's processes: the API under uvicorn and a Celery worker.

`cli.stack.Stack` spawns them; `nightrender api` and `nightrender worker` exec them in the foreground.
"""

from __future__ import annotations

import shutil
import sys

from cli.gpus import gpu_worker_name
from jobs.queue import model_queue
from jobs.settings import Settings


def worker_overrides(model: str | None, budget: str | None) -> dict[str, str]:
    """The environment that makes a started worker load `model` under `budget` (None keeps the settings)."""
    chosen = {"WORKER_MODEL": model, "VRAM_BUDGET_GB": budget}
    return {name: value for name, value in chosen.items() if value is not None}


def shared_metrics_env(settings: Settings) -> dict[str, str]:
    """PROMETHEUS_MULTIPROC_DIR for several API processes, as a fresh empty DATA_DIR/prometheus.

    Several API processes share their request metrics through files (prometheus-client's multiprocess
    mode); the folder must be empty at each start, or dead processes' counts remain.
    """
    if settings.api_workers < 2 or settings.prometheus_multiproc_dir is not None:
        return {}
    folder = settings.data_dir.resolve() / "prometheus"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return {"PROMETHEUS_MULTIPROC_DIR": str(folder)}


def api_command(settings: Settings) -> list[str]:
    """The HTTP API under uvicorn, in API_WORKERS processes (each with its own threads and pool)."""
    workers = ["--workers", str(settings.api_workers)] if settings.api_workers > 1 else []
    return [sys.executable, "-m", "uvicorn", "api.app:create_app", "--factory",
            "--host", settings.api_host, "--port", str(settings.api_port), *workers]  # fmt: skip


def worker_command(settings: Settings, name: str | None = None, gpu: int | None = None) -> list[str]:
    """The Celery worker, as nightrender runs it: solo pool, one job at a time, no prefetch.

    It consumes only its model's queue. `gpu` names it `worker-gpu<N>` unless `name` is given; the
    pinning itself is the environment (`worker_env`), which the caller sets.
    """
    name = name or (gpu_worker_name(gpu) if gpu is not None else None)
    node = ["--hostname", f"{name}@%h"] if name else []
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
        "worker",
        "--pool",
        "solo",
        "--concurrency",
        "1",
        "--prefetch-multiplier",
        "1",
        "--queues",
        model_queue(settings.queue_name, settings.resolved_worker_model()),
        "--loglevel",
        "INFO",
        "--without-gossip",
        "--without-mingle",
        *node,
    ]
