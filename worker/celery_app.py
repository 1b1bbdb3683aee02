"""The Celery app for one GPU: solo pool, one job at a time, the pipeline loaded once at start.

Start it with `nightrender worker` (or `celery -A worker.celery_app worker -P solo -c 1`).
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import worker_init, worker_shutdown

from jobs.calibration import recent_plan_peaks
from jobs.db import make_engine, make_session_factory
from jobs.queue import RENDER_TASK, make_celery
from jobs.settings import get_settings
from worker.engine import EngineError
from worker.runner import EngineHolder, JobRunner

log = logging.getLogger(__name__)

settings = get_settings()
app: Celery = make_celery(settings, name="nightrender-worker")
app.conf.worker_hijack_root_logger = False

_factory = None
_runner: JobRunner | None = None


def session_factory() -> Any:
    """The process's database sessions, built on first use (an engine never crosses a fork)."""
    global _factory
    if _factory is None:
        _factory = make_session_factory(make_engine(settings.resolved_database_url()))
    return _factory


def past_peaks(model: str, device: str) -> list[Any]:
    """Recorded plans and peaks, for calibrating the planner's activation estimates."""
    with session_factory()() as session:
        return recent_plan_peaks(session, model=model, device_name=device)


_holder = EngineHolder(settings, history=past_peaks)


def runner() -> JobRunner:
    """The process's job runner."""
    global _runner
    if _runner is None:
        _runner = JobRunner(settings, session_factory(), _holder)
    return _runner


@worker_init.connect
def load_pipeline_at_start(**_: Any) -> None:
    """Load the worker's model before taking the first job, so no job pays for it."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        _holder.get(settings.resolved_worker_model(), settings.worker_dtype)
        runner().warm_up()  # placement and compilation for the queued sizes, before " ready."
    except EngineError as error:
        log.error("nightrender worker cannot start: %s", error)
        raise SystemExit(2) from None


@worker_shutdown.connect
def write_rendered_images(**_: Any) -> None:
    """Warm shutdown: images already rendered are written and committed before the process exits."""
    if _runner is not None:
        _runner.close()


@app.task(name=RENDER_TASK, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def render_job(job_id: str) -> str:
    """Claim a job in SQL and render it; the image writer stores it. A duplicate delivery is a no-op."""
    outcome = runner().run(job_id)
    log.info("job %s: %s", job_id, outcome)
    return outcome
