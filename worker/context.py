"""What one worker process renders with: built once when the worker starts, closed at warm shutdown."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from jobs.db import make_database, make_session_factory
from jobs.peak_history import recent_plan_peaks
from jobs.settings import Settings
from worker.holder import EngineHolder
from worker.runner import JobRunner


@dataclass(frozen=True)
class WorkerContext:
    """The settings, the database and its sessions, the engine holder and the job runner of one process."""

    settings: Settings
    database: Engine
    factory: sessionmaker[Session]
    holder: EngineHolder
    runner: JobRunner

    @classmethod
    def build(cls, settings: Settings) -> WorkerContext:
        """Everything a job needs, wired together; nothing is loaded and no connection is opened yet."""
        database = make_database(settings.resolved_database_url())
        factory = make_session_factory(database)
        holder = EngineHolder(settings, history=partial(past_peaks, factory))
        return cls(settings, database, factory, holder, JobRunner(settings, factory, holder))

    def start(self) -> None:
        """Load the worker's model, then place and compile it for the queued sizes, before the first job."""
        self.holder.get(self.settings.resolved_worker_model(), self.settings.worker_dtype)
        self.runner.warm_up()

    def close(self) -> None:
        """Warm shutdown: write and commit what is rendered, stop the runner's threads, close the pool."""
        self.runner.close()
        self.database.dispose()


def past_peaks(factory: sessionmaker[Session], model: str, device: str) -> list[Any]:
    """Recorded plans and peaks, for calibrating the planner's activation estimates."""
    with factory() as session:
        return recent_plan_peaks(session, model=model, device_name=device)
