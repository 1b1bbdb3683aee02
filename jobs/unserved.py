"""Jobs no worker serves: they stay queued (nothing fails), and clients are told so.

Status answers and submissions ask which models live or starting workers serve (`jobs.serving`). That
is one small query over the workers' presence rows, kept per process and database for about a second
(`MAX_AGE_S`), so 200 status polls a second cost one query a second, and a list costs none per job.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping

from sqlalchemy.orm import Session

from jobs.db import PerDatabase
from jobs.serving import serving_counts
from jobs.settings import Settings
from jobs.tables import utcnow
from jobs.worker_views import silent_after_s

MAX_AGE_S = 1.0


def unserved_warning(model: str) -> str:
    """What a client is told when it submits jobs for a model no worker serves."""
    return (
        f"no running worker serves model {model!r}: its jobs stay queued until one starts "
        f"(nightrender worker with WORKER_MODEL={model})"
    )


class ServedModels:
    """The models live or starting workers serve, at most `max_age_s` old; safe to share between threads.

    Only one thread refreshes; the others answer from the reading they have meanwhile (only the very
    first callers wait for one).
    """

    def __init__(self, max_age_s: float = MAX_AGE_S, clock: Callable[[], float] = time.monotonic) -> None:
        """An empty reading, taken on first use."""
        self.max_age_s = max_age_s
        self._clock = clock
        self._counts: Mapping[str, int] | None = None
        self._taken_at = 0.0
        self._writer = threading.Lock()

    def models(self, session: Session, *, silence_s: float) -> frozenset[str]:
        """The served models; `silence_s` is how long a ready worker may go without a beat."""
        return frozenset(self.workers(session, silence_s=silence_s))

    def workers(self, session: Session, *, silence_s: float) -> Mapping[str, int]:
        """How many live or starting workers serve each served model."""
        if self._stale() and self._writer.acquire(blocking=self._counts is None):
            try:
                if self._stale():
                    self._refresh(session, silence_s)
            finally:
                self._writer.release()
        return self._counts or {}

    def _stale(self) -> bool:
        return self._counts is None or self._clock() - self._taken_at >= self.max_age_s

    def _refresh(self, session: Session, silence_s: float) -> None:
        taken_at = self._clock()
        self._counts = dict(serving_counts(session, now=utcnow(), silent_after_s=silence_s))
        self._taken_at = taken_at


_readings = PerDatabase(ServedModels)


def served_now(session: Session, settings: Settings) -> frozenset[str]:
    """The models served now, as this process last read them for the session's database (≤ MAX_AGE_S old)."""
    return frozenset(serving_now(session, settings))


def serving_now(session: Session, settings: Settings) -> Mapping[str, int]:
    """How many workers serve each served model now (the same reading as `served_now`)."""
    reading = _readings.of(session)
    return reading.workers(session, silence_s=silent_after_s(settings.heartbeat_interval_s))


def unserved_warnings(session: Session, settings: Settings, models: Iterable[str]) -> list[str]:
    """A warning for each of these models that no live or starting worker serves, in name order."""
    served = served_now(session, settings)
    return [unserved_warning(model) for model in sorted(set(models) - served)]
