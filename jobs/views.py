"""Read models for clients: a job's status, a batch's summary and the memory-by-resolution table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Float, case, cast, exists, func, select
from sqlalchemy.orm import Session, aliased

from jobs.positions import snapshot_for
from jobs.states import ACTIVE, TERMINAL, JobStatus, batch_status
from jobs.tables import Batch, Job, JobStats

STAT_FIELDS = [c.name for c in JobStats.__table__.columns if c.name not in ("job_id",)]
_Retry = aliased(Job)


def not_superseded() -> Any:
    """Jobs that count for their batch: those no retry has replaced."""
    return ~exists(select(_Retry.id).where(_Retry.retry_of == Job.id))


def queue_position(session: Session, job: Job) -> int | None:
    """How many queued jobs run before this one (0 = next); None once it has left the queue.

    The position is in FIFO order (`jobs.ordering.FIFO`) and at most ~1 s old: it is read from a
    per-process snapshot of the queued jobs' keys (`jobs.positions`), not counted per request. The worker
    may still run a job of the size it has loaded just ahead of the head (see `jobs.ordering`).
    """
    if job.status != JobStatus.QUEUED:
        return None
    return snapshot_for(session).position(session, job)


def memory_view(stats: JobStats | None) -> dict[str, Any] | None:
    """A job's recorded memory and timing, or None until it has some."""
    if stats is None:
        return None
    view = {name: getattr(stats, name) for name in STAT_FIELDS}
    view["recorded_at"] = stats.recorded_at.isoformat() if stats.recorded_at else None
    return view


def job_view(session: Session, job: Job) -> dict[str, Any]:
    """What `GET /v1/jobs/{id}` returns."""
    return {
        "id": job.id,
        "batch_id": job.batch_id,
        "status": job.status,
        "prompt": job.prompt,
        "params": {
            "width": job.width,
            "height": job.height,
            "steps": job.steps,
            "guidance_scale": job.guidance_scale,
            "seed": job.seed,
            "model": job.model,
            "dtype": job.dtype,
            "negative_prompt": job.negative_prompt,
        },
        "priority": job.priority,
        "progress": {"step": job.progress_step, "total": job.steps},
        "queue_position": queue_position(session, job),
        "attempts": job.attempts,
        "retry_of": job.retry_of,
        "error": job.error,
        "created_at": job.created_at.isoformat(),
        "finished_at": job.finished_at.isoformat() if job.finished_at else None,
        "memory": memory_view(job.stats),
    }


def batch_counts(session: Session, batch_id: str) -> dict[str, int]:
    """How many of a batch's jobs are in each state (every state listed)."""
    rows = session.execute(
        select(Job.status, func.count())
        .where(Job.batch_id == batch_id, not_superseded())
        .group_by(Job.status)
    ).all()
    counts = {status.value: 0 for status in JobStatus}
    counts.update({status: int(n) for status, n in rows})
    return counts


def batch_view(session: Session, batch: Batch) -> dict[str, Any]:
    """What `GET /v1/batches/{id}` returns, with progress in [0, 1] and an ETA from measured times."""
    counts = batch_counts(session, batch.id)
    done = sum(counts[s] for s in TERMINAL)
    steps_done, steps_total = _step_progress(session, batch.id)
    remaining = batch.total_jobs - done
    return {
        "id": batch.id,
        "status": batch_status(counts).value,
        "total": batch.total_jobs,
        "counts": counts,
        "progress": round(steps_done / steps_total, 4) if steps_total else 1.0,
        "eta_seconds": _eta_seconds(session, batch.id, remaining),
        "created_at": batch.created_at.isoformat(),
    }


def _step_progress(session: Session, batch_id: str) -> tuple[int, int]:
    # Finished jobs count in full; a running job counts its recorded steps.
    finished = Job.status.in_([s.value for s in TERMINAL])
    done_expr = case((finished, Job.steps), else_=Job.progress_step)
    row = session.execute(
        select(func.coalesce(func.sum(done_expr), 0), func.coalesce(func.sum(Job.steps), 0)).where(
            Job.batch_id == batch_id, not_superseded()
        )
    ).one()
    return int(row[0]), int(row[1])


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


def _eta_seconds(session: Session, batch_id: str, remaining: int) -> float | None:
    """The remaining jobs' size and steps at the pace measured on this batch, else on its model's recent jobs.

    It was the mean seconds per image of *any* job times the jobs left: before this batch's first image, a
    1024x1024 batch was timed by an earlier 256x256 demo and its ETA was off 10x or more. Jobs that compiled
    graphs are left out: their time is mostly compiling, once.
    """
    if remaining <= 0:
        return 0.0
    pace = _pace(session, Job.batch_id == batch_id) or _model_pace(session, batch_id)
    return None if pace is None else round(pace.seconds(_remaining_work(session, batch_id)), 1)


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


def stats_by_resolution(session: Session) -> list[dict[str, Any]]:
    """Measured memory and time grouped by resolution and rung, from real job records."""
    per_image = JobStats.encode_s + JobStats.denoise_s + JobStats.decode_s + JobStats.save_s
    rows = session.execute(
        select(
            Job.width,
            Job.height,
            JobStats.rung,
            JobStats.device_name,
            func.count(),
            func.max(JobStats.peak_allocated_bytes),
            func.max(JobStats.peak_reserved_bytes),
            func.avg(JobStats.peak_reserved_bytes),
            func.avg(per_image),
            func.avg(JobStats.denoise_s),
        )
        .join(JobStats, JobStats.job_id == Job.id)
        .where(Job.status == JobStatus.SUCCEEDED)
        .group_by(Job.width, Job.height, JobStats.rung, JobStats.device_name)
        .order_by(Job.width * Job.height, Job.width, JobStats.rung)
    ).all()
    return [_stats_row(row) for row in rows]


def _stats_row(row: Any) -> dict[str, Any]:
    width, height, rung, device, n, max_alloc, max_res, mean_res, mean_s, mean_denoise = row
    return {
        "width": width,
        "height": height,
        "rung": rung,
        "device_name": device,
        "jobs": int(n),
        "peak_allocated_bytes_max": _int_or_none(max_alloc),
        "peak_reserved_bytes_max": _int_or_none(max_res),
        "peak_reserved_bytes_mean": _int_or_none(mean_res),
        "seconds_per_image_mean": round(float(mean_s), 4) if mean_s is not None else None,
        "denoise_seconds_mean": round(float(mean_denoise), 4) if mean_denoise is not None else None,
    }


def _int_or_none(value: Any) -> int | None:
    return int(value) if value is not None else None
