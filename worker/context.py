"""What one worker process renders with: built once when the worker starts, closed at warm shutdown."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from jobs.db import make_database, make_session_factory
from jobs.peak_history import recent_plan_peaks
from jobs.presence import pinned_gpu
from jobs.settings import Settings
from worker.engine.forecast import forecast_sizes
from worker.engine.memory import device_name, device_uuid
from worker.holder import EngineHolder
from worker.presence import PresenceReporter
from worker.runner import JobRunner


@dataclass(frozen=True)
class WorkerContext:
    """The settings, the database and its sessions, the engine holder and the job runner of one process."""

    settings: Settings
    database: Engine
    factory: sessionmaker[Session]
    holder: EngineHolder
    runner: JobRunner
    presence: PresenceReporter

    @classmethod
    def build(cls, settings: Settings, node: str) -> WorkerContext:
        """Everything a job needs, wired together; nothing is loaded and no connection is opened yet."""
        gpu = pinned_gpu(os.environ)
        database = make_database(settings.resolved_database_url())
        factory = make_session_factory(database)
        holder = EngineHolder(settings, history=partial(past_peaks, factory))
        # Every stats row says which worker and card rendered it (the device's UUID comes with the record).
        runner = JobRunner(settings, factory, holder, identity={"worker": node, "gpu_index": gpu})
        presence = PresenceReporter(settings, factory, node, gpu_index=gpu)
        return cls(settings, database, factory, holder, runner, presence)

    def start(self) -> None:
        """Announce the worker, load its model, place and compile it for the queued sizes, then say ready.

        Raises StackConflict when the broker serves another stack, EngineError when the model cannot load.
        """
        self.presence.announce()
        engine, _ = self.holder.get(self.settings.resolved_worker_model(), self.settings.worker_dtype)
        self.runner.warm_up()
        budget = self.holder.budget
        on_cuda = engine.device.type == "cuda" and budget is not None
        self.presence.ready(
            device_name=device_name(engine.device),
            device_uuid=device_uuid(engine.device),
            vram_budget_bytes=budget.device_bytes if on_cuda and budget else None,
            forecast=forecast_sizes(engine),
        )

    def close(self) -> None:
        """Warm shutdown: write and commit what is rendered, stop the runner's threads, close the pool."""
        self.runner.close()
        self.presence.stopped()
        self.database.dispose()


def past_peaks(factory: sessionmaker[Session], model: str, device: str) -> list[Any]:
    """Recorded plans and peaks, for calibrating the planner's activation estimates."""
    with factory() as session:
        return recent_plan_peaks(session, model=model, device_name=device)
