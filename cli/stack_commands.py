"""Commands about the stack: up, stop, logs, info, api, worker, migrate and worker-health."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table
from sqlalchemy import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from cli.common import Budget, Gpus, Model, chosen_gpus, console, fail, settings
from cli.render_views import gigabytes
from cli.signals import interrupt_on_termination, shielded
from jobs.db import make_database, make_session_factory
from jobs.settings import Settings
from jobs.tables import utcnow

if TYPE_CHECKING:
    from cli.stack import Stack

LOG_NAMES = ("worker", "api", "redis")

Gpu = Annotated[
    int | None,
    typer.Option(
        min=0,
        help="Pin this worker to one GPU (its nvidia-smi index, or its position in CUDA_VISIBLE_DEVICES when "
        "that is set); names it worker-gpu<N>. Without it, WORKER_GPU pins the same way on a host that shows "
        "several GPUs, and only names the worker where one shows (a container given one card)",
    ),
]


def up(model: Model = None, budget: Budget = None, gpus: Gpus = None) -> None:
    """Start the embedded default: SQLite, an embedded Redis, the migrations, the API and one worker.

    With --gpus, one worker per GPU (worker-gpu0, worker-gpu1, ...), each pinned to its card.
    """
    from cli.process_commands import worker_overrides
    from cli.stack import Stack, StackError

    chosen = chosen_gpus(gpus)
    stack = Stack(settings(), extra_env=worker_overrides(model, budget), exclusive=True, gpus=chosen)
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
    for name, worker in stack.workers.items():
        cap = worker.vram_budget_bytes
        budget = "no VRAM cap" if cap is None else f"budget {gigabytes(cap)}"
        card = f"GPU {worker.gpu_index} ({worker.device_name})" if stack.gpus else worker.device_name
        who = "" if stack.gpus is None else f"{name}, "
        console.print(f"worker ready: {who}{worker.model} ({worker.dtype}) on {card}, {budget}")
    console.print(
        f"nightrender is up at {stack.settings.resolved_api_url()} (dashboard; API docs at /docs), data in "
        f"{stack.settings.data_dir.resolve()}. Ctrl-C or `nightrender stop` stops it."
    )


def _wait_for_an_exit(stack: Stack) -> str | None:
    """Sleep until the stack must end: the API or Redis exits, or no worker is left (ExitWatch says why).

    A worker that dies while others run is said in one line, and `up` goes on with the others.
    """
    from cli.stack_watch import ExitWatch

    watch = ExitWatch(stack.processes, list(stack.worker_slots()), stack.settings.heartbeat_stale_s)
    while True:
        failure = watch.check(console.print)
        if failure is not None:
            return failure
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
    process: Annotated[
        str | None,
        typer.Argument(
            help="worker (or worker-gpu<N>), api or redis; unnamed: the last run's workers (every "
            "worker-gpu<N> after up --gpus, each under a ==> name <== line)",
            show_default=False,
        ),
    ] = None,
    lines: Annotated[int, typer.Option("--lines", "-n", help="how many of the last lines")] = 50,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="keep printing new lines")] = False,
) -> None:
    """Print the last lines a process of the stack wrote (its log in DATA_DIR/logs)."""
    from cli.stack_logs import GPU_WORKER_LOG, default_worker_logs, print_logs

    folder = settings().data_dir.resolve() / "logs"
    if process is not None and process not in LOG_NAMES and not GPU_WORKER_LOG.fullmatch(process):
        names = ", ".join(LOG_NAMES)
        fail(f"no such process {process!r}: choose one of {names} (or worker-gpu<N> after up --gpus)")
    paths = [folder / f"{name}.log" for name in ([process] if process else default_worker_logs(folder))]
    if not paths[0].exists():
        fail(f"no log at {paths[0]}: has a stack run from this data directory?")
    try:
        print_logs(paths, lines, out=_print_log_line, follow=follow)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _print_log_line(line: str) -> None:
    console.out(line, highlight=False)


def api() -> None:
    """Run only the HTTP API (uvicorn), in the foreground."""
    from cli.process_commands import api_command, shared_metrics_env

    config = settings()
    os.environ.update(shared_metrics_env(config))
    command = api_command(config)
    os.execv(command[0], command)


def worker(gpu: Gpu = None) -> None:
    """Run one Celery worker for this machine's GPU (or the one --gpu names), in the foreground."""
    from cli.process_commands import worker_command
    from worker.engine.loading import EngineError, check_device_for, pick_device

    config = settings()
    pinned = _pin_to_gpu(gpu)  # before anything starts CUDA in this process, and inherited by the exec
    try:
        check_device_for(config.resolved_worker_model(), pick_device())
    except EngineError as error:
        fail(str(error))
    command = worker_command(config, gpu=pinned)
    os.execv(command[0], command)


def _pin_to_gpu(gpu: int | None) -> int | None:
    """Pin this process to its card (--gpu N, or WORKER_GPU on a bare multi-GPU host); the card's index.

    Compose reserves the card itself and sets WORKER_GPU to its host index: inside the container that
    card is the only one, numbered 0, so WORKER_GPU only names the worker there (cli.gpus.worker_pinning).
    """
    from cli.gpus import GpuChoiceError, visible_gpu_count, worker_pinning
    from jobs.presence import WORKER_GPU, pinned_gpu

    try:
        os.environ.update(worker_pinning(gpu, os.environ, visible_gpu_count))
        return pinned_gpu(os.environ)
    except GpuChoiceError as error:
        named = f"--gpu {gpu}" if gpu is not None else f"{WORKER_GPU}={os.environ.get(WORKER_GPU)}"
        fail(f"{named}: {error}")
    except ValueError as error:  # WORKER_GPU is no index
        fail(str(error))


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
    from jobs.worker_views import LISTED_WORKERS

    try:
        with _session(config) as session:
            workers = recent_workers(session, limit=LISTED_WORKERS)
    except SQLAlchemyError:
        return "workers: no database yet (it is made by the first `up` or `run`)"
    table = Table(title="Workers (newest starts)")
    for header in ("node", "pid", "state", "model", "device", "gpu", "budget", "last heard"):
        table.add_column(header)
    now = utcnow()
    for w in workers:
        budget = "n/a" if w.vram_budget_bytes is None else gigabytes(w.vram_budget_bytes)
        heard = f"{(now - w.beat_at).total_seconds():.0f}s ago"
        card = _card(w.gpu_index, w.device_uuid)
        table.add_row(w.node, str(w.pid), w.state, w.model, w.device_name or "-", card, budget, heard)
    return table


def _card(gpu_index: int | None, device_uuid: str | None) -> str:
    """A worker's card: its index and the start of its UUID (which names the card on any host)."""
    parts = [str(gpu_index) if gpu_index is not None else "", device_uuid[:12] if device_uuid else ""]
    return " ".join(part for part in parts if part) or "-"


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
