"""Queue positions from the per-process snapshot, over a real database (PostgreSQL and SQLite).

Before, every `GET /v1/jobs/{id}` (and every job of an archive) ran a COUNT over the queued jobs. The
snapshot gives the same answers, from one query per second at most.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, and_, event, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from jobs.db import make_database, make_session_factory, transaction
from jobs.lifecycle import claim_job
from jobs.params import GenerationParams
from jobs.positions import QueueSnapshot
from jobs.settings import Settings
from jobs.states import JobStatus
from jobs.submit import insert_batch, insert_job
from jobs.tables import Job, utcnow
from jobs.views import queue_position
from tests.conftest import BACKENDS

pytestmark = pytest.mark.parametrize("empty_database_url", BACKENDS, indirect=True)

PARAMS = GenerationParams(prompt="a red fox", width=64, height=64, steps=2, seed=1, model="synthetic:tiny")


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        """The current time."""
        return self.now


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    """An engine on the test's migrated database."""
    engine = make_database(settings.resolved_database_url())
    yield engine
    engine.dispose()


@pytest.fixture
def factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions on the test's database."""
    return make_session_factory(engine)


def add_job(factory: sessionmaker[Session], priority: int) -> str:
    """Queue one job outside any batch; returns its id."""
    with transaction(factory) as session:
        return insert_job(session, params=PARAMS, priority=priority, max_attempts=3).job_ids[0]


def add_batch(factory: sessionmaker[Session], size: int, priority: int) -> list[str]:
    """Queue a batch whose jobs share one creation time (batch_index breaks the tie); returns ids."""
    with transaction(factory) as session:
        return insert_batch(session, params=[PARAMS] * size, priority=priority, max_attempts=3).job_ids


def old_position(session: Session, job: Job) -> int:
    """The definition the API used before: a COUNT of the queued jobs ahead of this one."""
    ahead = or_(
        Job.priority > job.priority,
        and_(Job.priority == job.priority, Job.created_at < job.created_at),
        and_(
            Job.priority == job.priority,
            Job.created_at == job.created_at,
            Job.batch_index < job.batch_index,
        ),
    )
    query = select(func.count()).select_from(Job).where(Job.status == JobStatus.QUEUED, ahead)
    return int(session.scalar(query) or 0)


def position_of(factory: sessionmaker[Session], snapshot: QueueSnapshot, job_id: str) -> int:
    """The snapshot's position of one queued job."""
    with factory() as session:
        return snapshot.position(session, session.get_one(Job, job_id))


def count_statements(engine: Engine) -> list[str]:
    """Every SQL statement the engine runs from now on (the list fills as they run)."""
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    return statements


def test_positions_match_the_old_count_on_mixed_priorities(factory: sessionmaker[Session]) -> None:
    """Every queued job of a queue with mixed priorities, batches and singles gets the old COUNT."""
    ids = [add_job(factory, 0), *add_batch(factory, 5, 0), add_job(factory, 5)]
    ids += [*add_batch(factory, 4, 9), add_job(factory, 0), *add_batch(factory, 3, 5)]
    with transaction(factory) as session:
        assert claim_job(session, job_id=ids[2]) is not None  # running: out of the queue
    with factory() as session:
        jobs = session.scalars(select(Job).where(Job.id.in_(ids))).all()
        positions = {job.id: queue_position(session, job) for job in jobs}
        expected = {job.id: old_position(session, job) if job.status == "queued" else None for job in jobs}
    assert positions == expected
    assert sorted(p for p in positions.values() if p is not None) == list(range(len(ids) - 1))
    assert positions[ids[2]] is None


def test_a_position_changes_after_the_snapshot_refreshes(factory: sessionmaker[Session]) -> None:
    """A job queued ahead of another by someone else shows in its position once the snapshot is 1 s old."""
    clock = Clock()
    snapshot = QueueSnapshot(max_age_s=1.0, clock=clock)
    waiting = add_job(factory, 0)
    assert position_of(factory, snapshot, waiting) == 0
    add_job(factory, 5)  # another process queues an urgent job; this snapshot has not seen it
    clock.now += 0.5
    assert position_of(factory, snapshot, waiting) == 0
    clock.now += 0.5
    assert position_of(factory, snapshot, waiting) == 1


def test_a_job_newer_than_the_snapshot_is_placed_without_a_query(
    engine: Engine, factory: sessionmaker[Session]
) -> None:
    """A queued job the snapshot has not seen is counted by bisect, and the jobs behind it see it."""
    snapshot = QueueSnapshot(clock=Clock())
    first, second = add_job(factory, 0), add_job(factory, 0)
    assert position_of(factory, snapshot, second) == 1
    urgent = add_job(factory, 5)
    with factory() as session:
        jobs = {job_id: session.get_one(Job, job_id) for job_id in (urgent, first, second)}
        statements = count_statements(engine)
        positions = [snapshot.position(session, jobs[job_id]) for job_id in (urgent, first, second)]
    assert positions == [0, 1, 2]
    assert statements == []


def test_only_one_thread_refreshes_a_stale_snapshot(engine: Engine, factory: sessionmaker[Session]) -> None:
    """Eight threads ask at once when the snapshot is stale: one reads the queue, none waits for it."""
    clock = Clock()
    snapshot = QueueSnapshot(clock=clock)
    job_id = add_job(factory, 0)
    assert position_of(factory, snapshot, job_id) == 0
    clock.now += 5.0
    sessions = [factory() for _ in range(8)]
    jobs = [session.get_one(Job, job_id) for session in sessions]
    statements = count_statements(engine)
    start = threading.Barrier(len(sessions))
    answers: list[int] = []

    def ask(session: Session, job: Job) -> None:
        start.wait()
        answers.append(snapshot.position(session, job))

    threads = [threading.Thread(target=ask, args=pair) for pair in zip(sessions, jobs, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for session in sessions:
        session.close()
    assert answers == [0] * len(sessions)
    assert len([s for s in statements if "FROM jobs" in s]) == 1


def test_left_jobs_drop_out_and_requeued_jobs_go_behind_fresh_ones(factory: sessionmaker[Session]) -> None:
    """The snapshot follows jobs.ordering.FIFO: a job that used an attempt waits behind fresh jobs."""
    clock = Clock()
    snapshot = QueueSnapshot(clock=clock)
    older, newer = add_job(factory, 0), add_job(factory, 0)
    with transaction(factory) as session:
        session.execute(update(Job).where(Job.id == older).values(attempts=1))  # handed back once
        session.execute(update(Job).where(Job.id == newer).values(created_at=utcnow() + timedelta(seconds=5)))
    assert position_of(factory, snapshot, newer) == 0
    assert position_of(factory, snapshot, older) == 1
    with transaction(factory) as session:
        assert claim_job(session, job_id=newer) is not None
    clock.now += 1.0
    assert position_of(factory, snapshot, older) == 0
