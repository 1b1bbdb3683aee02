"""Which jobs count for their batch: a retried job is replaced by its retry."""

from __future__ import annotations

from typing import Any

from sqlalchemy import exists, select
from sqlalchemy.orm import aliased

from jobs.tables import Job

_Retry = aliased(Job)


def not_superseded() -> Any:
    """Jobs that count for their batch: those no retry has replaced."""
    return ~exists(select(_Retry.id).where(_Retry.retry_of == Job.id))
