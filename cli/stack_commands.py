"""Commands that run the stack's processes: up, api, worker and migrate."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from cli.common import Model, console, fail, settings
from cli.signals import interrupt_on_termination, shielded


def up(model: Model = None) -> None:
    """Start the embedded default: SQLite, an embedded Redis, the migrations, the API and one worker."""
    from cli.stack import Stack, StackError

    stack = Stack(settings(), extra_env={"WORKER_MODEL": model} if model else None)
    failure = None
    try:
        with interrupt_on_termination():
            try:
                stack.start()
            except StackError as error:
                failure = str(error)
            else:
                console.print(
                    f"nightrender is up at {stack.settings.resolved_api_url()} (docs at /docs). "
                    "Ctrl-C stops it."
                )
                while all(p.poll() is None for p in stack.processes.values()):
                    time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        with shielded():
            stack.stop()
    if failure:
        fail(failure)


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


COMMANDS: tuple[Callable[..., None], ...] = (up, api, worker, migrate)
