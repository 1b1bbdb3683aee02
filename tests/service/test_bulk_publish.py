"""The bulk publisher on real Redis: one message per job, built as `send_task` builds it, in kombu's
priority lists, and read back by a Celery task consumer highest priority first; a broker outage during a
batch submission leaves every job unpublished for the reconciler.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import redis
from kombu import Message
from kombu.exceptions import OperationalError
from kombu.transport.redis import Channel
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from jobs.queue import (
    PIPELINE_MESSAGES,
    PRIORITY_STEPS,
    RENDER_TASK,
    Publication,
    Publisher,
    make_celery,
    model_queue,
)
from jobs.reconcile import reconcile_once
from jobs.settings import Settings
from jobs.tables import Job
from tests.conftest import BACKENDS, REDIS_URL, local_client

JOBS = 2 * PIPELINE_MESSAGES + 500  # several pipeline round trips, the last one partial
CLOSED_BROKER = "redis://127.0.0.1:1/0"
HOUR_S = 3600.0
MODEL = "synthetic:tiny"  # the settings fixture's worker model


def publications(count: int) -> list[Publication]:
    """Jobs of MODEL with fresh ids and every priority in turn."""
    return [Publication(job_id=str(uuid.uuid4()), priority=index % 10, model=MODEL) for index in range(count)]


def queue_of(settings: Settings, model: str = MODEL) -> str:
    """The model's Celery queue for the test's queue name."""
    return model_queue(settings.queue_name, model)


def list_name(queue: str, step: int) -> str:
    """The Redis list kombu keeps for one priority step of a queue."""
    return queue if step == 0 else f"{queue}{Channel.sep}{step}"


def raw_messages(queue: str) -> dict[str, tuple[int, dict[str, Any]]]:
    """Every waiting message by task id, with the priority step of the list it is in."""
    client = redis.Redis.from_url(REDIS_URL)
    found: dict[str, tuple[int, dict[str, Any]]] = {}
    for step in PRIORITY_STEPS:
        for raw in client.lrange(list_name(queue, step), 0, -1):
            message = json.loads(raw)
            assert message["headers"]["id"] not in found, "a job has two messages"
            found[message["headers"]["id"]] = (step, message)
    return found


def consume_all(settings: Settings, expected: int) -> list[Message]:
    """Read and acknowledge messages with Celery's task consumer, as a worker would, until `expected`."""
    app = make_celery(settings, name="test-consumer")
    received: list[Message] = []

    def on_message(message: Message) -> None:
        received.append(message)
        message.ack()

    with app.connection_for_read() as connection:
        queue = app.amqp.queues[queue_of(settings)]
        with app.amqp.TaskConsumer(connection, queues=[queue], on_message=on_message):
            while len(received) < expected:
                connection.drain_events(timeout=10)
    return received


def test_every_job_gets_one_message_in_its_priority_list(settings: Settings, publisher: Publisher) -> None:
    items = publications(JOBS)
    assert publisher.publish(items) == [item.job_id for item in items]

    assert publisher.queue_length() == JOBS
    # The unacknowledged-messages hash is shared by every queue on this Redis: other ids may be live.
    assert {item.job_id for item in items} <= publisher.live_job_ids()
    messages = raw_messages(queue_of(settings))
    assert messages.keys() == {item.job_id for item in items}
    for item in items:
        step, message = messages[item.job_id]
        assert step == 9 - item.priority  # user priority 9 goes to kombu's first list
        assert message["properties"]["priority"] == step
        assert message["headers"]["task"] == RENDER_TASK
        assert message["headers"]["root_id"] == item.job_id
        assert message["properties"]["correlation_id"] == item.job_id
        assert message["properties"]["delivery_info"]["routing_key"] == queue_of(settings)


def test_a_message_is_the_one_send_task_sends(settings: Settings, publisher: Publisher) -> None:
    job_id = str(uuid.uuid4())
    queue = queue_of(settings)
    publisher.publish([Publication(job_id=job_id, priority=3, model=MODEL)])
    (bulk,) = [message for _, message in raw_messages(queue).values()]
    redis.Redis.from_url(REDIS_URL).delete(*[list_name(queue, s) for s in PRIORITY_STEPS])

    app = make_celery(settings, name="nightrender-publisher")
    app.send_task(RENDER_TASK, args=[job_id], task_id=job_id, queue=queue, priority=6)
    (single,) = [message for _, message in raw_messages(queue).values()]

    # Only the per-message delivery tag and the sending app's reply-to id may differ.
    for message in (bulk, single):
        del message["properties"]["delivery_tag"], message["properties"]["reply_to"]
    assert bulk == single


def test_a_celery_task_consumer_reads_every_message_highest_priority_first(
    settings: Settings, publisher: Publisher
) -> None:
    items = publications(JOBS)
    publisher.publish(items)

    received = consume_all(settings, JOBS)

    assert [message.headers["task"] for message in received] == [RENDER_TASK] * JOBS
    assert sorted(message.headers["id"] for message in received) == sorted(item.job_id for item in items)
    for message in received:
        args, kwargs, _embed = message.decode()
        assert (args, kwargs) == ([message.headers["id"]], {})
    priority = {item.job_id: item.priority for item in items}
    order = [priority[message.headers["id"]] for message in received]
    assert order == sorted(order, reverse=True)
    assert publisher.queue_length() == 0
    assert not {item.job_id for item in items} & publisher.live_job_ids()


def test_a_dead_broker_raises_instead_of_claiming_the_jobs_were_sent(settings: Settings) -> None:
    dead = Publisher(settings.model_copy(update={"redis_url": CLOSED_BROKER}))
    with pytest.raises(OperationalError):
        dead.publish(publications(10))


@pytest.mark.parametrize("empty_database_url", BACKENDS, indirect=True)
def test_a_batch_submitted_while_the_broker_is_down_waits_for_the_reconciler(
    settings: Settings, publisher: Publisher, factory: sessionmaker[Session]
) -> None:
    broken = settings.model_copy(update={"redis_url": CLOSED_BROKER})
    with local_client(create_app(broken, reconcile=False)) as client:
        response = client.post(
            "/v1/batches", json={"prompts": [f"p{i}" for i in range(30)], "sizes": ["64x64"]}
        )
    assert response.status_code == 201, response.text
    job_ids = response.json()["job_ids"]
    with factory() as session:
        assert published_stamps(session, job_ids) == [None] * 30
    assert publisher.queue_length() == 0

    report = reconcile_once(factory, publisher, stale_after_s=HOUR_S, republish_after_s=HOUR_S)

    assert report.republished == 30
    assert set(job_ids) <= publisher.live_job_ids()
    assert publisher.queue_length() == 30
    with factory() as session:
        assert None not in published_stamps(session, job_ids)


@pytest.mark.parametrize("empty_database_url", BACKENDS, indirect=True)
def test_a_submitted_batch_is_stamped_published_and_not_published_again(
    settings: Settings, publisher: Publisher, factory: sessionmaker[Session]
) -> None:
    with local_client(create_app(settings, reconcile=False)) as client:
        response = client.post(
            "/v1/batches", json={"prompts": [f"p{i}" for i in range(30)], "sizes": ["64x64"]}
        )
    assert response.status_code == 201, response.text
    job_ids = response.json()["job_ids"]
    with factory() as session:
        assert None not in published_stamps(session, job_ids)
    assert set(job_ids) <= publisher.live_job_ids()

    report = reconcile_once(factory, publisher, stale_after_s=HOUR_S, republish_after_s=HOUR_S)

    assert report.republished == 0
    assert publisher.queue_length() == 30


def published_stamps(session: Session, job_ids: list[str]) -> list[Any]:
    """The jobs' `published_at`, in the order given."""
    stamps = dict(session.execute(select(Job.id, Job.published_at).where(Job.id.in_(job_ids))).tuples().all())
    return [stamps[job_id] for job_id in job_ids]
