"""A job's life: the diagram below lists every write to a job's row, and this module makes each one.

Every UPDATE goes through `transition`, which touches only rows in a status the diagram allows for
that move, so a stale writer (a worker whose lease was taken back, a request that lost a race)
changes nothing. Writes after the claim are also fenced by the lease token.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from functools import cache
from typing import Any, NamedTuple

from sqlalchemy import ColumnElement, and_, case, select, update
from sqlalchemy.orm import Session

from jobs.db import rowcount
from jobs.params import GenerationParams
from jobs.states import RETRYABLE, JobStatus
from jobs.tables import Job, JobStats, utcnow


class Move(StrEnum):
    """Each way a job's row is written; the value names the function of this module that makes it."""

    SUBMIT = "submitted_columns"  # the columns jobs.submit inserts
    RETRY = "retry_jobs"
    CLAIM = "claim_job"
    PROGRESS = "record_progress"
    HEARTBEAT = "heartbeat"
    FINISH = "finish_job"
    FAIL = "fail_job"
    STOP = "cancel_running_job"
    CANCEL = "request_cancel"
    EXHAUST = "fail_if_exhausted"
    HAND_BACK = "hand_back"
    MARK_SENT = "mark_sent"
    MARK_UNSENT = "mark_unsent"
    MARK_LOST = "mark_lost"
    REQUEUE_STALE = "requeue_stale"
    FAIL_STALE = "fail_stale"
    CANCEL_STALE = "cancel_stale"


class Transition(NamedTuple):
    """One row of the diagram: `via` moves a job from `source` (None: a new row) to `target`."""

    source: JobStatus | None
    target: JobStatus
    via: Move


QUEUED, RUNNING = JobStatus.QUEUED, JobStatus.RUNNING
SUCCEEDED, FAILED, CANCELLED = JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED

# What can happen to a job in each status: the rows from it. A row from a status to itself writes
# the row and keeps the status. The finished states (states.TERMINAL) have no rows: nothing changes
# them, and a retry makes a new job, leaving the original as it is.
DIAGRAM: tuple[Transition, ...] = (
    # A new job: submitted, or a copy of a failed or cancelled one (states.RETRYABLE) linked by retry_of.
    Transition(None, QUEUED, Move.SUBMIT),
    Transition(None, QUEUED, Move.RETRY),
    # Queued: waiting for its message to reach a worker.
    Transition(QUEUED, QUEUED, Move.MARK_SENT),  # its message was published
    Transition(QUEUED, QUEUED, Move.MARK_UNSENT),  # publishing failed: the reconciler publishes it
    Transition(QUEUED, QUEUED, Move.MARK_LOST),  # its message vanished from the broker: the same
    Transition(QUEUED, QUEUED, Move.HAND_BACK),  # the queue is paused: resume publishes it again
    Transition(QUEUED, RUNNING, Move.CLAIM),  # a worker took it: a new lease token, one more attempt
    Transition(QUEUED, CANCELLED, Move.CANCEL),  # a client cancelled it
    Transition(QUEUED, FAILED, Move.EXHAUST),  # its attempts are spent, so nobody can claim it
    # Running: only the holder of the lease token writes, until the reconciler takes the job back.
    Transition(RUNNING, RUNNING, Move.PROGRESS),
    Transition(RUNNING, RUNNING, Move.HEARTBEAT),
    Transition(RUNNING, RUNNING, Move.CANCEL),  # flagged: the worker stops at its next step
    Transition(RUNNING, SUCCEEDED, Move.FINISH),
    Transition(RUNNING, FAILED, Move.FAIL),
    Transition(RUNNING, CANCELLED, Move.STOP),  # the worker stopped on the flag
    Transition(RUNNING, QUEUED, Move.REQUEUE_STALE),  # its heartbeat stopped: run it again
    Transition(RUNNING, FAILED, Move.FAIL_STALE),  # its heartbeat stopped and no attempts are left
    Transition(RUNNING, CANCELLED, Move.CANCEL_STALE),  # its heartbeat stopped after a cancel request
)


@cache
def allowed_from(to: JobStatus, via: Move) -> tuple[JobStatus, ...]:
    """The statuses from which `via` may move a job to `to` (empty: the diagram has no such move)."""
    return tuple(
        row.source for row in DIAGRAM if (row.target, row.via) == (to, via) and row.source is not None
    )


def can_transition(current: JobStatus, target: JobStatus) -> bool:
    """Whether some move changes a job in `current` to the different status `target`."""
    return current != target and any((row.source, row.target) == (current, target) for row in DIAGRAM)


def born_as(via: Move) -> JobStatus:
    """The status a new row made by `via` starts in."""
    return next(row.target for row in DIAGRAM if row.via == via and row.source is None)


def transition(
    session: Session,
    *,
    via: Move,
    to: JobStatus,
    where: Sequence[ColumnElement[bool]],
    values: Mapping[str, Any] | None = None,
) -> int:
    """The one UPDATE of jobs: move those matching `where` to `to` if the diagram allows; how many moved."""
    sources = allowed_from(to, via)
    if not sources:
        raise ValueError(f"the diagram has no move {via.name} to {to}")
    statement = (
        update(Job)
        .where(Job.status.in_(sources), *where)
        .values(status=to, **(values or {}))
        .execution_options(synchronize_session=False)
    )
    return rowcount(session.execute(statement))


def _starting_columns(via: Move) -> dict[str, Any]:
    return {"status": born_as(via).value, "attempts": 0, "cancel_requested": False, "progress_step": 0}


def submitted_columns() -> dict[str, Any]:
    """The columns every submitted job starts with (jobs.submit inserts them, in bulk)."""
    return _starting_columns(Move.SUBMIT)


PARAM_FIELDS = tuple(GenerationParams.model_fields)


@dataclass(frozen=True)
class Claim:
    """A job this worker now owns, with the token that proves it."""

    job_id: str
    lease_token: str
    attempt: int
    params: GenerationParams
    batch_id: str | None
    batch_index: int = 0


def claim_job(session: Session, *, job_id: str) -> Claim | None:
    """Take a queued job with one conditional UPDATE; None means someone else has it or it is done."""
    token = str(uuid.uuid4())
    now = utcnow()
    moved = transition(
        session,
        via=Move.CLAIM,
        to=RUNNING,
        where=[Job.id == job_id, Job.attempts < Job.max_attempts, Job.cancel_requested.is_(False)],
        values={
            "lease_token": token,
            "attempts": Job.attempts + 1,
            "started_at": now,
            "heartbeat_at": now,
            "progress_step": 0,
        },
    )
    if moved != 1:
        return None
    job = session.get_one(Job, job_id)
    params = GenerationParams(**{name: getattr(job, name) for name in PARAM_FIELDS})
    return Claim(
        job_id=job_id,
        lease_token=token,
        attempt=job.attempts,
        params=params,
        batch_id=job.batch_id,
        batch_index=job.batch_index,
    )


def _leased(job_id: str, token: str) -> list[ColumnElement[bool]]:
    return [Job.id == job_id, Job.lease_token == token]


def _on_lease(session: Session, via: Move, job_id: str, token: str, values: dict[str, Any]) -> bool:
    """Write to a running job only while `token` holds its lease."""
    return transition(session, via=via, to=RUNNING, where=_leased(job_id, token), values=values) == 1


def record_progress(session: Session, *, job_id: str, lease_token: str, step: int) -> bool:
    """Store the step and a heartbeat; False means stop (cancel requested or lease lost)."""
    values = {"progress_step": step, "heartbeat_at": utcnow()}
    if not _on_lease(session, Move.PROGRESS, job_id, lease_token, values):
        return False
    return not session.scalar(select(Job.cancel_requested).where(Job.id == job_id))


def heartbeat(session: Session, *, job_id: str, lease_token: str) -> bool:
    """Prove a running job is alive; False means the lease was lost (the reconciler took it back)."""
    return _on_lease(session, Move.HEARTBEAT, job_id, lease_token, {"heartbeat_at": utcnow()})


def finish_job(
    session: Session, *, job_id: str, lease_token: str, result_path: str, stats: dict[str, Any]
) -> bool:
    """Mark succeeded with its image and stats in one transaction, only while the lease holds.

    Progress is written behind the render, so the last step may not have reached SQL yet: a job that
    succeeded did every step.
    """
    values = {"result_path": result_path, "progress_step": Job.steps}
    return _finalise(session, job_id, lease_token, Move.FINISH, SUCCEEDED, stats, values)


def fail_job(
    session: Session, *, job_id: str, lease_token: str, error: str, stats: dict[str, Any] | None
) -> bool:
    """Mark failed with the reason, only while the lease holds."""
    return _finalise(session, job_id, lease_token, Move.FAIL, FAILED, stats, {"error": error})


def cancel_running_job(
    session: Session, *, job_id: str, lease_token: str, stats: dict[str, Any] | None
) -> bool:
    """Mark a job the worker stopped on request as cancelled."""
    values = {"error": "cancelled by request"}
    return _finalise(session, job_id, lease_token, Move.STOP, CANCELLED, stats, values)


def _finalise(
    session: Session,
    job_id: str,
    lease_token: str,
    via: Move,
    status: JobStatus,
    stats: dict[str, Any] | None,
    values: dict[str, Any],
) -> bool:
    # The lease token stays on the row, so replaying a finalisation that already committed (the
    # connection dropped before the commit was acknowledged) reads back as done, not as a lost lease.
    values = {**values, "finished_at": utcnow()}
    if transition(session, via=via, to=status, where=_leased(job_id, lease_token), values=values) != 1:
        row = session.execute(select(Job.status, Job.lease_token).where(Job.id == job_id)).one_or_none()
        return row is not None and tuple(row) == (status, lease_token)
    if stats is not None:
        session.merge(JobStats(job_id=job_id, **stats))
    return True


def request_cancel(session: Session, *, job_ids: list[str]) -> int:
    """Cancel queued jobs at once and flag running ones to stop at their next step."""
    chosen = [Job.id.in_(job_ids)]
    stopped = {"cancel_requested": True, "finished_at": utcnow(), "error": "cancelled by request"}
    cancelled = transition(session, via=Move.CANCEL, to=CANCELLED, where=chosen, values=stopped)
    flagged = transition(
        session, via=Move.CANCEL, to=RUNNING, where=chosen, values={"cancel_requested": True}
    )
    return cancelled + flagged


def fail_if_exhausted(session: Session, *, job_id: str) -> bool:
    """A queued job whose attempts are spent can never be claimed: fail it so the batch can finish."""
    spent = [Job.id == job_id, Job.attempts >= Job.max_attempts]
    values = {"finished_at": utcnow(), "error": "attempts exhausted"}
    return bool(transition(session, via=Move.EXHAUST, to=FAILED, where=spent, values=values))


def hand_back(session: Session, *, job_id: str) -> bool:
    """Leave a queued job unclaimed and unpublished (the queue is paused); resume republishes it."""
    return bool(_stamp(session, Move.HAND_BACK, [job_id], None))


def mark_sent(session: Session, *, job_ids: Sequence[str], at: datetime) -> int:
    """Stamp queued jobs whose message was just published."""
    return _stamp(session, Move.MARK_SENT, job_ids, at)


def mark_unsent(session: Session, *, job_ids: Sequence[str]) -> int:
    """Clear the stamp of queued jobs whose publishing failed, so the reconciler publishes them."""
    return _stamp(session, Move.MARK_UNSENT, job_ids, None)


def mark_lost(session: Session, *, job_ids: Sequence[str]) -> int:
    """Clear the stamp of queued jobs whose message the broker lost, so the reconciler publishes them."""
    return _stamp(session, Move.MARK_LOST, job_ids, None)


def _stamp(session: Session, via: Move, job_ids: Sequence[str], at: datetime | None) -> int:
    # In chunks that fit any driver's parameter limit.
    chunks = (list(job_ids[start : start + 500]) for start in range(0, len(job_ids), 500))
    stamp = {"published_at": at}
    return sum(transition(session, via=via, to=QUEUED, where=[Job.id.in_(c)], values=stamp) for c in chunks)


def requeue_stale(session: Session, *, silent_since: datetime) -> int:
    """Running jobs silent since before `silent_since`, with attempts left, go back to the queue."""
    stale = [Job.heartbeat_at < silent_since, Job.attempts < Job.max_attempts]
    values = {"lease_token": None, "published_at": None, "progress_step": 0}
    return transition(session, via=Move.REQUEUE_STALE, to=QUEUED, where=stale, values=values)


def fail_stale(session: Session, *, silent_since: datetime) -> int:
    """Running jobs silent since before `silent_since`, with their attempts spent, fail."""
    stale = [Job.heartbeat_at < silent_since, Job.attempts >= Job.max_attempts]
    values = {"lease_token": None, "finished_at": utcnow(), "error": "worker lost"}
    return transition(session, via=Move.FAIL_STALE, to=FAILED, where=stale, values=values)


def cancel_stale(session: Session, *, silent_since: datetime) -> int:
    """Running jobs whose heartbeat stopped after their cancel was requested end cancelled.

    Requeueing them would leave jobs that no worker can ever claim.
    """
    stale = [Job.heartbeat_at < silent_since, Job.cancel_requested.is_(True)]
    values = {"lease_token": None, "finished_at": utcnow(), "error": "cancelled"}
    return transition(session, via=Move.CANCEL_STALE, to=CANCELLED, where=stale, values=values)


def retry_jobs(session: Session, *, job_ids: list[str]) -> list[str]:
    """Queue a fresh copy of each failed or cancelled job, linked to it by retry_of; returns new ids."""
    originals = session.scalars(select(Job).where(Job.id.in_(job_ids), Job.status.in_(RETRYABLE))).all()
    created = []
    for original in originals:
        if session.scalar(select(Job.id).where(Job.retry_of == original.id)):
            continue  # already retried: retrying twice would render it twice
        copy = Job(
            **{
                name: getattr(original, name)
                for name in (*PARAM_FIELDS, "batch_id", "batch_index", "priority", "owner")
            },
            **_starting_columns(Move.RETRY),
            id=str(uuid.uuid4()),
            max_attempts=original.max_attempts,
            retry_of=original.id,
        )
        session.add(copy)
        created.append(copy.id)
    return created


def can_share_encoding(claim: Claim) -> bool:
    """Whether a claimed job may share its text-encoder pass: no guidance, and its first attempt.

    A job that already crashed a worker runs alone, so a poison job cannot take healthy jobs down with
    it twice.
    """
    return claim.params.guidance_scale == 0 and claim.attempt <= 1


def groupmates(session: Session, *, claim: Claim, limit: int) -> list[str]:
    """Queued jobs that can share this job's text-encoder pass: same model and dtype, no guidance.

    The same model is the worker's own (it claims only those, see jobs.ordering), so a group never
    takes another model's job. Only first attempts are grouped (`can_share_encoding`).
    """
    if limit <= 0 or not can_share_encoding(claim):
        return []
    # Within a priority, jobs of the claimed job's size first: the worker's placement and compiled
    # shapes already suit them.
    same_size = and_(Job.width == claim.params.width, Job.height == claim.params.height)
    rows = session.scalars(
        select(Job.id)
        .where(
            Job.status == QUEUED,
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
        .where(Job.status == QUEUED, Job.model == model, Job.dtype == dtype)
        .distinct()
        .limit(limit)
    ).all()
    return sorted(((int(w), int(h)) for w, h in rows), key=lambda size: size[0] * size[1], reverse=True)
