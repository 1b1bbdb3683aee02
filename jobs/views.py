"""Read models for clients: a job's status, a batch's summary and the memory-by-resolution table."""

from __future__ import annotations

from collections.abc import Mapping, Set
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from jobs.eta import eta_seconds
from jobs.positions import snapshot_for
from jobs.states import TERMINAL, JobStatus, batch_status
from jobs.superseded import not_superseded
from jobs.tables import Batch, Job, JobStats

STAT_FIELDS = [c.name for c in JobStats.__table__.columns if c.name not in ("job_id",)]


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


def job_view(session: Session, job: Job, *, served: Set[str] | None = None) -> dict[str, Any]:
    """What `GET /v1/jobs/{id}` returns; `unserved` is added when the served models are given."""
    view: dict[str, Any] = {
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
    if served is not None:
        view["unserved"] = job.status == JobStatus.QUEUED and job.model not in served
    return view


def batch_counts(session: Session, batch_id: str) -> dict[str, int]:
    """How many of a batch's jobs are in each state (every state listed)."""
    return batch_counts_and_models(session, batch_id)[0]


def batch_counts_and_models(
    session: Session, batch_id: str
) -> tuple[dict[str, int], dict[JobStatus, set[str]]]:
    """How many of a batch's jobs are in each state, and the models of its jobs in each state (one query)."""
    rows = session.execute(
        select(Job.status, Job.model, func.count())
        .where(Job.batch_id == batch_id, not_superseded())
        .group_by(Job.status, Job.model)
    ).all()
    counts = {status.value: 0 for status in JobStatus}
    models: dict[JobStatus, set[str]] = {status: set() for status in JobStatus}
    for status, model, n in rows:
        counts[status] += int(n)
        models[JobStatus(status)].add(model)
    return counts, models


def batch_view(session: Session, batch: Batch, *, serving: Mapping[str, int] | None = None) -> dict[str, Any]:
    """What `GET /v1/batches/{id}` returns, with progress in [0, 1] and an ETA from measured times.

    With `serving` (workers per served model): `unserved_models`, the models of its queued jobs no worker
    serves, and an ETA shared among the workers of its model (two GPUs finish it in about half the time).
    """
    counts, models = batch_counts_and_models(session, batch.id)
    queued_models = models[JobStatus.QUEUED]
    done = sum(counts[s] for s in TERMINAL)
    steps_done, steps_total = _step_progress(session, batch.id)
    remaining = batch.total_jobs - done
    view: dict[str, Any] = {
        "id": batch.id,
        "status": batch_status(counts).value,
        "total": batch.total_jobs,
        "counts": counts,
        "progress": round(steps_done / steps_total, 4) if steps_total else 1.0,
        "eta_seconds": _shared_eta(eta_seconds(session, batch.id, remaining), models, serving),
        "created_at": batch.created_at.isoformat(),
    }
    if serving is not None:
        view["unserved_models"] = sorted(model for model in queued_models if not serving.get(model))
    return view


def _shared_eta(
    eta: float | None, models: dict[JobStatus, set[str]], serving: Mapping[str, int] | None
) -> float | None:
    # The remaining jobs' time is one worker's; W workers of the batch's model render them side by side
    # (measured: 2 workers took 0.49-0.52 of one's time on 2 H100s). With several models, the slowest share.
    active = models[JobStatus.QUEUED] | models[JobStatus.RUNNING]
    if eta is None or not serving or not active:
        return eta
    workers = min(serving.get(model, 0) for model in active)
    return round(eta / workers, 1) if workers > 1 else eta


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
