"""Service tests of operations: retry, pause and resume, lost messages, heartbeats and replayed writes."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from jobs.db import make_database, make_session_factory, transaction, with_retries
from jobs.lifecycle import (
    PARAM_FIELDS,
    Claim,
    cancel_running_job,
    claim_job,
    fail_job,
    finish_job,
    hand_back,
    heartbeat,
)
from jobs.params import GenerationParams
from jobs.queue import Publisher, make_celery, model_queue
from jobs.reconcile import reconcile_once, recover_stale_running
from jobs.settings import Settings
from jobs.submit import insert_batch, insert_job
from jobs.tables import Job, utcnow
from tests.conftest import BACKENDS, REDIS_URL
from worker.outputs import image_path

pytestmark = pytest.mark.parametrize("empty_database_url", BACKENDS, indirect=True)

MODEL = "synthetic:tiny"
SMALL = {"width": 64, "height": 64, "steps": 2, "model": MODEL}
PARAMS = GenerationParams(prompt="a red fox", width=64, height=64, steps=2, seed=7, model=MODEL)
HOUR_S = 3600.0
STATS = {"rung": "none", "device_name": "test", "torch_version": "2.x", "diffusers_version": "0.x"}


def row(factory: sessionmaker[Session], job_id: str) -> Job:
    """The job's row, read in a fresh session."""
    with factory() as session:
        return session.get_one(Job, job_id)


def job_count(factory: sessionmaker[Session]) -> int:
    """How many job rows exist."""
    with factory() as session:
        return int(session.scalar(select(func.count()).select_from(Job)) or 0)


def new_job(factory: sessionmaker[Session]) -> str:
    """Insert one queued, unpublished job directly in SQL and return its id."""
    with transaction(factory) as session:
        return insert_job(session, params=PARAMS, priority=0, max_attempts=3).job_ids[0]


def submit(client: TestClient, prompt: str = "a red fox") -> str:
    """Submit one job through the API (committed and published) and return its id."""
    response = client.post("/v1/jobs", json={"prompt": prompt, **SMALL})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def claim(factory: sessionmaker[Session], job_id: str) -> str:
    """Claim a queued job as a worker would and return its lease token."""
    with transaction(factory) as session:
        taken = claim_job(session, job_id=job_id)
    assert taken is not None
    return taken.lease_token


def fail(factory: sessionmaker[Session], job_id: str, error: str = "boom") -> str:
    """Claim then fail a job; returns the lease token it failed under."""
    token = claim(factory, job_id)
    with transaction(factory) as session:
        assert fail_job(session, job_id=job_id, lease_token=token, error=error, stats=None)
    return token


def age_heartbeat(factory: sessionmaker[Session], job_id: str) -> None:
    """Move the job's heartbeat an hour into the past."""
    with transaction(factory) as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(hours=1))
        )


def delete_queue_keys(queue: str) -> int:
    """Lose every broker message of the test's queue, as a Redis restart without persistence would."""
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{queue}*"))
    return int(client.delete(*keys)) if keys else 0


def queue_view(client: TestClient) -> dict[str, Any]:
    """GET /v1/queue."""
    response = client.get("/v1/queue")
    assert response.status_code == 200, response.text
    return dict(response.json())


# Retry


def test_retry_a_failed_job_queues_a_linked_copy(
    api_client: TestClient, factory: sessionmaker[Session], publisher: Publisher
) -> None:
    original = submit(api_client)
    fail(factory, original)
    assert publisher.queue_length() == 1

    response = api_client.post(f"/v1/jobs/{original}/retry", json={})
    assert response.status_code == 201, response.text
    body = response.json()
    new_id = body["id"]
    assert new_id != original
    assert body["retry_of"] == original
    assert body["status"] == "queued"

    copy, old = row(factory, new_id), row(factory, original)
    assert copy.retry_of == original
    assert copy.status == "queued"
    assert copy.attempts == 0
    assert copy.lease_token is None
    assert copy.published_at is not None
    assert {name: getattr(copy, name) for name in PARAM_FIELDS} == {
        name: getattr(old, name) for name in PARAM_FIELDS
    }
    assert old.status == "failed"
    assert publisher.queue_length() == 2
    assert new_id in publisher.live_job_ids()

    view = api_client.get(f"/v1/jobs/{new_id}").json()
    assert view["retry_of"] == original
    assert view["status"] == "queued"

    # Retrying the same original again would render it twice.
    again = api_client.post(f"/v1/jobs/{original}/retry", json={})
    assert again.status_code == 409, again.text
    assert job_count(factory) == 2
    assert publisher.queue_length() == 2


def test_retry_a_cancelled_job_is_allowed(api_client: TestClient, factory: sessionmaker[Session]) -> None:
    job_id = submit(api_client)
    assert api_client.post(f"/v1/jobs/{job_id}/cancel", json={}).json()["status"] == "cancelled"
    response = api_client.post(f"/v1/jobs/{job_id}/retry", json={})
    assert response.status_code == 201, response.text
    assert row(factory, response.json()["id"]).retry_of == job_id


def test_retry_of_a_queued_running_or_succeeded_job_is_409(
    api_client: TestClient, factory: sessionmaker[Session], publisher: Publisher
) -> None:
    queued = submit(api_client, "queued")
    running = submit(api_client, "running")
    succeeded = submit(api_client, "succeeded")
    claim(factory, running)
    token = claim(factory, succeeded)
    with transaction(factory) as session:
        assert finish_job(
            session,
            job_id=succeeded,
            lease_token=token,
            result_path="/tmp/x.png",
            stats=STATS,
        )
    for job_id in (queued, running, succeeded):
        response = api_client.post(f"/v1/jobs/{job_id}/retry", json={})
        assert response.status_code == 409, response.text
    assert api_client.post(f"/v1/jobs/{uuid.uuid4()}/retry", json={}).status_code == 404
    assert api_client.post("/v1/jobs/no-such-job/retry", json={}).status_code == 422  # not a UUID
    assert job_count(factory) == 3
    assert publisher.queue_length() == 3


def test_retry_a_batch_requeues_failed_and_cancelled_jobs(
    api_client: TestClient, factory: sessionmaker[Session], publisher: Publisher
) -> None:
    created = api_client.post("/v1/batches", json={"prompts": ["a fox", "an owl", "a frog"], **SMALL})
    assert created.status_code == 201, created.text
    batch_id = created.json()["id"]
    failed, cancelled, waiting = created.json()["job_ids"]
    fail(factory, failed)
    assert api_client.post(f"/v1/jobs/{cancelled}/cancel", json={}).status_code == 200

    before = api_client.get(f"/v1/batches/{batch_id}").json()
    assert before["total"] == 3
    assert (before["counts"]["queued"], before["counts"]["failed"], before["counts"]["cancelled"]) == (
        1,
        1,
        1,
    )
    assert publisher.queue_length() == 3

    response = api_client.post(f"/v1/batches/{batch_id}/retry", json={})
    assert response.status_code in (200, 201), response.text
    body = response.json()
    assert body["retried"] == 2
    assert len(body["job_ids"]) == 2
    assert publisher.queue_length() == 5

    after = api_client.get(f"/v1/batches/{batch_id}").json()
    assert after["total"] == 3
    assert after["counts"]["queued"] == 3
    assert after["counts"]["failed"] == 0
    assert after["counts"]["cancelled"] == 0
    assert sum(after["counts"].values()) == 3
    assert after["status"] == "queued"

    originals = {row(factory, new_id).retry_of for new_id in body["job_ids"]}
    assert originals == {failed, cancelled}
    for new_id in body["job_ids"]:
        view = api_client.get(f"/v1/jobs/{new_id}").json()
        assert view["retry_of"] in (failed, cancelled)
        assert view["batch_id"] == batch_id
        assert view["status"] == "queued"
    assert row(factory, waiting).status == "queued"

    # Nothing left to retry: the originals are already replaced, the copies are queued.
    second = api_client.post(f"/v1/batches/{batch_id}/retry", json={})
    assert second.json()["retried"] == 0
    assert publisher.queue_length() == 5
    assert api_client.post(f"/v1/batches/{uuid.uuid4()}/retry", json={}).status_code == 404
    assert api_client.post("/v1/batches/no-such-batch/retry", json={}).status_code == 422  # not a UUID


# Pause and resume


def test_pause_holds_publishing_and_resume_republishes_handed_back_jobs(
    api_client: TestClient, factory: sessionmaker[Session], publisher: Publisher
) -> None:
    assert queue_view(api_client)["paused"] is False
    paused = api_client.post("/v1/queue/pause", json={})
    assert paused.status_code == 200, paused.text
    assert paused.json()["paused"] is True
    # Pausing twice is harmless (the switch row is updated, not inserted again).
    assert api_client.post("/v1/queue/pause", json={}).status_code == 200
    assert queue_view(api_client)["paused"] is True

    unpublished = new_job(factory)
    report = reconcile_once(factory, publisher, stale_after_s=HOUR_S, republish_after_s=0)
    assert report.republished == 0
    assert row(factory, unpublished).published_at is None
    assert publisher.queue_length() == 0

    handed = submit(api_client, "handed back")
    running = submit(api_client, "running")
    assert row(factory, handed).published_at is not None
    claim(factory, running)
    with transaction(factory) as session:
        assert hand_back(session, job_id=handed) is True
        assert hand_back(session, job_id=running) is False
    assert row(factory, handed).published_at is None
    assert row(factory, handed).status == "queued"
    assert row(factory, running).status == "running"

    view = queue_view(api_client)
    assert (view["paused"], view["queued"], view["running"]) == (True, 2, 1)
    length = publisher.queue_length()
    assert length == 2

    resumed = api_client.post("/v1/queue/resume", json={})
    assert resumed.status_code == 200, resumed.text
    assert resumed.json()["paused"] is False
    assert resumed.json()["republished"] == 2
    assert queue_view(api_client)["paused"] is False
    assert row(factory, handed).published_at is not None
    assert row(factory, unpublished).published_at is not None
    assert publisher.queue_length() == length + 2
    assert {handed, unpublished} <= publisher.live_job_ids()


# Lost messages


def test_reconciler_republishes_jobs_whose_messages_redis_lost(
    api_client: TestClient, factory: sessionmaker[Session], publisher: Publisher, settings: Settings
) -> None:
    submitted = {submit(api_client, f"prompt {n}") for n in range(3)}
    running = submit(api_client, "running")
    claim(factory, running)
    assert submitted | {running} <= publisher.live_job_ids()
    assert publisher.queue_length() == 4

    # With every message still in Redis nothing is republished.
    report = reconcile_once(factory, publisher, stale_after_s=HOUR_S, republish_after_s=0)
    assert report.republished == 0
    assert publisher.queue_length() == 4

    assert delete_queue_keys(settings.queue_name) > 0
    assert publisher.queue_length() == 0
    assert not submitted & publisher.live_job_ids()

    # Jobs published more recently than the threshold are left alone.
    report = reconcile_once(factory, publisher, stale_after_s=HOUR_S, republish_after_s=HOUR_S)
    assert report.republished == 0
    assert publisher.queue_length() == 0

    report = reconcile_once(factory, publisher, stale_after_s=HOUR_S, republish_after_s=0)
    assert report.republished == 3
    assert publisher.queue_length() == 3
    live = publisher.live_job_ids()
    assert submitted <= live
    assert running not in live
    assert all(row(factory, job_id).published_at is not None for job_id in submitted)

    report = reconcile_once(factory, publisher, stale_after_s=HOUR_S, republish_after_s=0)
    assert report.republished == 0
    assert publisher.queue_length() == 3


def test_a_delivered_unacknowledged_message_counts_as_live(
    api_client: TestClient, factory: sessionmaker[Session], publisher: Publisher, settings: Settings
) -> None:
    """A message a worker has taken but not yet acknowledged is not lost, so it is not republished."""
    waiting = submit(api_client, "waiting")
    taken = submit(api_client, "taken")
    with make_celery(settings).connection_for_read() as connection:
        channel = connection.default_channel
        message = channel.basic_get(model_queue(settings.queue_name, MODEL), no_ack=False)
        assert message is not None
        try:
            assert message.headers["id"] == waiting  # same priority: first in, first out
            assert publisher.queue_length() == 1
            assert {waiting, taken} <= publisher.live_job_ids()

            delete_queue_keys(settings.queue_name)  # loses the waiting list, not the delivered message
            report = reconcile_once(factory, publisher, stale_after_s=HOUR_S, republish_after_s=0)
            assert report.republished == 1
            assert publisher.queue_length() == 1
            assert {waiting, taken} <= publisher.live_job_ids()
        finally:
            channel.basic_ack(message.delivery_tag)


# Heartbeat and replayed finishes


def test_heartbeat_is_fenced_by_the_lease(factory: sessionmaker[Session]) -> None:
    job_id = new_job(factory)
    token = claim(factory, job_id)
    age_heartbeat(factory, job_id)
    old = row(factory, job_id).heartbeat_at
    assert old is not None

    with transaction(factory) as session:
        assert heartbeat(session, job_id=job_id, lease_token="not-the-token") is False
    assert row(factory, job_id).heartbeat_at == old

    with transaction(factory) as session:
        assert heartbeat(session, job_id=job_id, lease_token=token) is True
    beaten = row(factory, job_id).heartbeat_at
    assert beaten is not None
    assert beaten > old + timedelta(minutes=59)

    # A beaten job is not stale; once finished, the token no longer beats.
    with transaction(factory) as session:
        assert recover_stale_running(session, stale_after_s=60) == (0, 0)
        assert fail_job(session, job_id=job_id, lease_token=token, error="boom", stats=None)
    with transaction(factory) as session:
        assert heartbeat(session, job_id=job_id, lease_token=token) is False


def test_replayed_fail_and_cancel_read_back_as_done(factory: sessionmaker[Session]) -> None:
    failed = new_job(factory)
    token = fail(factory, failed, error="boom")
    first = row(factory, failed)

    # The commit went through but its acknowledgement was lost: the replay must report success.
    with transaction(factory) as session:
        assert fail_job(session, job_id=failed, lease_token=token, error="boom", stats=None) is True
        assert cancel_running_job(session, job_id=failed, lease_token=token, stats=None) is False
        assert fail_job(session, job_id=failed, lease_token="other-token", error="boom", stats=None) is False
    replayed = row(factory, failed)
    assert replayed.status == "failed"
    assert replayed.error == "boom"
    assert replayed.finished_at == first.finished_at

    cancelled = new_job(factory)
    token = claim(factory, cancelled)
    with transaction(factory) as session:
        assert cancel_running_job(session, job_id=cancelled, lease_token=token, stats=None) is True
    finished_at = row(factory, cancelled).finished_at
    with transaction(factory) as session:
        assert cancel_running_job(session, job_id=cancelled, lease_token=token, stats=None) is True
        assert fail_job(session, job_id=cancelled, lease_token=token, error="late", stats=None) is False
    replayed = row(factory, cancelled)
    assert replayed.status == "cancelled"
    assert replayed.error == "cancelled by request"
    assert replayed.finished_at == finished_at


# with_retries


def test_with_retries_returns_the_value_of_a_write(factory: sessionmaker[Session]) -> None:
    job_id = with_retries(
        factory, lambda session: insert_job(session, params=PARAMS, priority=0, max_attempts=3).job_ids[0]
    )
    assert row(factory, job_id).status == "queued"


def test_with_retries_retries_operational_errors_in_fresh_transactions(
    factory: sessionmaker[Session],
) -> None:
    calls = 0

    def flaky(session: Session) -> str:
        """Insert a job, then fail like a restarting database on the first two calls."""
        nonlocal calls
        calls += 1
        job_id = insert_job(session, params=PARAMS, priority=0, max_attempts=3).job_ids[0]
        session.flush()
        if calls <= 2:
            raise OperationalError("x", None, Exception("connection refused"))
        return job_id

    job_id = with_retries(factory, flaky, first_delay_s=0.01)
    assert calls == 3
    # The two failed attempts were rolled back: exactly one job exists.
    assert job_count(factory) == 1
    assert row(factory, job_id).status == "queued"


def test_with_retries_gives_up_after_its_deadline(factory: sessionmaker[Session]) -> None:
    calls = 0

    def down(_session: Session) -> None:
        """A database that never comes back."""
        nonlocal calls
        calls += 1
        raise OperationalError("x", None, Exception("server closed the connection"))

    with pytest.raises(OperationalError):
        with_retries(factory, down, timeout_s=0.05, first_delay_s=0.01)
    assert 1 <= calls < 10


def test_with_retries_does_not_retry_other_errors(factory: sessionmaker[Session]) -> None:
    calls = 0

    def broken(session: Session) -> None:
        """A bug, not an outage."""
        nonlocal calls
        calls += 1
        insert_job(session, params=PARAMS, priority=0, max_attempts=3)
        raise ValueError("bug")

    with pytest.raises(ValueError, match="bug"):
        with_retries(factory, broken, timeout_s=1.0, first_delay_s=0.01)
    assert calls == 1
    assert job_count(factory) == 0


# Per-attempt image files


def test_each_attempt_writes_its_own_image_file(factory: sessionmaker[Session], settings: Settings) -> None:
    with transaction(factory) as session:
        submission = insert_batch(session, params=[PARAMS], priority=0, max_attempts=3)
    job_id, batch_id = submission.job_ids[0], submission.batch_id
    assert batch_id is not None
    first = claim(factory, job_id)
    age_heartbeat(factory, job_id)
    with transaction(factory) as session:
        assert recover_stale_running(session, stale_after_s=60) == (1, 0)
    second = claim(factory, job_id)
    assert first != second

    outputs = settings.resolved_outputs_dir()
    one = image_path(outputs, Claim(job_id, first, 1, PARAMS, batch_id, 0))
    two = image_path(outputs, Claim(job_id, second, 2, PARAMS, batch_id, 0))
    assert one != two
    assert one.parent == two.parent == outputs / batch_id
    assert one.name.startswith("00000-7-a-red-fox-") and two.name.startswith("00000-7-a-red-fox-")
    assert one.suffix == two.suffix == ".png"
    assert image_path(outputs, Claim(job_id, first, 1, PARAMS, None)).parent == outputs / "single"


def test_with_retries_does_not_wait_on_a_schema_mistake(database_url: str) -> None:
    """An OperationalError that is no outage (a missing table) is raised at once, not retried."""
    factory = make_session_factory(make_database(database_url))
    calls = 0

    def broken(_session: Session) -> None:
        nonlocal calls
        calls += 1
        raise OperationalError("select * from nowhere", None, Exception("no such table: nowhere"))

    with pytest.raises(OperationalError):
        with_retries(factory, broken, timeout_s=30)
    assert calls == 1
