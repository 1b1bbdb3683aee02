"""Operator controls over the whole queue: pause and resume, kept in SQL like everything else."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs.tables import QueueControl, utcnow

PAUSED = "paused"


def is_paused(session: Session) -> bool:
    """Whether workers should take no new jobs."""
    return bool(session.scalar(select(QueueControl.enabled).where(QueueControl.name == PAUSED)))


def set_paused(session: Session, paused: bool) -> None:
    """Pause (workers finish their current job, then take no more) or resume."""
    control = session.get(QueueControl, PAUSED)
    if control is None:
        session.add(QueueControl(name=PAUSED, enabled=paused, updated_at=utcnow()))
    else:
        control.enabled = paused
        control.updated_at = utcnow()
