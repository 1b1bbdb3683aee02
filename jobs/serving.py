"""Which models live workers serve: a job for a model nobody serves stays queued, and clients are told.

A worker serves the one model it loaded (WORKER_MODEL) and consumes only that model's queue. It counts
as serving while its presence row is ready or still starting (a first start downloads the model, which can
take many minutes), and beating: a worker beats from its announce on (worker/presence.py), so one killed
while loading stops counting after the same silence as a ready one.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs.presence import READY, STARTING
from jobs.tables import WorkerPresence


def serving_counts(session: Session, *, now: datetime, silent_after_s: float) -> Counter[str]:
    """Live (or starting) workers per model they serve: ready or starting, and heard from lately."""
    beating_since = now - timedelta(seconds=silent_after_s)
    rows = session.scalars(
        select(WorkerPresence.model).where(
            WorkerPresence.state.in_((READY, STARTING)), WorkerPresence.beat_at >= beating_since
        )
    ).all()
    return Counter(rows)


def serving_workers(session: Session, *, model: str, now: datetime, silent_after_s: float) -> int:
    """How many live or starting workers serve `model` (0: its jobs wait for one to start)."""
    return serving_counts(session, now=now, silent_after_s=silent_after_s)[model]
