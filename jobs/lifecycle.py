"""A job's transitions in SQL. Every write after the claim is fenced by the lease token."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, case, select, update
from sqlalchemy.orm import Session

from jobs.params import GenerationParams
from jobs.states import JobStatus
from jobs.tables import Job, JobStats, utcnow

PARAM_FIELDS = tuple(GenerationParams.model_fields)


@dataclass(frozen=True)
class Claim:
    """A job this worker now owns, with the token that proves it."""

    job_id: str
    lease_token: str
    attempt: int
    params: GenerationParams
    batch_id: str | None


def claim_job(session: Session, *, job_id: str) -> Claim | None:
    """Take a queued job with one conditional UPDATE; None means someone else has it or it is done."""
    token = str(uuid.uuid4())
    now = utcnow()
    result = session.execute(
        update(Job)
        .where(
            Job.id == job_id,
            Job.status == JobStatus.QUEUED,
            Job.attempts < Job.max_attempts,
            Job.cancel_requested.is_(False),
        )
        .values(
            status=JobStatus.RUNNING,
            lease_token=token,
            attempts=Job.attempts + 1,
            started_at=now,
            heartbeat_at=now,
            progress_step=0,
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return None
    job = session.get_one(Job, job_id)
    params = GenerationParams(**{name: getattr(job, name) for name in PARAM_FIELDS})
    return Claim(job_id=job_id, lease_token=token, attempt=job.attempts, params=params, batch_id=job.batch_id)


def _leased(job_id: str, token: str) -> Any:
    return and_(Job.id == job_id, Job.lease_token == token, Job.status == JobStatus.RUNNING)


def record_progress(session: Session, *, job_id: str, lease_token: str, step: int) -> bool:
    """Store the step and a heartbeat; False means stop (cancel requested or lease lost)."""
    result = session.execute(
        update(Job)
        .where(_leased(job_id, lease_token))
        .values(progress_step=step, heartbeat_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    return not session.scalar(select(Job.cancel_requested).where(Job.id == job_id))


def finish_job(
    session: Session, *, job_id: str, lease_token: str, result_path: str, stats: dict[str, Any]
) -> bool:
    """Mark succeeded with its image and stats in one transaction, only while the lease holds.

    Progress is written behind the render, so the last step may not have reached SQL yet: a job that
    succeeded did every step.
    """
    return _finalise(
        session,
        job_id,
        lease_token,
        JobStatus.SUCCEEDED,
        stats,
        result_path=result_path,
        progress_step=Job.steps,
    )


def fail_job(
    session: Session, *, job_id: str, lease_token: str, error: str, stats: dict[str, Any] | None
) -> bool:
    """Mark failed with the reason, only while the lease holds."""
    return _finalise(session, job_id, lease_token, JobStatus.FAILED, stats, error=error)


def cancel_running_job(
    session: Session, *, job_id: str, lease_token: str, stats: dict[str, Any] | None
) -> bool:
    """Mark a job the worker stopped on request as cancelled."""
    return _finalise(session, job_id, lease_token, JobStatus.CANCELLED, stats, error="cancelled by request")


def _finalise(
    session: Session,
    job_id: str,
    lease_token: str,
    status: JobStatus,
    stats: dict[str, Any] | None,
    **values: Any,
) -> bool:
    # The lease token stays on the row, so replaying a finalisation that already committed (the
    # connection dropped before the commit was acknowledged) reads back as done, not as a lost lease.
    result = session.execute(
        update(Job)
        .where(_leased(job_id, lease_token))
        .values(status=status, finished_at=utcnow(), **values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        row = session.execute(select(Job.status, Job.lease_token).where(Job.id == job_id)).one_or_none()
        return row is not None and tuple(row) == (status, lease_token)
    if stats is not None:
        session.merge(JobStats(job_id=job_id, **stats))
    return True


def request_cancel(session: Session, *, job_ids: list[str]) -> int:
    """Cancel queued jobs at once and flag running ones to stop at their next step."""
    now = utcnow()
    stopped = session.execute(
        update(Job)
        .where(Job.id.in_(job_ids), Job.status == JobStatus.QUEUED)
        .values(
            status=JobStatus.CANCELLED, cancel_requested=True, finished_at=now, error="cancelled by request"
        )
        .execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    flagged = session.execute(
        update(Job)
        .where(Job.id.in_(job_ids), Job.status == JobStatus.RUNNING)
        .values(cancel_requested=True)
        .execution_options(synchronize_session=False)
    ).rowcount  # type: ignore[attr-defined]
    return int(stopped + flagged)


def fail_if_exhausted(session: Session, *, job_id: str) -> bool:
    """A queued job whose attempts are spent can never be claimed: fail it so the batch can finish."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED, Job.attempts >= Job.max_attempts)
        .values(status=JobStatus.FAILED, finished_at=utcnow(), error="attempts exhausted")
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def heartbeat(session: Session, *, job_id: str, lease_token: str) -> bool:
    """Prove a running job is alive; False means the lease was lost (the reconciler took it back)."""
    result = session.execute(
        update(Job)
        .where(_leased(job_id, lease_token))
        .values(heartbeat_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def hand_back(session: Session, *, job_id: str) -> bool:
    """Leave a queued job unclaimed and unpublished (the queue is paused); resume republishes it."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
        .values(published_at=None)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


RETRYABLE = (JobStatus.FAILED, JobStatus.CANCELLED)


def retry_jobs(session: Session, *, job_ids: list[str]) -> list[str]:
    """Queue a fresh copy of each failed or cancelled job, linked to it by retry_of; returns new ids."""
    originals = session.scalars(
        select(Job).where(Job.id.in_(job_ids), Job.status.in_([s.value for s in RETRYABLE]))
    ).all()
    created = []
    for original in originals:
        if session.scalar(select(Job.id).where(Job.retry_of == original.id)):
            continue  # already retried: retrying twice would render it twice
        copy = Job(
            **{
                name: getattr(original, name)
                for name in (*PARAM_FIELDS, "batch_id", "batch_index", "priority", "owner")
            },
            id=str(uuid.uuid4()),
            max_attempts=original.max_attempts,
            retry_of=original.id,
            status=JobStatus.QUEUED,
            attempts=0,
            cancel_requested=False,
            progress_step=0,
        )
        session.add(copy)
        created.append(copy.id)
    return created


def groupmates(session: Session, *, claim: Claim, limit: int) -> list[str]:
    """Queued jobs that can share this job's text-encoder pass: same model and dtype, no guidance.

    Only first attempts are grouped: a job that already crashed a worker runs alone, so a poison job
    cannot take healthy jobs down with it twice.
    """
    if limit <= 0 or claim.params.guidance_scale > 0 or claim.attempt > 1:
        return []
    # Within a priority, jobs of the claimed job's size first: the worker's placement and compiled
    # shapes already suit them.
    same_size = and_(Job.width == claim.params.width, Job.height == claim.params.height)
    rows = session.scalars(
        select(Job.id)
        .where(
            Job.status == JobStatus.QUEUED,
            Job.model == claim.params.model,
            Job.dtype == claim.params.dtype,
            Job.guidance_scale == 0,
            Job.attempts == 0,
            Job.cancel_requested.is_(False),
            Job.id != claim.job_id,
        )
        .order_by(Job.priority.desc(), case((same_size, 0), else_=1), Job.created_at, Job.batch_index)
        .limit(limit)
    ).all()
    return list(rows)


def queued_sizes(session: Session, *, model: str, dtype: str, limit: int = 16) -> list[tuple[int, int]]:
    """Distinct sizes of the jobs queued for a model and dtype, largest first (the worker plans for them)."""
    rows = session.execute(
        select(Job.width, Job.height)
        .where(Job.status == JobStatus.QUEUED, Job.model == model, Job.dtype == dtype)
        .distinct()
        .limit(limit)
    ).all()
    return sorted(((int(w), int(h)) for w, h in rows), key=lambda size: size[0] * size[1], reverse=True)
