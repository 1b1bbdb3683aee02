"""Queue positions without a COUNT per request: a per-process snapshot of the queued jobs' FIFO keys.

A position is the number of queued jobs ahead of a job in FIFO order (`jobs.ordering.FIFO`: priority
first, then jobs that have not used an attempt, then age, then batch order). The snapshot is one
indexed query reading only those key columns (`ix_jobs_queue_order`), refreshed at most once a second;
a request then costs one `bisect` over it.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Callable
from datetime import datetime
from typing import TypeAlias

from sqlalchemy import select
from sqlalchemy.orm import Session

from jobs.db import PerDatabase
from jobs.ordering import FIFO
from jobs.states import JobStatus
from jobs.tables import Job

# (-priority, attempts, created_at, batch_index, id): Python's tuple order is jobs.ordering.FIFO.
QueueKey: TypeAlias = tuple[int, int, datetime, int, str]
MAX_AGE_S = 1.0
# A refresh reads every queued job (about 3 us each); with a huge queue the snapshot is kept longer,
# so refreshing never takes more than 1/20 of a thread's time.
REFRESH_SHARE = 20.0


def queue_key(job: Job) -> QueueKey:
    """The job's place in FIFO order as a sortable tuple."""
    return (-job.priority, job.attempts, job.created_at, job.batch_index, job.id)


class QueueSnapshot:
    """The queued jobs' keys in FIFO order, about `max_age_s` old at most; safe to share between threads.

    Readers never wait for a refresh: one thread refreshes while the others bisect the list they have.
    The list is never changed in place (a refresh or an insert swaps in a new one), so every bisect runs
    over a consistent list.
    """

    def __init__(self, max_age_s: float = MAX_AGE_S, clock: Callable[[], float] = time.monotonic) -> None:
        """An empty snapshot, filled on first use."""
        self.max_age_s = max_age_s
        self._clock = clock
        self._keys: list[QueueKey] | None = None
        self._taken_at = 0.0
        self._refresh_s = 0.0
        self._writer = threading.Lock()

    def position(self, session: Session, job: Job) -> int:
        """How many queued jobs are ahead of this queued job, as the snapshot sees the queue."""
        keys = self._current(session)
        key = queue_key(job)
        index = bisect_left(keys, key)
        if index == len(keys) or keys[index] != key:
            # The job is newer than the snapshot (or queued again): count it from now on, without a
            # query, so the jobs behind it see it too.
            self._insert(key)
        return index

    def _stale(self) -> bool:
        age_limit = max(self.max_age_s, REFRESH_SHARE * self._refresh_s)
        return self._keys is None or self._clock() - self._taken_at >= age_limit

    def _current(self, session: Session) -> list[QueueKey]:
        keys = self._keys
        if not self._stale():
            return keys or []
        # Only the first caller ever waits: later ones use the list they have while one thread refreshes.
        if self._writer.acquire(blocking=keys is None):
            try:
                if self._stale():
                    self._refresh(session)
            finally:
                self._writer.release()
        return self._keys or []

    def _refresh(self, session: Session) -> None:
        started = self._clock()
        rows = session.execute(
            select(Job.priority, Job.attempts, Job.created_at, Job.batch_index, Job.id)
            .where(Job.status == JobStatus.QUEUED)
            .order_by(*FIFO)
        ).all()
        keys = [
            (-priority, attempts, created, index, job_id)
            for priority, attempts, created, index, job_id in rows
        ]
        keys.sort()  # linear on rows already in order; the order is Python's, whatever the collation
        self._keys, self._taken_at, self._refresh_s = keys, started, self._clock() - started

    def _insert(self, key: QueueKey) -> None:
        if not self._writer.acquire(blocking=False):
            return  # a refresh is under way and will hold the job if it is still queued
        try:
            keys = self._keys or []
            index = bisect_left(keys, key)
            if index == len(keys) or keys[index] != key:
                self._keys = [*keys[:index], key, *keys[index:]]
        finally:
            self._writer.release()


_snapshots = PerDatabase(QueueSnapshot)


def snapshot_for(session: Session) -> QueueSnapshot:
    """The snapshot of the database this session reads: one per process and database."""
    return _snapshots.of(session)
