"""Service tests of a job's SQL transitions (claim, progress, finish, cancel, recovery) on both backends."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from jobs.db import make_database, make_session_factory, transaction
from jobs.lifecycle import (
    claim_job,
    fail_if_exhausted,
    fail_job,
    finish_job,
    groupmates,
    record_progress,
    request_cancel,
)
from jobs.params import GenerationParams
from jobs.reconcile import recover_stale_running
from jobs.states import TERMINAL
from jobs.submit import insert_batch, insert_job
from jobs.tables import Job, JobStats, utcnow
from tests.conftest import BACKENDS

pytestmark = pytest.mark.parametrize("empty_database_url", BACKENDS, indirect=True)

PARAMS = GenerationParams(
    prompt="a red fox in the snow",
    negative_prompt="blurry",
    width=96,
    height=64,
    steps=4,
    guidance_scale=1.5,
    seed=1234,
    model="synthetic:tiny",
    dtype="fp32",
)
STATS = {
    "peak_allocated_bytes": 123_456,
    "peak_reserved_bytes": 234_567,
    "rung": "none",
    "denoise_s": 1.25,
    "device_name": "test-device",
    "torch_version": "2.x",
    "diffusers_version": "0.x",
}
STALE_AFTER_S = 120.0


@pytest.fixture
def factory(database_url: str) -> Iterator[sessionmaker[Session]]:
    """A session factory on a migrated database of the test's backend."""
    engine = make_database(database_url)
    yield make_session_factory(engine)
    engine.dispose()


def new_job(
    factory: sessionmaker[Session], *, max_attempts: int = 3, params: GenerationParams = PARAMS
) -> str:
    """Insert one queued job and return its id."""
    with transaction(factory) as session:
        return insert_job(session, params=params, priority=0, max_attempts=max_attempts).job_ids[0]


def row(factory: sessionmaker[Session], job_id: str) -> Job:
    """The job's row, read in a fresh session."""
    with factory() as session:
        return session.get_one(Job, job_id)


def make_stale(factory: sessionmaker[Session], job_id: str) -> None:
    """Move the job's last heartbeat an hour into the past, as if its worker died."""
    with transaction(factory) as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(hours=1))
        )


def test_claim_returns_the_submitted_params_once(factory: sessionmaker[Session]) -> None:
    job_id = new_job(factory)
    with transaction(factory) as session:
        claim = claim_job(session, job_id=job_id)
    assert claim is not None
    assert claim.job_id == job_id
    assert claim.attempt == 1
    assert claim.params == PARAMS
    assert claim.batch_id is None

    stored = row(factory, job_id)
    assert stored.status == "running"
    assert stored.attempts == 1
    assert stored.lease_token == claim.lease_token
    assert stored.started_at is not None
    assert stored.heartbeat_at is not None

    # A duplicate delivery of the same message finds the job taken.
    with transaction(factory) as session:
        assert claim_job(session, job_id=job_id) is None
    assert row(factory, job_id).attempts == 1
    assert row(factory, job_id).lease_token == claim.lease_token


def test_claim_of_a_batch_job_carries_its_batch(factory: sessionmaker[Session]) -> None:
    second = PARAMS.model_copy(update={"seed": 99})
    with transaction(factory) as session:
        submission = insert_batch(session, params=[PARAMS, second], priority=3, max_attempts=3)
    with transaction(factory) as session:
        claim = claim_job(session, job_id=submission.job_ids[1])
    assert claim is not None
    assert claim.batch_id == submission.batch_id
    assert claim.params == second
    assert row(factory, submission.job_ids[0]).status == "queued"


def test_claim_of_unknown_or_cancelled_job_is_none(factory: sessionmaker[Session]) -> None:
    job_id = new_job(factory)
    with transaction(factory) as session:
        assert request_cancel(session, job_ids=[job_id]) == 1
    with transaction(factory) as session:
        assert claim_job(session, job_id=job_id) is None
        assert claim_job(session, job_id="no-such-job") is None
    assert row(factory, job_id).status == "cancelled"


def test_progress_is_fenced_by_the_lease_and_stops_on_cancel(factory: sessionmaker[Session]) -> None:
    job_id = new_job(factory)
    with transaction(factory) as session:
        claim = claim_job(session, job_id=job_id)
    assert claim is not None

    with transaction(factory) as session:
        assert record_progress(session, job_id=job_id, lease_token=claim.lease_token, step=2) is True
    assert row(factory, job_id).progress_step == 2

    with transaction(factory) as session:
        assert record_progress(session, job_id=job_id, lease_token="not-the-token", step=3) is False
    assert row(factory, job_id).progress_step == 2

    with transaction(factory) as session:
        assert request_cancel(session, job_ids=[job_id]) == 1
    flagged = row(factory, job_id)
    assert flagged.status == "running"
    assert flagged.cancel_requested is True

    with transaction(factory) as session:
        assert record_progress(session, job_id=job_id, lease_token=claim.lease_token, step=3) is False


def test_finish_with_a_stale_token_is_refused_then_the_owner_finishes(factory: sessionmaker[Session]) -> None:
    job_id = new_job(factory)
    with transaction(factory) as session:
        first = claim_job(session, job_id=job_id)
    assert first is not None
    make_stale(factory, job_id)
    with transaction(factory) as session:
        assert recover_stale_running(session, stale_after_s=STALE_AFTER_S) == (1, 0)
    with transaction(factory) as session:
        second = claim_job(session, job_id=job_id)
    assert second is not None
    assert second.attempt == 2
    assert second.lease_token != first.lease_token

    # The first worker comes back late: its writes must not land.
    with transaction(factory) as session:
        assert not finish_job(
            session, job_id=job_id, lease_token=first.lease_token, result_path="/tmp/old.png", stats=STATS
        )
        assert not fail_job(session, job_id=job_id, lease_token=first.lease_token, error="late", stats=None)
    stale = row(factory, job_id)
    assert stale.status == "running"
    assert stale.result_path is None
    assert stale.error is None
    with factory() as session:
        assert session.get(JobStats, job_id) is None

    with transaction(factory) as session:
        assert finish_job(
            session, job_id=job_id, lease_token=second.lease_token, result_path="/tmp/new.png", stats=STATS
        )
    done = row(factory, job_id)
    assert done.status == "succeeded"
    assert done.result_path == "/tmp/new.png"
    # The token stays on the row so a replayed finish (commit acknowledged late) reads back as done.
    assert done.lease_token == second.lease_token
    assert done.finished_at is not None
    with factory() as session:
        stats = session.get_one(JobStats, job_id)
        assert stats.peak_allocated_bytes == 123_456
        assert stats.peak_reserved_bytes == 234_567
        assert stats.denoise_s == pytest.approx(1.25)
        assert stats.device_name == "test-device"
        assert stats.recorded_at is not None

    # Once finished, the same token can no longer change anything; replaying the finish reads as done.
    with transaction(factory) as session:
        assert not record_progress(session, job_id=job_id, lease_token=second.lease_token, step=1)
        assert not fail_job(session, job_id=job_id, lease_token=second.lease_token, error="x", stats=None)
        assert finish_job(
            session, job_id=job_id, lease_token=second.lease_token, result_path="/tmp/new.png", stats=STATS
        )
    assert row(factory, job_id).status == "succeeded"
    assert row(factory, job_id).result_path == "/tmp/new.png"


def test_fail_if_exhausted(factory: sessionmaker[Session]) -> None:
    spent = new_job(factory, max_attempts=2)
    fresh = new_job(factory, max_attempts=2)
    with transaction(factory) as session:
        session.execute(update(Job).where(Job.id == spent).values(attempts=2))

    with transaction(factory) as session:
        assert claim_job(session, job_id=spent) is None
        assert fail_if_exhausted(session, job_id=spent) is True
        assert fail_if_exhausted(session, job_id=fresh) is False
    failed = row(factory, spent)
    assert failed.status == "failed"
    assert failed.error == "attempts exhausted"
    assert failed.finished_at is not None
    assert row(factory, fresh).status == "queued"

    with transaction(factory) as session:
        assert fail_if_exhausted(session, job_id=spent) is False


def test_groupmates_share_the_claims_model_and_dtype_only(factory: sessionmaker[Session]) -> None:
    """A group never takes a job of another model (it waits for that model's worker) or dtype."""
    encodable = PARAMS.model_copy(update={"guidance_scale": 0.0, "dtype": "bf16"})
    first, other_size, same = (
        new_job(factory, params=encodable.model_copy(update=change)) for change in ({}, {"width": 64}, {})
    )
    other_model = new_job(factory, params=encodable.model_copy(update={"model": "synthetic:full"}))
    other_dtype = new_job(factory, params=encodable.model_copy(update={"dtype": "fp16"}))
    with transaction(factory) as session:
        claim = claim_job(session, job_id=first)
        assert claim is not None
        assert groupmates(session, claim=claim, limit=8) == [same, other_size]  # its size first, though newer
        assert groupmates(session, claim=claim, limit=1) == [same]
        assert groupmates(session, claim=claim, limit=0) == []
    assert {row(factory, job).status for job in (other_model, other_dtype)} == {"queued"}


def test_recover_stale_running_requeues_or_fails(factory: sessionmaker[Session]) -> None:
    retryable = new_job(factory, max_attempts=3)
    spent = new_job(factory, max_attempts=1)
    alive = new_job(factory, max_attempts=3)
    tokens = {}
    for job_id in (retryable, spent, alive):
        with transaction(factory) as session:
            claim = claim_job(session, job_id=job_id)
            assert claim is not None
            tokens[job_id] = claim.lease_token
            assert record_progress(session, job_id=job_id, lease_token=claim.lease_token, step=3)
    with transaction(factory) as session:
        session.execute(update(Job).where(Job.id == retryable).values(published_at=utcnow()))
    make_stale(factory, retryable)
    make_stale(factory, spent)

    with transaction(factory) as session:
        assert recover_stale_running(session, stale_after_s=STALE_AFTER_S) == (1, 1)

    requeued = row(factory, retryable)
    assert requeued.status == "queued"
    assert requeued.lease_token is None
    assert requeued.published_at is None
    assert requeued.progress_step == 0
    assert requeued.attempts == 1

    lost = row(factory, spent)
    assert lost.status == "failed"
    assert lost.error == "worker lost"
    assert lost.lease_token is None
    assert lost.finished_at is not None

    untouched = row(factory, alive)
    assert untouched.status == "running"
    assert untouched.lease_token == tokens[alive]

    # The old worker of the requeued job has lost its lease.
    with transaction(factory) as session:
        assert not record_progress(session, job_id=retryable, lease_token=tokens[retryable], step=4)
        again = claim_job(session, job_id=retryable)
    assert again is not None
    assert again.attempt == 2

    with transaction(factory) as session:
        assert recover_stale_running(session, stale_after_s=STALE_AFTER_S) == (0, 0)


def test_stale_job_with_cancel_requested_does_not_stay_queued_forever(factory: sessionmaker[Session]) -> None:
    """A lost job whose cancel was requested ends cancelled instead of queued and unclaimable."""
    job_id = new_job(factory, max_attempts=3)
    with transaction(factory) as session:
        assert claim_job(session, job_id=job_id) is not None
        assert request_cancel(session, job_ids=[job_id]) == 1
    make_stale(factory, job_id)
    with transaction(factory) as session:
        recover_stale_running(session, stale_after_s=STALE_AFTER_S)
    with transaction(factory) as session:
        claimed = claim_job(session, job_id=job_id) is not None
        fail_if_exhausted(session, job_id=job_id)
    with factory() as session:
        status = session.scalar(select(Job.status).where(Job.id == job_id))
    # Either it can run again or it has reached an end state; a queued job nobody can claim is lost.
    assert claimed or status in TERMINAL
