"""The Celery app for one GPU: solo pool, one job at a time, the pipeline loaded once at start.

Start it with `nightrender worker` (or `celery -A worker.celery_app worker -P solo -c 1`): either way it
consumes only the queue of its WORKER_MODEL (`jobs.queue.model_queue`), its default queue. Importing
this module builds nothing: the settings are read when Celery first needs its configuration, and the
process's resources (a `WorkerContext`) are built in `worker_init` and closed in `worker_shutdown`.
"""

from __future__ import annotations

import logging
from typing import Any, NoReturn

from celery import Celery, Task
from celery.signals import worker_init, worker_shutdown

from jobs.presence import this_host
from jobs.queue import RENDER_TASK, broker_transport_options, model_queue, publisher_config
from jobs.settings import Settings, get_settings
from jobs.stack_identity import StackConflict
from worker.context import WorkerContext
from worker.engine import EngineError

log = logging.getLogger(__name__)


def worker_config(settings: Settings) -> dict[str, object]:
    """The publisher's settings plus the worker's own: its model's queue, one job at a time, acknowledged
    once it is done."""
    transport = {
        **broker_transport_options(settings),
        "queue_order_strategy": "priority",
        # Sweep for messages past their visibility timeout often enough to matter (kombu's default
        # throttle makes it one scan in ~100 s); duplicates are harmless, the claim refuses them.
        "unacked_restore_interval": max(1, min(10, settings.visibility_timeout_s // 2)),
        "unacked_restore_throttle": 1,
    }
    return {
        **publisher_config(settings),
        "broker_transport_options": transport,
        # The queue a worker started without `--queues` consumes: its model's, where the publisher sends
        # that model's jobs (the base QUEUE_NAME gets no messages, so a worker on it would look ready
        # and serve nothing). `nightrender worker` passes the same name as `--queues`.
        "task_default_queue": model_queue(settings.queue_name, settings.resolved_worker_model()),
        # Above the longest job; Celery reads it from both option sets, so both carry it.
        "result_backend_transport_options": {"visibility_timeout": settings.visibility_timeout_s},
        "broker_connection_retry_on_startup": True,
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": 1,
        "worker_pool": "solo",
        "worker_hijack_root_logger": False,
    }


class RenderTask(Task):  # type: ignore[misc]
    """The render task's base class: the task reaches the process's resources through `worker_context`."""

    _worker_context: WorkerContext | None = None

    @property
    def worker_context(self) -> WorkerContext:
        """This process's resources, attached once the worker has started."""
        if self._worker_context is None:
            raise RuntimeError("no worker context: it is built in worker_init, when a worker starts")
        return self._worker_context

    def attach(self, context: WorkerContext) -> None:
        """Give the task this process's resources (once, in `worker_init`)."""
        self._worker_context = context

    def detach(self) -> WorkerContext | None:
        """Take the resources back (at shutdown); None if the worker never finished starting."""
        context, self._worker_context = self._worker_context, None
        return context


app = Celery("nightrender-worker")
app.add_defaults(lambda: worker_config(get_settings()))  # read when Celery first needs it, not at import


@app.task(
    bind=True,
    base=RenderTask,
    name=RENDER_TASK,
    acks_late=True,
    reject_on_worker_lost=True,
    ignore_result=True,
)
def render_job(self: RenderTask, job_id: str) -> str:
    """Claim a job in SQL and render it; the image writer stores it. A duplicate delivery is a no-op."""
    outcome = self.worker_context.runner.run(job_id)
    log.info("job %s: %s", job_id, outcome)
    return outcome


@worker_init.connect
def start_worker(sender: Any = None, **_: Any) -> None:
    """Build the process's resources and load its model before the first job, so no job pays for it.

    With the solo pool, the process that receives `worker_init` is the one that runs the tasks. The
    outcome is written to the worker's presence row, which `up` and `run` wait for.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        context = WorkerContext.build(get_settings(), node=getattr(sender, "hostname", None) or this_host())
    except EngineError as error:  # an unknown OFFLOAD_MODE, refused before any connection
        _cannot_start(error)
    try:
        context.start()  # placement and compilation for the queued sizes, then the row says ready
    except (EngineError, StackConflict) as error:
        context.presence.failed(str(error))
        _cannot_start(error)
    except BaseException as error:
        context.presence.failed(f"{type(error).__name__}: {error}")
        raise
    render_job.attach(context)


def _cannot_start(error: Exception) -> NoReturn:
    log.error("nightrender worker cannot start: %s", error)
    raise SystemExit(2) from None


@worker_shutdown.connect
def stop_worker(**_: Any) -> None:
    """Warm shutdown: images already rendered are written and committed before the process exits."""
    context = render_job.detach()
    if context is not None:
        context.close()
