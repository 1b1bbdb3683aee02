"""Commands about the stack: up, stop, logs, info, api, worker, migrate and worker-health."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from typing import TYPE_CHECKING, Annotated, TextIO

import typer
from rich.table import Table
from sqlalchemy import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from cli.common import Budget, Model, console, fail, settings
from cli.render_views import gigabytes
from cli.signals import interrupt_on_termination, shielded
from jobs.db import make_database, make_session_factory
from jobs.settings import Settings
from jobs.tables import utcnow

if TYPE_CHECKING:
    from cli.stack import Stack

LOG_NAMES = ("worker", "api", "redis")


def up(model: Model = None, budget: Budget = None) -> None:
    """Start the embedded default: SQLite, an embedded Redis, the migrations, the API and one worker."""
    from cli.stack import Stack, StackError, worker_overrides

    stack = Stack(settings(), extra_env=worker_overrides(model, budget), exclusive=True)
    failure = None
    try:
        with interrupt_on_termination():
            try:
                stack.start()
            except StackError as error:
                failure = str(error)
            else:
                _say_up(stack)
                failure = _wait_for_an_exit(stack)
    except KeyboardInterrupt:
        pass
    finally:
        with shielded():
            stack.stop()
    if failure:
        fail(failure)


def _say_up(stack: Stack) -> None:
    for leftover in stack.left_over:
        console.print(f"stopped {leftover}, left running by a stack that did not stop")
    worker = stack.worker
    if worker is not None:
        cap = worker.vram_budget_bytes
        budget = "no VRAM cap" if cap is None else f"budget {gigabytes(cap)}"
        console.print(f"worker ready: {worker.model} ({worker.dtype}) on {worker.device_name}, {budget}")
    console.print(
        f"nightrender is up at {stack.settings.resolved_api_url()} (dashboard; API docs at /docs), data in "
        f"{stack.settings.data_dir.resolve()}. Ctrl-C or `nightrender stop` stops it."
    )


def _wait_for_an_exit(stack: Stack) -> str | None:
    """Sleep until a process of the stack exits; say which one, and where its log is."""
    while True:
        for name, process in stack.processes.items():
            if process.poll() is not None:
                return f"the {name} exited with {process.returncode}; see `nightrender logs {name}`"
        time.sleep(1)


def stop(timeout: Annotated[float, typer.Option(help="seconds to wait for it to stop")] = 120.0) -> None:
    """Stop the stack running from this data directory (the one `up` or `run` started)."""
    from cli.stack_lock import StackLock, wait_until_released

    config = settings()
    lock = StackLock(config.data_dir)
    record = lock.running()
    if record is None:
        for leftover in lock.stop_dead_holders_processes():  # `up` was killed with kill -9
            console.print(f"stopped {leftover}, left running by a stack that did not stop")
        console.print(f"no stack is running from {config.data_dir.resolve()}")
        return
    if record.pid <= 0:  # the lock is held but its record is not written yet (or another command probes)
        fail("the stack is starting or being checked; try again in a few seconds")
    try:
        os.kill(record.pid, signal.SIGTERM)  # its owner stops its processes, as on Ctrl-C
    except (ProcessLookupError, PermissionError) as error:
        fail(f"could not signal the stack's process {record.pid}: {error}")
    console.print(f"stopping the stack (pid {record.pid}, API at {record.api_url})...")
    if not wait_until_released(lock, timeout):
        fail(f"the stack (pid {record.pid}) has not stopped after {timeout:.0f}s")
    console.print("stopped")


def logs(
    process: Annotated[str, typer.Argument(help="worker, api or redis")] = "worker",
    lines: Annotated[int, typer.Option("--lines", "-n", help="how many of the last lines")] = 50,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing new lines")] = False,
) -> None:
    """Print the last lines a process of the stack wrote (its log in DATA_DIR/logs)."""
    path = settings().data_dir.resolve() / "logs" / f"{process}.log"
    if process not in LOG_NAMES:
        fail(f"no such process {process!r}: choose one of {', '.join(LOG_NAMES)}")
    if not path.exists():
        fail(f"no log at {path}: has a stack run from this data directory?")
    with path.open(errors="replace") as stream:
        for line in stream.readlines()[-lines:] if lines > 0 else []:
            console.out(line.rstrip("\n"), highlight=False)
        if follow:
            _follow(stream)


def _follow(stream: TextIO) -> None:
    try:
        while True:
            line = stream.readline()
            if line:
                console.out(line.rstrip("\n"), highlight=False)
            else:
                time.sleep(0.3)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def api() -> None:
    """Run only the HTTP API (uvicorn), in the foreground."""
    from cli.stack import api_command, shared_metrics_env

    config = settings()
    os.environ.update(shared_metrics_env(config))
    command = api_command(config)
    os.execv(command[0], command)


def worker() -> None:
    """Run one Celery worker for this machine's GPU, in the foreground."""
    from cli.stack import worker_command
    from worker.engine.loading import EngineError, check_device_for, pick_device

    config = settings()
    try:
        check_device_for(config.resolved_worker_model(), pick_device())
    except EngineError as error:
        fail(str(error))
    command = worker_command(config)
    os.execv(command[0], command)


def migrate(revision: str = "head", downgrade: bool = False) -> None:
    """Apply the Alembic migrations (or downgrade to REVISION with --downgrade)."""
    from jobs import migrate as migrations

    url = settings().resolved_database_url()
    if downgrade:
        migrations.downgrade(url, "base" if revision == "head" else revision)
    else:
        migrations.upgrade(url, revision)
    console.print(f"schema at {'base' if downgrade and revision == 'head' else revision} on {url}")


def info() -> None:
    """Where this stack keeps its data, whether it runs, and its workers' last reports."""
    from cli.stack_lock import StackLock

    config = settings()
    record = StackLock(config.data_dir).running()
    table = Table(show_header=False, box=None)
    for name, value in _places(config):
        table.add_row(f"[bold]{name}[/bold]", value)
    running = f"yes (pid {record.pid}, API at {record.api_url})" if record else "no"
    table.add_row("[bold]stack running[/bold]", running)
    console.print(table)
    console.print(_workers_table(config))


def _places(config: Settings) -> list[tuple[str, str]]:
    return [
        ("version", package_version()),
        ("data dir", str(config.data_dir.resolve())),
        ("database", make_url(config.resolved_database_url()).render_as_string(hide_password=True)),
        ("broker", make_url(config.resolved_redis_url()).render_as_string(hide_password=True)),
        ("outputs", str(config.resolved_outputs_dir())),
        ("models", str(config.resolved_model_cache_dir())),
        ("logs", str(config.data_dir.resolve() / "logs")),
        ("API", config.resolved_api_url()),
    ]


def _workers_table(config: Settings) -> Table | str:
    from jobs.presence import recent_workers

    try:
        with _session(config) as session:
            workers = recent_workers(session, limit=5)
    except SQLAlchemyError:
        return "workers: no database yet (it is made by the first `up` or `run`)"
    table = Table(title="Workers (newest starts)")
    for header in ("node", "pid", "state", "model", "device", "budget", "last heard"):
        table.add_column(header)
    now = utcnow()
    for w in workers:
        budget = "n/a" if w.vram_budget_bytes is None else gigabytes(w.vram_budget_bytes)
        heard = f"{(now - w.beat_at).total_seconds():.0f}s ago"
        table.add_row(w.node, str(w.pid), w.state, w.model, w.device_name or "-", budget, heard)
    return table


def worker_health() -> None:
    """Exit 0 if a worker on this host is ready and was heard from lately, else 1 (for healthchecks)."""
    from jobs.presence import is_live, recent_workers, this_host

    config = settings()
    silent_after = max(3 * config.heartbeat_interval_s, 30.0)
    try:
        with _session(config) as session:
            workers = recent_workers(session, host=this_host(), limit=10)
    except SQLAlchemyError as error:
        console.print(f"unhealthy: the database cannot be read ({type(error).__name__})")
        raise typer.Exit(1) from None
    live = [w for w in workers if is_live(w, now=utcnow(), silent_after_s=silent_after)]
    if not live:
        newest = workers[0].state if workers else "none has started"
        console.print(f"unhealthy: no worker on {this_host()} is ready and beating (newest: {newest})")
        raise typer.Exit(1)
    console.print(f"healthy: {live[0].node} ready with {live[0].model} on {live[0].device_name}")


@contextmanager
def _session(config: Settings) -> Iterator[Session]:
    database = make_database(config.resolved_database_url())
    try:
        with make_session_factory(database)() as session:
            yield session
    finally:
        database.dispose()


def package_version() -> str:
    """The installed nightrender's version."""
    try:
        return metadata.version("nightrender")
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


COMMANDS: tuple[Callable[..., None], ...] = (up, stop, logs, info, api, worker, migrate, worker_health)
