"""Upgrading to one queue per model, on real Redis, PostgreSQL and a real Celery worker process.

Messages an older version left in its single queue (QUEUE_NAME itself) are rerouted by the reconciler to
their model's queue at once, and a worker started by hand with plain `celery -A worker.celery_app worker`
consumes its model's queue, not the old one that gets no messages any more.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Iterator

import pytest
import redis
from fastapi.testclient import TestClient
from kombu.transport.redis import Channel
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from cli.process_commands import worker_command
from cli.stack import Stack
from jobs.queue import (
    PRIORITY_STEPS,
    RENDER_TASK,
    Publication,
    Publisher,
    broker_priority,
    make_celery,
    model_queue,
)
from jobs.reconcile import reconcile_once
from jobs.settings import Settings
from jobs.tables import Job
from tests.conftest import REDIS_URL, local_client
from tests.service.test_routing import wait_until
from worker.celery_app import worker_config

SERVED = "synthetic:tiny"  # the settings fixture's worker model
UNSERVED = "synthetic:full"
SMALL = {"width": 64, "height": 64, "steps": 2}
HOUR_S = 3600.0


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """The real app in-process, without its reconciler thread (the tests run the passes)."""
    with local_client(create_app(settings, reconcile=False)) as test_client:
        yield test_client


def lists_of(queue: str) -> list[str]:
    """The Redis lists kombu keeps a queue's messages in, one per priority step."""
    return [queue if step == 0 else f"{queue}{Channel.sep}{step}" for step in PRIORITY_STEPS]


def waiting(queue: str) -> Counter[str]:
    """How many messages wait in a queue for each job id."""
    client = redis.Redis.from_url(REDIS_URL)
    return Counter(
        json.loads(raw)["headers"]["id"] for name in lists_of(queue) for raw in client.lrange(name, 0, -1)
    )


def submit(client: TestClient, model: str, priority: int) -> str:
    """POST /v1/jobs for one small job; its id."""
    response = client.post(
        "/v1/jobs", json={"prompt": "a fox", "model": model, "priority": priority, **SMALL}
    )
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def send_as_before(settings: Settings, job_id: str, priority: int) -> None:
    """The wake-up message a version before one queue per model sent: to QUEUE_NAME itself."""
    app = make_celery(settings, name="nightrender-publisher")
    app.send_task(
        RENDER_TASK,
        args=[job_id],
        task_id=job_id,
        queue=settings.queue_name,
        priority=broker_priority(priority),
    )


def status_of(factory: sessionmaker[Session], job_id: str) -> str:
    """The job's status, read in a fresh session."""
    with factory() as session:
        return str(session.get_one(Job, job_id).status)


def test_the_reconciler_reroutes_what_an_older_version_left_in_the_single_queue(
    settings: Settings, client: TestClient, factory: sessionmaker[Session], publisher: Publisher
) -> None:
    """The old lists are deleted and their queued jobs published to their model's queue in the same pass,
    long before REPUBLISH_AFTER_S, each exactly once; a job that has its message already gets no second."""
    served = {submit(client, SERVED, priority): priority for priority in (0, 3, 9)}
    unserved = {submit(client, UNSERVED, priority): priority for priority in (0, 5)}
    cancelled = submit(client, SERVED, 0)
    assert client.post(f"/v1/jobs/{cancelled}/cancel", json={}).status_code == 200
    broker = redis.Redis.from_url(REDIS_URL)
    broker.delete(
        *lists_of(model_queue(settings.queue_name, SERVED)),
        *lists_of(model_queue(settings.queue_name, UNSERVED)),
    )
    # As the older version left them: every message in the one queue, at its priority.
    for job_id, priority in [*served.items(), *unserved.items(), (cancelled, 0)]:
        send_as_before(settings, job_id, priority)
    # One job was already republished to its model's queue (its message also left in the old queue).
    doubled = next(iter(served))
    publisher.publish([Publication(job_id=doubled, priority=served[doubled], model=SERVED)])
    assert sum(waiting(settings.queue_name).values()) == 6

    report = reconcile_once(factory, publisher, stale_after_s=HOUR_S, republish_after_s=HOUR_S)

    assert (report.republished, report.rerouted) == (4, 4)
    assert broker.exists(*lists_of(settings.queue_name)) == 0
    assert waiting(model_queue(settings.queue_name, SERVED)) == Counter(dict.fromkeys(served, 1))
    assert waiting(model_queue(settings.queue_name, UNSERVED)) == Counter(dict.fromkeys(unserved, 1))
    assert set(served) | set(unserved) <= Publisher(settings).live_job_ids()  # a fresh reader, no worker
    assert status_of(factory, cancelled) == "cancelled"

    # A kombu restore of an old unacknowledged message puts it back in the old queue: drained again,
    # and the job, which has its message, gets no second one; nothing is republished pass after pass.
    send_as_before(settings, doubled, served[doubled])
    for _ in range(2):
        report = reconcile_once(factory, publisher, stale_after_s=HOUR_S, republish_after_s=HOUR_S)
        assert (report.republished, report.rerouted) == (0, 0)
    assert broker.exists(*lists_of(settings.queue_name)) == 0
    assert waiting(model_queue(settings.queue_name, SERVED)) == Counter(dict.fromkeys(served, 1))


def test_a_pass_with_the_broker_down_publishes_nothing_and_raises_nothing(
    settings: Settings, client: TestClient, factory: sessionmaker[Session]
) -> None:
    """As before the old queue was read: `POST /v1/queue/resume` with Redis down still answers."""
    job_id = submit(client, SERVED, 0)
    with factory() as session, session.begin():
        session.get_one(Job, job_id).published_at = None
    down = Publisher(settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"}))
    assert reconcile_once(factory, down, stale_after_s=HOUR_S).republished == 0
    assert reconcile_once(factory, Publisher(settings), stale_after_s=HOUR_S).republished == 1


def test_the_worker_apps_default_queue_is_its_models_queue(settings: Settings) -> None:
    """A worker started without --queues consumes its model's queue, the one worker_command names too."""
    other = settings.model_copy(update={"worker_model": UNSERVED})
    for configured in (settings, other):
        queue = model_queue(configured.queue_name, configured.resolved_worker_model())
        assert worker_config(configured)["task_default_queue"] == queue
        command = worker_command(configured)
        assert command[command.index("--queues") + 1] == queue


def test_a_worker_started_with_plain_celery_renders_its_models_jobs(
    settings: Settings, client: TestClient, factory: sessionmaker[Session]
) -> None:
    """`celery -A worker.celery_app worker -P solo -c 1`, as the module's docstring says, with no --queues."""
    stack = Stack(settings)
    try:
        stack.start(api=False, worker=False)  # the migrations and the broker's stack identity
        plain = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-P", "solo", "-c", "1"]
        stack.spawn("worker", [*plain, "--without-gossip", "--without-mingle"])
        stack.wait_worker_ready("worker", timeout=300)
        job_id = submit(client, SERVED, 0)
        wait_until(lambda: status_of(factory, job_id) == "succeeded", "the job to be rendered", 120)
    finally:
        stack.stop()
    assert sum(waiting(settings.queue_name).values()) == 0
