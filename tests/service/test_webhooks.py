"""Batch webhooks over a real database (PostgreSQL and SQLite) to a real HTTP receiver on 127.0.0.1.

Passes are driven by calling `webhook_pass` directly, with no backoff or an injected clock; no sleeping.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from jobs.db import make_database, make_session_factory, transaction
from jobs.lifecycle import claim_job, fail_job, finish_job
from jobs.queue import Publisher
from jobs.settings import Settings
from jobs.tables import Batch, Job, WebhookDelivery, utcnow
from jobs.webhooks import WebhookReport, record_finish, webhook_client, webhook_pass
from tests.conftest import BACKENDS, local_client
from tests.service.webhook_receiver import Receiver

pytestmark = pytest.mark.parametrize("empty_database_url", BACKENDS, indirect=True)

SECRET = "test-webhook-secret-0123456789abcdef"
SMALL = {"width": 64, "height": 64, "steps": 2, "model": "synthetic:tiny"}
STATS = {"rung": "none", "device_name": "test", "torch_version": "2.x", "diffusers_version": "0.x"}


@pytest.fixture
def hook_settings(settings: Settings) -> Settings:
    """The test's settings with webhooks on, loopback receivers allowed and no wait between attempts.

    Status answers are not reused: these tests change jobs straight in SQL between two reads.
    """
    return settings.model_copy(
        update={
            "api_status_cache_s": 0.0,
            "webhook_secret": SECRET,
            "webhook_allow_private": True,
            "webhook_backoff_s": 0.0,
            "webhook_max_attempts": 3,
            "webhook_timeout_s": 5.0,
        }
    )


@pytest.fixture
def client(hook_settings: Settings) -> Iterator[TestClient]:
    """The real app in-process, with no background threads: the tests run the passes."""
    with local_client(create_app(hook_settings, reconcile=False)) as test_client:
        yield test_client


@pytest.fixture
def factory(hook_settings: Settings) -> Iterator[sessionmaker[Session]]:
    """A session factory on the test's database, as the API process has."""
    engine = make_database(hook_settings.resolved_database_url())
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A webhook receiver that answers 204 unless a test scripts other codes."""
    with Receiver() as running:
        yield running


def submit(client: TestClient, url: str, prompts: int = 3) -> tuple[str, list[str]]:
    """A batch of `prompts` jobs with a webhook; returns its id and job ids."""
    body = {"prompts": [f"prompt {i}" for i in range(prompts)], "webhook_url": url, **SMALL}
    response = client.post("/v1/batches", json=body)
    assert response.status_code == 201, response.text
    return response.json()["id"], response.json()["job_ids"]


def end_job(factory: sessionmaker[Session], job_id: str, *, ok: bool) -> None:
    """Claim a job and end it as a worker would: succeeded, or failed."""
    with transaction(factory) as session:
        claim = claim_job(session, job_id=job_id)
        assert claim is not None
        if ok:
            path = f"/tmp/{job_id}.png"
            done = finish_job(
                session, job_id=job_id, lease_token=claim.lease_token, result_path=path, stats=STATS
            )
        else:
            done = fail_job(session, job_id=job_id, lease_token=claim.lease_token, error="boom", stats=None)
        assert done


def run_pass(factory: sessionmaker[Session], settings: Settings, **options: Any) -> WebhookReport:
    """One webhook pass, as the API's loop runs it."""
    with webhook_client(settings) as http:
        return webhook_pass(factory, http, settings=settings, **options)


def deliveries(factory: sessionmaker[Session], batch_id: str) -> list[WebhookDelivery]:
    """A batch's delivery rows by sequence, read fresh."""
    with factory() as session:
        query = select(WebhookDelivery).where(WebhookDelivery.batch_id == batch_id)
        return list(session.scalars(query.order_by(WebhookDelivery.sequence)))


def verifies(headers: dict[str, str], body: bytes, secret: str = SECRET) -> bool:
    """The receiver's check, as the README shows it."""
    timestamp = headers["x-nightrender-timestamp"]
    expected = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(headers["x-nightrender-signature"], f"sha256={expected}")


def test_a_finished_batch_gets_one_signed_delivery(
    client: TestClient, factory: sessionmaker[Session], hook_settings: Settings, receiver: Receiver
) -> None:
    batch_id, job_ids = submit(client, receiver.url)
    assert client.get(f"/v1/batches/{batch_id}").json()["webhook"]["status"] == "waiting"
    end_job(factory, job_ids[0], ok=True)
    end_job(factory, job_ids[1], ok=True)
    assert run_pass(factory, hook_settings) == WebhookReport(recorded=0, attempted=0, delivered=0)
    assert receiver.requests == []

    end_job(factory, job_ids[2], ok=False)
    assert run_pass(factory, hook_settings) == WebhookReport(recorded=1, attempted=1, delivered=1)
    assert run_pass(factory, hook_settings) == WebhookReport(recorded=0, attempted=0, delivered=0)

    assert len(receiver.requests) == 1
    request = receiver.requests[0]
    assert request.path == "/hook"
    assert request.headers["content-type"] == "application/json"
    assert verifies(request.headers, request.body)
    assert not verifies(request.headers, request.body, secret="another-secret-0123456789")
    [row] = deliveries(factory, batch_id)
    assert request.headers["x-nightrender-delivery"] == row.id
    payload = json.loads(request.body)
    assert payload["event"] == "batch.finished"
    assert payload["batch_id"] == batch_id
    assert payload["sequence"] == 1
    assert payload["status"] == "failed"
    assert payload["total"] == 3
    assert payload["counts"] == {"queued": 0, "running": 0, "succeeded": 2, "failed": 1, "cancelled": 0}
    assert payload["archive_path"] == f"/v1/batches/{batch_id}/archive"
    assert payload["finished_at"] is not None
    assert (row.status, row.attempts, row.last_status_code, row.sequence) == ("delivered", 1, 204, 1)
    webhook = client.get(f"/v1/batches/{batch_id}").json()["webhook"]
    assert (webhook["status"], webhook["attempts"], webhook["sequence"]) == ("delivered", 1, 1)


def test_a_receiver_failing_twice_gets_three_attempts(
    client: TestClient, factory: sessionmaker[Session], hook_settings: Settings, receiver: Receiver
) -> None:
    receiver.answers = [500, 503]
    batch_id, job_ids = submit(client, receiver.url, prompts=1)
    end_job(factory, job_ids[0], ok=True)

    reports = [run_pass(factory, hook_settings) for _ in range(4)]
    assert [r.attempted for r in reports] == [1, 1, 1, 0]
    assert [r.delivered for r in reports] == [0, 0, 1, 0]
    [row] = deliveries(factory, batch_id)
    assert (row.status, row.attempts, row.last_status_code, row.last_error) == ("delivered", 3, 204, None)
    assert row.delivered_at is not None
    assert [r.status for r in receiver.requests] == [500, 503, 204]
    # Every attempt is the same delivery with the same body, each signed for its own timestamp.
    assert {r.headers["x-nightrender-delivery"] for r in receiver.requests} == {row.id}
    assert {r.body for r in receiver.requests} == {row.payload.encode()}
    assert all(verifies(r.headers, r.body) for r in receiver.requests)


def test_a_receiver_always_failing_ends_failed_after_the_last_attempt(
    client: TestClient, factory: sessionmaker[Session], hook_settings: Settings, receiver: Receiver
) -> None:
    receiver.answers = [500] * 10
    batch_id, job_ids = submit(client, receiver.url, prompts=1)
    end_job(factory, job_ids[0], ok=True)

    for _ in range(5):
        run_pass(factory, hook_settings)
    [row] = deliveries(factory, batch_id)
    assert (row.status, row.attempts, row.last_status_code, row.last_error) == ("failed", 3, 500, "HTTP 500")
    assert len(receiver.requests) == 3
    assert client.get(f"/v1/batches/{batch_id}").json()["webhook"]["status"] == "failed"


def test_a_failed_attempt_waits_for_its_backoff(
    client: TestClient, factory: sessionmaker[Session], hook_settings: Settings, receiver: Receiver
) -> None:
    slow = hook_settings.model_copy(update={"webhook_backoff_s": 60.0})
    receiver.answers = [500]
    batch_id, job_ids = submit(client, receiver.url, prompts=1)
    end_job(factory, job_ids[0], ok=True)
    now = utcnow()

    assert run_pass(factory, slow, clock=lambda: now).attempted == 1
    [row] = deliveries(factory, batch_id)
    # The first retry waits between half and all of WEBHOOK_BACKOFF_S.
    assert timedelta(seconds=30) <= row.next_attempt_at - now <= timedelta(seconds=60)
    assert run_pass(factory, slow, clock=lambda: now + timedelta(seconds=29)).attempted == 0
    assert run_pass(factory, slow, clock=lambda: now + timedelta(seconds=61)).delivered == 1
    assert len(receiver.requests) == 2


def test_a_retried_batch_that_finishes_again_gets_a_second_delivery(
    client: TestClient, factory: sessionmaker[Session], hook_settings: Settings, receiver: Receiver
) -> None:
    batch_id, job_ids = submit(client, receiver.url, prompts=2)
    end_job(factory, job_ids[0], ok=True)
    end_job(factory, job_ids[1], ok=False)
    assert run_pass(factory, hook_settings).delivered == 1

    retried = client.post(f"/v1/batches/{batch_id}/retry", json={})
    assert retried.status_code == 201, retried.text
    [new_job] = retried.json()["job_ids"]
    assert run_pass(factory, hook_settings) == WebhookReport(recorded=0, attempted=0, delivered=0)
    end_job(factory, new_job, ok=True)
    assert run_pass(factory, hook_settings).delivered == 1
    assert run_pass(factory, hook_settings) == WebhookReport(recorded=0, attempted=0, delivered=0)

    first, second = deliveries(factory, batch_id)
    assert (first.sequence, second.sequence) == (1, 2)
    assert [json.loads(r.body)["sequence"] for r in receiver.requests] == [1, 2]
    payload = json.loads(receiver.requests[1].body)
    assert payload["status"] == "succeeded"
    assert payload["counts"]["succeeded"] == 2
    assert payload["counts"]["failed"] == 0
    assert payload["total"] == 2
    assert client.get(f"/v1/batches/{batch_id}").json()["webhook"]["sequence"] == 2


def test_a_finish_overtaken_by_a_retry_is_sent_once_with_the_new_sequence(
    client: TestClient, factory: sessionmaker[Session], hook_settings: Settings, receiver: Receiver
) -> None:
    batch_id, [job_id] = submit(client, receiver.url, prompts=1)
    end_job(factory, job_id, ok=False)
    retried = client.post(f"/v1/batches/{batch_id}/retry", json={})
    [new_job] = retried.json()["job_ids"]
    assert run_pass(factory, hook_settings) == WebhookReport(recorded=0, attempted=0, delivered=0)
    end_job(factory, new_job, ok=True)

    assert run_pass(factory, hook_settings) == WebhookReport(recorded=1, attempted=1, delivered=1)
    assert [row.sequence for row in deliveries(factory, batch_id)] == [2]
    assert [json.loads(r.body)["status"] for r in receiver.requests] == ["succeeded"]


def test_each_finish_is_recorded_once_under_concurrent_passes(
    client: TestClient, factory: sessionmaker[Session], hook_settings: Settings, receiver: Receiver
) -> None:
    batch_id, job_ids = submit(client, receiver.url, prompts=1)
    end_job(factory, job_ids[0], ok=True)
    # The unique (batch, sequence) pair is what stops a second API process: here it is hit directly.
    assert record_finish(factory, batch_id=batch_id, now=utcnow())
    assert not record_finish(factory, batch_id=batch_id, now=utcnow())

    other_id, other_jobs = submit(client, receiver.url, prompts=1)
    end_job(factory, other_jobs[0], ok=True)
    start = threading.Barrier(4)

    def one_process() -> None:
        start.wait()
        run_pass(factory, hook_settings)

    threads = [threading.Thread(target=one_process) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    run_pass(factory, hook_settings)
    assert [row.status for row in deliveries(factory, batch_id)] == ["delivered"]
    assert [row.status for row in deliveries(factory, other_id)] == ["delivered"]
    # Four passes at once, and still one request per finish: each attempt is claimed before it is sent.
    assert sorted(json.loads(r.body)["batch_id"] for r in receiver.requests) == sorted([batch_id, other_id])


def test_a_url_that_turned_private_is_refused_at_send_time(
    client: TestClient, factory: sessionmaker[Session], hook_settings: Settings, receiver: Receiver
) -> None:
    batch_id, job_ids = submit(client, receiver.url, prompts=1)
    end_job(factory, job_ids[0], ok=True)
    strict = hook_settings.model_copy(update={"webhook_allow_private": False})

    assert run_pass(factory, strict).delivered == 0
    assert receiver.requests == []
    [row] = deliveries(factory, batch_id)
    assert row.status == "refused"
    assert row.last_error is not None and "127.0.0.1" in row.last_error
    assert run_pass(factory, hook_settings).attempted == 0  # refused is final


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/hook",
        "http://localhost/hook",
        "http://10.1.2.3/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://0.0.0.0/hook",
        "http://224.0.0.1/hook",
    ],
)
def test_a_private_webhook_url_is_422_and_nothing_is_stored(
    settings: Settings, url: str, factory: sessionmaker[Session], publisher: Publisher
) -> None:
    strict = settings.model_copy(update={"webhook_secret": SECRET})
    with local_client(create_app(strict, reconcile=False)) as strict_client:
        response = strict_client.post("/v1/batches", json={"prompts": ["a"], "webhook_url": url, **SMALL})
    assert_refused(response, "WEBHOOK_ALLOW_PRIVATE")
    assert_nothing_stored(factory, publisher)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://example.com/hook", "http or https"),
        ("http:///hook", "needs a host"),
        ("http://example.com:99999/", "not a valid URL"),
        ("http://exa mple.com/", "spaces or control characters"),
        ("http://example.com/\x00", "spaces or control characters"),
        ("https://example.com/" + "a" * 2000, "at most 2000 characters"),
        ("http://nightrender-test.invalid/hook", "does not resolve"),
    ],
)
def test_a_malformed_or_unresolvable_webhook_url_is_422(
    client: TestClient, url: str, reason: str, factory: sessionmaker[Session], publisher: Publisher
) -> None:
    response = client.post("/v1/batches", json={"prompts": ["a"], "webhook_url": url, **SMALL})
    assert_refused(response, reason)
    assert_nothing_stored(factory, publisher)


def test_without_a_secret_a_webhook_url_is_422(
    settings: Settings, factory: sessionmaker[Session], publisher: Publisher, receiver: Receiver
) -> None:
    open_settings = settings.model_copy(update={"webhook_allow_private": True})
    with local_client(create_app(open_settings, reconcile=False)) as plain:
        response = plain.post("/v1/batches", json={"prompts": ["a"], "webhook_url": receiver.url, **SMALL})
    assert_refused(response, "WEBHOOK_SECRET")
    assert_nothing_stored(factory, publisher)


def test_a_webhook_url_form_field_is_stored(
    client: TestClient, factory: sessionmaker[Session], receiver: Receiver
) -> None:
    response = client.post(
        "/v1/batches",
        files={"file": ("prompts.txt", b"a red fox\na blue owl\n", "text/plain")},
        data={"webhook_url": receiver.url, "steps": "2", "width": "64", "height": "64"},
    )
    assert response.status_code == 201, response.text
    with factory() as session:
        assert session.get_one(Batch, response.json()["id"]).webhook_url == receiver.url


def test_a_batch_without_a_webhook_sends_nothing(
    client: TestClient, factory: sessionmaker[Session], hook_settings: Settings, receiver: Receiver
) -> None:
    response = client.post("/v1/batches", json={"prompts": ["a"], **SMALL})
    batch_id, [job_id] = response.json()["id"], response.json()["job_ids"]
    end_job(factory, job_id, ok=True)
    assert run_pass(factory, hook_settings) == WebhookReport(recorded=0, attempted=0, delivered=0)
    assert deliveries(factory, batch_id) == []
    assert client.get(f"/v1/batches/{batch_id}").json()["webhook"] is None


def assert_refused(response: Any, reason: str) -> None:
    """A 422 at body.webhook_url whose message says `reason`."""
    assert response.status_code == 422, response.text
    entries = [e for e in response.json()["detail"] if e["loc"] == ["body", "webhook_url"]]
    assert entries, response.text
    assert any(reason in entry["msg"] for entry in entries), entries


def assert_nothing_stored(factory: sessionmaker[Session], publisher: Publisher) -> None:
    """No batch, no job and no broker message."""
    with factory() as session:
        assert session.scalar(select(func.count()).select_from(Batch)) == 0
        assert session.scalar(select(func.count()).select_from(Job)) == 0
    assert publisher.queue_length() == 0
