"""Job states and the transitions between them."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    """Where a job is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})

# Which status a job may move to from each status; anything else is a bug or a stale writer.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.FAILED}),
    JobStatus.RUNNING: frozenset(
        {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.QUEUED}
    ),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


def can_transition(current: JobStatus, target: JobStatus) -> bool:
    """Whether a job in `current` may move to `target`."""
    return target in TRANSITIONS[current]


def batch_status(counts: dict[str, int]) -> JobStatus:
    """A batch's status, derived from how many of its jobs are in each state."""
    total = sum(counts.values())
    active = counts.get(JobStatus.QUEUED, 0) + counts.get(JobStatus.RUNNING, 0)
    if active:
        started = total - counts.get(JobStatus.QUEUED, 0)
        return JobStatus.RUNNING if started else JobStatus.QUEUED
    if counts.get(JobStatus.FAILED, 0):
        return JobStatus.FAILED
    if counts.get(JobStatus.CANCELLED, 0):
        return JobStatus.CANCELLED
    return JobStatus.SUCCEEDED
