"""Job states and the groups of them the code asks about; jobs/lifecycle.py holds the moves between them."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    """Where a job is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


# The finished states: no move leaves them (a retry makes a new job).
TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
# The states of a job with work left: waiting for a worker, or on one.
ACTIVE = frozenset(JobStatus) - TERMINAL
# The finished states a client may retry.
RETRYABLE = frozenset({JobStatus.FAILED, JobStatus.CANCELLED})


def batch_status(counts: dict[str, int]) -> JobStatus:
    """A batch's status, derived from how many of its jobs are in each state."""
    total = sum(counts.values())
    if sum(counts.get(status, 0) for status in ACTIVE):
        started = total - counts.get(JobStatus.QUEUED, 0)
        return JobStatus.RUNNING if started else JobStatus.QUEUED
    if counts.get(JobStatus.FAILED, 0):
        return JobStatus.FAILED
    if counts.get(JobStatus.CANCELLED, 0):
        return JobStatus.CANCELLED
    return JobStatus.SUCCEEDED
