"""The diagram of jobs/lifecycle.py, walked in SQL on both backends.

Every move is tried from every status: where the diagram has a row the job lands in the row's target,
and everywhere else the row stays exactly as it was, both through the lifecycle functions and through
the SQL helper they share.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from jobs import lifecycle
from jobs.db import make_database, make_session_factory, transaction
from jobs.lifecycle import DIAGRAM, Move, allowed_from, born_as, can_transition, transition
from jobs.states import RETRYABLE, TERMINAL, JobStatus
from jobs.submit import insert_job
from jobs.tables import Job, utcnow
from tests.conftest import BACKENDS
from tests.service.test_lifecycle import PARAMS, STATS

TOKEN = "0f0f0f0f-0000-4000-8000-000000000001"
LONG_AGO = utcnow() - timedelta(hours=1)
MAX_ATTEMPTS = 3
WRITING_MOVES = [move for move in Move if move not in (Move.SUBMIT, Move.RETRY)]

# How each move is made by its function, and what the job needs besides its status for the move to apply.
Act = Callable[[Session, str], object]
MAKERS: dict[Move, tuple[dict[str, Any], Act]] = {
    Move.CLAIM: ({}, lambda s, j: lifecycle.claim_job(s, job_id=j)),
    Move.PROGRESS: ({}, lambda s, j: lifecycle.record_progress(s, job_id=j, lease_token=TOKEN, step=2)),
    Move.HEARTBEAT: ({}, lambda s, j: lifecycle.heartbeat(s, job_id=j, lease_token=TOKEN)),
    Move.FINISH: (
        {},
        lambda s, j: lifecycle.finish_job(s, job_id=j, lease_token=TOKEN, result_path="/x.png", stats=STATS),
    ),
    Move.FAIL: (
        {},
        lambda s, j: lifecycle.fail_job(s, job_id=j, lease_token=TOKEN, error="broke", stats=None),
    ),
    Move.STOP: ({}, lambda s, j: lifecycle.cancel_running_job(s, job_id=j, lease_token=TOKEN, stats=None)),
    Move.CANCEL: ({}, lambda s, j: lifecycle.request_cancel(s, job_ids=[j])),
    Move.EXHAUST: ({"attempts": MAX_ATTEMPTS}, lambda s, j: lifecycle.fail_if_exhausted(s, job_id=j)),
    Move.HAND_BACK: ({"published_at": LONG_AGO}, lambda s, j: lifecycle.hand_back(s, job_id=j)),
    Move.MARK_SENT: ({}, lambda s, j: lifecycle.mark_sent(s, job_ids=[j], at=utcnow())),
    Move.MARK_UNSENT: ({"published_at": LONG_AGO}, lambda s, j: lifecycle.mark_unsent(s, job_ids=[j])),
    Move.MARK_LOST: ({"published_at": LONG_AGO}, lambda s, j: lifecycle.mark_lost(s, job_ids=[j])),
    Move.REQUEUE_STALE: (
        {"heartbeat_at": LONG_AGO},
        lambda s, j: lifecycle.requeue_stale(s, silent_since=utcnow()),
    ),
    Move.FAIL_STALE: (
        {"heartbeat_at": LONG_AGO, "attempts": MAX_ATTEMPTS},
        lambda s, j: lifecycle.fail_stale(s, silent_since=utcnow()),
    ),
    Move.CANCEL_STALE: (
        {"heartbeat_at": LONG_AGO, "cancel_requested": True},
        lambda s, j: lifecycle.cancel_stale(s, silent_since=utcnow()),
    ),
}


@pytest.fixture
def sessions(database_url: str) -> Iterator[sessionmaker[Session]]:
    """A session factory on a migrated database of the test's backend."""
    database = make_database(database_url)
    yield make_session_factory(database)
    database.dispose()


def job_in(factory: sessionmaker[Session], status: JobStatus, **columns: Any) -> str:
    """A new job put straight into `status` (with a lease token, as a claimed job has), and `columns`."""
    with transaction(factory) as session:
        job_id = insert_job(session, params=PARAMS, priority=0, max_attempts=MAX_ATTEMPTS).job_ids[0]
        set_columns(session, job_id, status=status, lease_token=TOKEN, **columns)
    return job_id


def set_columns(session: Session, job_id: str, **columns: Any) -> None:
    """Write columns of a job directly, around the lifecycle: the test's own setup."""
    session.execute(update(Job).where(Job.id == job_id).values(**columns))


def snapshot(factory: sessionmaker[Session], job_id: str) -> dict[str, Any]:
    """Every column of the job's row, read in a fresh session."""
    with factory() as session:
        return dict(session.execute(select(Job.__table__).where(Job.id == job_id)).one()._mapping)


def target_of(source: JobStatus, move: Move) -> JobStatus | None:
    """Where the diagram takes a job in `source` by `move`, or None if it has no such row."""
    targets = {row.target for row in DIAGRAM if (row.source, row.via) == (source, move)}
    assert len(targets) <= 1, f"{move.name} from {source} is ambiguous: {targets}"
    return targets.pop() if targets else None


def test_every_move_is_a_function_with_rows() -> None:
    for move in Move:
        assert inspect.isfunction(getattr(lifecycle, move.value, None)), f"no function {move.value}"
        assert any(row.via == move for row in DIAGRAM), f"{move.name} has no row"
    assert set(MAKERS) == set(WRITING_MOVES)


def test_finished_states_have_no_moves_out_and_every_other_state_can_finish() -> None:
    assert not [row for row in DIAGRAM if row.source in TERMINAL]
    for status in set(JobStatus) - TERMINAL:
        assert any(can_transition(status, end) for end in TERMINAL), f"{status} can never finish"
    assert all(
        can_transition(row.source, row.target) for row in DIAGRAM if row.source not in (None, row.target)
    )


@pytest.mark.parametrize("empty_database_url", BACKENDS, indirect=True)
@pytest.mark.parametrize("move", WRITING_MOVES, ids=lambda move: move.name)
def test_each_move_makes_its_rows_and_changes_nothing_from_other_statuses(
    sessions: sessionmaker[Session], move: Move
) -> None:
    columns, act = MAKERS[move]
    for source in JobStatus:
        job_id = job_in(sessions, source, **columns)
        before = snapshot(sessions, job_id)
        with transaction(sessions) as session:
            result = act(session, job_id)
        after = snapshot(sessions, job_id)
        target = target_of(source, move)
        if target is None:
            assert after == before, f"{move.name} changed a {source} job"
        else:
            assert result, f"{move.name} did not move a {source} job"
            assert after["status"] == target
            assert after != before, f"{move.name} wrote nothing to a {source} job"


@pytest.mark.parametrize("empty_database_url", BACKENDS, indirect=True)
def test_the_sql_helper_moves_only_along_the_diagram(sessions: sessionmaker[Session]) -> None:
    job_id = job_in(sessions, JobStatus.QUEUED)
    for source, to, move in itertools.product(JobStatus, JobStatus, Move):
        with transaction(sessions) as session:
            set_columns(session, job_id, status=source, error=None)
        before = snapshot(sessions, job_id)
        if not allowed_from(to, move):
            with pytest.raises(ValueError, match="the diagram has no move"), transaction(sessions) as session:
                transition(session, via=move, to=to, where=[Job.id == job_id], values={"error": "moved"})
            assert snapshot(sessions, job_id) == before
            continue
        with transaction(sessions) as session:
            moved = transition(session, via=move, to=to, where=[Job.id == job_id], values={"error": "moved"})
        after = snapshot(sessions, job_id)
        if source in allowed_from(to, move):
            assert moved == 1, f"{move.name} refused {source} -> {to}"
            assert (after["status"], after["error"]) == (to, "moved")
        else:
            assert moved == 0, f"{move.name} allowed {source} -> {to}"
            assert after == before


@pytest.mark.parametrize("empty_database_url", BACKENDS, indirect=True)
def test_new_rows_start_where_the_diagram_says(sessions: sessionmaker[Session]) -> None:
    with transaction(sessions) as session:
        submitted = insert_job(session, params=PARAMS, priority=0, max_attempts=MAX_ATTEMPTS).job_ids[0]
    assert snapshot(sessions, submitted)["status"] == born_as(Move.SUBMIT)

    # Only the finished jobs a client may retry get a copy; the others are left as they are.
    originals = {status: job_in(sessions, status) for status in JobStatus}
    before = {job_id: snapshot(sessions, job_id) for job_id in originals.values()}
    with transaction(sessions) as session:
        retried = lifecycle.retry_jobs(session, job_ids=list(originals.values()))
    with sessions() as session:
        copies = session.scalars(select(Job).where(Job.id.in_(retried))).all()
    assert sorted(str(copy.retry_of) for copy in copies) == sorted(originals[status] for status in RETRYABLE)
    assert [copy.status for copy in copies] == [born_as(Move.RETRY)] * len(RETRYABLE)
    assert all(type(copy.status) is JobStatus for copy in copies)
    assert {job_id: snapshot(sessions, job_id) for job_id in originals.values()} == before
