"""A worker process's presence row: announced at start, ready once placed, beating from a thread.

The beat runs on its own thread because the solo pool is busy for a whole render; a compose
healthcheck that reads it stays green while a long job runs. It starts at announce, so a worker still
loading its model beats too, and one killed while loading stops counting as serving within a silence
(jobs/serving.py). Loading does not starve it: file reads and torch's kernels release the GIL, and Python
code yields it every few milliseconds.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from jobs import presence
from jobs.settings import Settings
from jobs.stack_identity import claim_broker_for

log = logging.getLogger(__name__)


class PresenceReporter:
    """Writes this process's `workers` row: starting, ready, failed or stopped, and its beats."""

    def __init__(
        self, settings: Settings, factory: sessionmaker[Session], node: str, gpu_index: int | None = None
    ) -> None:
        self._settings = settings
        self._factory = factory
        self._node = node
        self._gpu_index = gpu_index
        self._stopping = threading.Event()
        self._beats: threading.Thread | None = None
        self.worker_id: str | None = None

    def announce(self) -> None:
        """Record the start, claim the broker (StackConflict if another stack owns it), and begin beating."""
        s = self._settings
        with self._factory() as session:
            self.worker_id = presence.announce_worker(
                session, node=self._node, model=s.resolved_worker_model(), dtype=s.worker_dtype,
                offload_mode=s.offload_mode, gpu_index=self._gpu_index,
            )  # fmt: skip
        claim_broker_for(s, self._factory)
        self._beats = threading.Thread(target=self._beat_until_stopped, name="presence-beat", daemon=True)
        self._beats.start()

    def ready(
        self,
        *,
        device_name: str,
        vram_budget_bytes: int | None,
        forecast: list[dict[str, Any]],
        device_uuid: str | None = None,
    ) -> None:
        """The model is placed: say so (with the planner's forecast and the card); the beats go on."""
        with self._factory() as session:
            presence.mark_ready(
                session, worker_id=self._id(), device_name=device_name, device_uuid=device_uuid,
                vram_budget_bytes=vram_budget_bytes, forecast=forecast,
            )  # fmt: skip

    def failed(self, error: str) -> None:
        """The worker cannot start; the reason is stored for `up` and `run` to print. The beats end."""
        self._stop_beating()
        if self.worker_id is not None:
            with self._factory() as session:
                presence.mark_failed(session, worker_id=self.worker_id, error=error)

    def stopped(self) -> None:
        """Warm shutdown done: stop beating and say so."""
        self._stop_beating()
        if self.worker_id is not None:
            with self._factory() as session:
                presence.mark_stopped(session, worker_id=self.worker_id)

    def _stop_beating(self) -> None:
        self._stopping.set()
        if self._beats is not None:
            self._beats.join(timeout=5)

    def _beat_until_stopped(self) -> None:
        while not self._stopping.wait(self._settings.heartbeat_interval_s):
            try:
                with self._factory() as session:
                    presence.record_beat(session, worker_id=self._id())
            except SQLAlchemyError as error:  # the database is away; the next beat tries again
                log.warning("worker presence beat not written: %s", error)

    def _id(self) -> str:
        if self.worker_id is None:
            raise RuntimeError("announce() the worker first")
        return self.worker_id
