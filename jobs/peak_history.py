"""Past peaks for the planner's calibration: the worker reads them here and hands them to the engine."""

from __future__ import annotations

from typing import NamedTuple

from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs.tables import Job, JobStats


class RecordedPeak(NamedTuple):
    """What calibration needs of a past job: its plan's resident weights and predicted peak, and its peak."""

    resident_weight_bytes: int
    predicted_peak_bytes: int
    peak_allocated_bytes: int


def recent_plan_peaks(
    session: Session, *, model: str, device_name: str, limit: int = 200
) -> list[RecordedPeak]:
    """The latest jobs of this model on this device whose plan predicted a peak that was then measured."""
    # Read as floats: PostgreSQL casts a JSON number to INTEGER (32 bits) otherwise, and these are bytes.
    weights = JobStats.plan["resident_weight_bytes"].as_float()
    predicted = JobStats.plan["predicted_peak_bytes"].as_float()
    rows = session.execute(
        select(weights, predicted, JobStats.peak_allocated_bytes)
        .join(Job, Job.id == JobStats.job_id)
        .where(
            Job.model == model,
            JobStats.device_name == device_name,
            predicted.is_not(None),
            JobStats.peak_allocated_bytes.is_not(None),
        )
        .order_by(JobStats.recorded_at.desc())
        .limit(limit)
    ).all()
    return [RecordedPeak(int(weight or 0), int(peak), int(measured)) for weight, peak, measured in rows]
