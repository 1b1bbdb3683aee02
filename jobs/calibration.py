"""Past peaks for the planner's calibration: the worker reads them here and hands them to the engine."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs.tables import Job, JobStats


def recent_plan_peaks(
    session: Session, *, model: str, device_name: str, limit: int = 200
) -> list[tuple[dict[str, Any], int]]:
    """(stored plan, measured peak allocated bytes) of the latest jobs of this model on this device."""
    rows = session.execute(
        select(JobStats.plan, JobStats.peak_allocated_bytes)
        .join(Job, Job.id == JobStats.job_id)
        .where(
            Job.model == model,
            JobStats.device_name == device_name,
            JobStats.plan.is_not(None),
            JobStats.peak_allocated_bytes.is_not(None),
        )
        .order_by(JobStats.recorded_at.desc())
        .limit(limit)
    ).all()
    records = []
    for plan, peak in rows:
        try:
            records.append((json.loads(plan or ""), int(peak or 0)))
        except (TypeError, ValueError):
            continue  # a plan written by an older version: not calibration data
    return records
