"""Which queued jobs to try next: FIFO by priority, preferring the worker's last size, never starving anyone.

A worker only ever sees the jobs of the model it serves (WORKER_MODEL): the broker routes each model's
messages to that model's queue, and the claim in SQL agrees.

Within the head's priority, a job with the model, dtype and size the worker ran last goes ahead of the
head, so the worker does not switch sizes. The head is passed over for at most `max_wait_s` (counted
from the first time it was passed over); then it runs, whatever the preference.

With many workers the preference stays fair: it only reorders one worker's own next claim, which takes
one job and holds nothing, so another idle worker (preferring another size, or nothing) claims the head
at once. Each worker keeps its own PassedOver record, so the head waits at most `max_wait_s` from the
first time any worker passed it over (plus the job that worker was rendering): that worker claims it
next. How many jobs one claim may add to its text-encoder group is `fair_groupmates`.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Row, Select, func, select
from sqlalchemy.orm import Session

from jobs.params import GenerationParams
from jobs.states import JobStatus
from jobs.tables import Job

# A job that already used an attempt (its worker died) goes behind fresh jobs of its priority: a crash
# that keeps recurring then spreads over the batch instead of spending one job's every attempt.
FIFO = (Job.priority.desc(), Job.attempts, Job.created_at, Job.batch_index, Job.id)
CLAIMABLE = (
    Job.status == JobStatus.QUEUED,
    Job.attempts < Job.max_attempts,
    Job.cancel_requested.is_(False),
)


@dataclass(frozen=True)
class Preference:
    """What the worker ran last: queued jobs like it skip a size switch."""

    model: str
    dtype: str
    width: int
    height: int

    @classmethod
    def of(cls, params: GenerationParams) -> Preference:
        """The preference for jobs like the one these params describe."""
        return cls(model=params.model, dtype=params.dtype, width=params.width, height=params.height)

    def matches(self, row: Row) -> bool:
        """Whether a queued job's row has this model, dtype and size."""
        return (row.model, row.dtype, row.width, row.height) == (
            self.model,
            self.dtype,
            self.width,
            self.height,
        )


class PassedOver:
    """When the queue's head was first passed over, in monotonic seconds; holds at most the head."""

    def __init__(self) -> None:
        """Start with nobody passed over."""
        self._since: dict[str, float] = {}

    def note(self, job_id: str, now: float) -> None:
        """Record the first time this job was passed over (a later note keeps the first time)."""
        self._since.setdefault(job_id, now)

    def waited(self, job_id: str, now: float) -> float:
        """Seconds since the job was first passed over; 0 if it never was."""
        since = self._since.get(job_id)
        return 0.0 if since is None else max(0.0, now - since)

    def forget(self, job_id: str) -> None:
        """Drop the job's record (it ran, or it is no longer the head)."""
        self._since.pop(job_id, None)

    def retain(self, job_id: str | None) -> None:
        """Forget every job but this one (the current head), so the record stays tiny."""
        for other in [known for known in self._since if known != job_id]:
            self.forget(other)

    def __len__(self) -> int:
        """How many jobs are recorded."""
        return len(self._since)


def _queued(model: str, limit: int) -> Select:
    """Claimable queued jobs of `model`: ids and sizes in FIFO order, at most `limit`."""
    columns = (Job.id, Job.priority, Job.model, Job.dtype, Job.width, Job.height)
    return select(*columns).where(*CLAIMABLE, Job.model == model).order_by(*FIFO).limit(limit)


def _first_preferred(session: Session, model: str, preference: Preference, priority: int) -> str | None:
    """The oldest claimable job of `model` with the preferred model, dtype and size at this priority."""
    return session.scalar(
        _queued(model, 1).where(
            Job.priority == priority,
            Job.model == preference.model,
            Job.dtype == preference.dtype,
            Job.width == preference.width,
            Job.height == preference.height,
        )
    )


def next_job_ids(
    session: Session,
    *,
    model: str,
    preference: Preference | None,
    passed_over: PassedOver,
    max_wait_s: float,
    now: float,
    limit: int = 8,
) -> list[str]:
    """Claimable queued jobs of `model` to try, best first: FIFO, or one preferred job ahead of the head."""
    rows = session.execute(_queued(model, max(limit, 1))).all()
    fifo = [row.id for row in rows][:limit]
    head = rows[0] if rows else None
    passed_over.retain(head.id if head else None)
    if head is None or preference is None or max_wait_s <= 0 or preference.matches(head):
        return fifo
    preferred = _first_preferred(session, model, preference, head.priority)
    if preferred is None or passed_over.waited(head.id, now) >= max_wait_s:
        return fifo
    passed_over.note(head.id, now)
    return [preferred, *(job_id for job_id in fifo if job_id != preferred)][:limit]


def claimable_count(session: Session, *, model: str, at_most: int) -> int:
    """How many queued jobs of `model` a worker could claim now, counted up to `at_most`.

    The bound keeps the count as cheap as the claim's own query with 10,000 jobs queued.
    """
    claimable = select(Job.id).where(*CLAIMABLE, Job.model == model).limit(max(at_most, 0)).subquery()
    return session.scalar(select(func.count()).select_from(claimable)) or 0


def fair_groupmates(*, queued: int, workers: int, max_groupmates: int) -> int:
    """How many groupmates a worker may add to the job it just claimed, so sharing stays fair.

    The rule: a group claim never takes work that another idle worker would have started sooner.
    A worker renders its k groupmates one after another, the last one starting about k jobs from
    now; in that time each of the other `workers - 1` workers serving the model starts about k jobs
    of its own. So the worker takes k groupmates only while at least k of the `queued` jobs (the
    model's claimable jobs left after its first claim) remain for each other worker:
    queued - k >= k * (workers - 1), that is k <= queued // workers, capped by `max_groupmates`
    (ENCODE_GROUP_SIZE - 1). With one worker this is every compatible job up to the cap.

    `workers` counts live and starting workers (jobs.serving), the claimer among them; it is at
    least 1. It assumes the other workers are idle and as fast: a busy or slower worker would start
    its share later, so the rule errs towards smaller groups, which only costs shared encoder passes.
    """
    return max(0, min(max_groupmates, queued // max(workers, 1)))
