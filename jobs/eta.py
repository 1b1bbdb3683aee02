"""A batch's ETA: its remaining jobs priced at the pace measured on it (or on its model's recent jobs).

When the worker's planner forecast is on record for the batch's model, a size not yet measured on the
batch is priced by the forecast: a batch whose first dozen images were all 512x512 (the worker runs
same-size jobs together) used to price its 1024x1024 jobs at four times the 512x512 pace, and its ETA
read 2.5x high on the H100.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Float, case, cast, func, select
from sqlalchemy.orm import Session

from jobs.estimate_forecast import forecast_points, nearest_forecast
from jobs.states import ACTIVE, JobStatus
from jobs.superseded import not_superseded
from jobs.tables import Job, JobStats, WorkerPresence

# Recent measured jobs of the batch's model that pace a batch none of whose jobs has finished yet.
PACE_SAMPLE = 200


@dataclass(frozen=True)
class Pace:
    """Measured seconds per job, pixel, step and pixel-step: a job's time is their sum for its size."""

    per_job: float  # encoding the prompt, whatever the size
    per_pixel: float  # decoding and saving
    per_step: float  # the fixed part of a denoising step (kernel launches, copies), whatever the size
    per_pixel_step: float  # the part of a denoising step that grows with the image

    def seconds(self, work: RemainingWork) -> float:
        """The time the remaining work takes at this pace."""
        return (
            self.per_job * work.jobs
            + self.per_pixel * work.pixels
            + self.per_step * work.steps
            + self.per_pixel_step * work.pixel_steps
        )


@dataclass(frozen=True)
class RemainingWork:
    """The unfinished jobs of a batch: how many, their pixels, steps left and pixels times steps left."""

    jobs: int
    pixels: float
    steps: float
    pixel_steps: float


def eta_seconds(session: Session, batch_id: str, remaining: int) -> float | None:
    """The remaining jobs' size and steps at the pace measured on this batch, else on its model's recent jobs.

    It was the mean seconds per image of *any* job times the jobs left: before this batch's first image, a
    1024x1024 batch was timed by an earlier 256x256 demo and its ETA was off 10x or more. Jobs that compiled
    graphs are left out: their time is mostly compiling, once.
    """
    if remaining <= 0:
        return 0.0
    by_forecast = _forecast_eta(session, batch_id)
    if by_forecast is not None:
        return round(by_forecast, 1)
    pace = _pace(session, Job.batch_id == batch_id) or _model_pace(session, batch_id)
    return None if pace is None else round(pace.seconds(_remaining_work(session, batch_id)), 1)


def _forecast_eta(session: Session, batch_id: str) -> float | None:
    """Each remaining size at its mean measured on this batch, else at the worker's forecast for it.

    The same rule as the estimate before submitting. None until a job of the batch is measured, or when
    no ready worker of its model left a forecast (then the pace prices every size).
    """
    model = session.execute(select(Job.model).where(Job.batch_id == batch_id).limit(1)).scalar()
    points = forecast_points(_latest_forecast(session, model)) if model else []
    measured = {
        (w, h): seconds / (jobs * steps)
        for w, h, steps, seconds, jobs in _measured_by_size(session, batch_id)
    }
    if not points or not measured:
        return None
    total = 0.0
    for width, height, steps_left, jobs in _remaining_by_size(session, batch_id):
        per_step = measured.get((width, height))
        if per_step is not None:  # a measured size: its own seconds, per step of what is left
            total += per_step * float(steps_left)
            continue
        point = nearest_forecast(points, width, height)
        if point is None:
            return None
        total += point.seconds_base * jobs + point.seconds_per_step * float(steps_left)
    return total


def _latest_forecast(session: Session, model: str) -> list[dict[str, Any]] | None:
    """The forecast of the newest worker that became ready with this model."""
    query = (
        select(WorkerPresence.forecast)
        .where(WorkerPresence.model == model, WorkerPresence.ready_at.is_not(None))
        .order_by(WorkerPresence.ready_at.desc())
        .limit(1)
    )
    return session.execute(query).scalar()


def _measured_by_size(session: Session, batch_id: str) -> list[Any]:
    """(width, height, steps, measured seconds, jobs) of the batch's warm succeeded jobs, per size."""
    seconds = JobStats.encode_s + JobStats.denoise_s + JobStats.decode_s + JobStats.save_s
    query = (
        select(Job.width, Job.height, Job.steps, func.sum(seconds), func.count())
        .join(JobStats, JobStats.job_id == Job.id)
        .where(Job.batch_id == batch_id, Job.status == JobStatus.SUCCEEDED, JobStats.recompiles == 0)
        .group_by(Job.width, Job.height, Job.steps)
    )
    return list(session.execute(query).all())


def _remaining_by_size(session: Session, batch_id: str) -> list[Any]:
    """(width, height, steps left, jobs) of the batch's queued and running jobs, per size."""
    steps_left = case((Job.status == JobStatus.RUNNING, Job.steps - Job.progress_step), else_=Job.steps)
    query = (
        select(Job.width, Job.height, func.sum(steps_left), func.count())
        .where(Job.batch_id == batch_id, Job.status.in_(ACTIVE), not_superseded())
        .group_by(Job.width, Job.height)
    )
    return list(session.execute(query).all())


def _remaining_work(session: Session, batch_id: str) -> RemainingWork:
    pixels = cast(Job.width, Float) * Job.height
    steps_left = case((Job.status == JobStatus.RUNNING, Job.steps - Job.progress_step), else_=Job.steps)
    row = session.execute(
        select(func.count(), func.sum(pixels), func.sum(steps_left), func.sum(pixels * steps_left)).where(
            Job.batch_id == batch_id, Job.status.in_(ACTIVE), not_superseded()
        )
    ).one()
    jobs, total_pixels, steps, pixel_steps = (float(value or 0) for value in row)
    return RemainingWork(jobs=int(jobs), pixels=total_pixels, steps=steps, pixel_steps=pixel_steps)


def _pace(session: Session, *scope: Any) -> Pace | None:
    """The pace of the succeeded, measured jobs in scope that compiled nothing; None if there are none."""
    warm = (Job.status == JobStatus.SUCCEEDED, JobStats.recompiles == 0, *scope)
    pixels = cast(Job.width, Float) * Job.height
    steps = cast(Job.steps, Float)
    pixel_steps = pixels * steps
    row = session.execute(
        select(
            func.count(),
            func.sum(JobStats.encode_s),
            func.sum(JobStats.decode_s + JobStats.save_s),
            func.sum(pixels),
            # The sums of a least-squares fit of denoise = per_step * steps + per_pixel_step * pixel_steps.
            func.sum(steps * steps),
            func.sum(steps * pixel_steps),
            func.sum(pixel_steps * pixel_steps),
            func.sum(steps * JobStats.denoise_s),
            func.sum(pixel_steps * JobStats.denoise_s),
            func.sum(JobStats.denoise_s),
            func.sum(pixel_steps),
        )
        .join(JobStats, JobStats.job_id == Job.id)
        .where(*warm)
    ).one()
    jobs, encode, decode_save, total_pixels, *fit_sums = (float(value or 0) for value in row)
    if not jobs or not total_pixels or not fit_sums[-1]:
        return None
    per_step, per_pixel_step = _denoise_fit(*fit_sums)
    return Pace(
        per_job=encode / jobs,
        per_pixel=decode_save / total_pixels,
        per_step=per_step,
        per_pixel_step=per_pixel_step,
    )


def _denoise_fit(
    ss: float, s_ps: float, ps_ps: float, s_y: float, ps_y: float, y: float, ps: float
) -> tuple[float, float]:
    """(seconds per step, seconds per pixel-step) fitted to the denoising times.

    Pricing steps by pixels alone made a pace learned on 512x512 jobs, whose steps are mostly fixed cost,
    charge 4x for each 1024x1024 step: the ETA of a mixed batch read about 2x high. With one size (the
    two terms cannot be told apart) or a fit that goes negative, the time is all per pixel-step, as before.
    """
    determinant = ss * ps_ps - s_ps * s_ps
    if determinant > 1e-9 * ss * ps_ps:
        per_step = (s_y * ps_ps - ps_y * s_ps) / determinant
        per_pixel_step = (ps_y * ss - s_y * s_ps) / determinant
        if per_step >= 0 and per_pixel_step >= 0:
            return per_step, per_pixel_step
    return 0.0, y / ps


def _model_pace(session: Session, batch_id: str) -> Pace | None:
    """The pace of the latest measured jobs of the batch's model and dtype (a batch has one of each)."""
    model = session.execute(select(Job.model, Job.dtype).where(Job.batch_id == batch_id).limit(1)).first()
    if model is None:
        return None
    recent = (
        select(JobStats.job_id)
        .join(Job, JobStats.job_id == Job.id)
        .where(
            Job.model == model[0],
            Job.dtype == model[1],
            Job.status == JobStatus.SUCCEEDED,
            JobStats.recompiles == 0,
        )
        .order_by(JobStats.recorded_at.desc())
        .limit(PACE_SAMPLE)
    )
    return _pace(session, Job.id.in_(recent.scalar_subquery()))
