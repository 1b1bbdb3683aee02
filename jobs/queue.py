"""Queue names and publishing: Redis only wakes the worker; SQL is the truth.

Clients publish by task name, so the API never imports the worker's code.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass

import redis
from celery import Celery
from celery.utils.nodenames import anon_nodename
from kombu.common import maybe_declare
from kombu.entity import PERSISTENT_DELIVERY_MODE
from kombu.serialization import dumps
from kombu.transport.redis import Channel
from kombu.utils.json import dumps as json_dumps
from kombu.utils.uuid import uuid
from redis.backoff import NoBackoff
from redis.retry import Retry

from jobs.settings import Settings

RENDER_TASK = "nightrender.render_job"
# Redis has no native priorities; kombu emulates them with one list per step, lowest number first.
PRIORITY_STEPS = list(range(10))
MAX_PRIORITY = PRIORITY_STEPS[-1]
# Messages per Redis pipeline round trip: 10,000 jobs go out in 10 round trips, not 10,000.
PIPELINE_MESSAGES = 1000
YIELD_EVERY = 32  # messages (about a millisecond of work) between handing over the GIL


def model_queue(base: str, model: str) -> str:
    """The Celery queue of one model's jobs: workers consume only the queue of the model they loaded.

    Model names hold characters (':', '/', a folder path's spaces) that are awkward in queue names and
    Redis keys, so they are reduced to [A-Za-z0-9._-]; a short hash of the exact name keeps two names
    that reduce alike apart.
    """
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", model).strip("-")[-60:] or "model"
    digest = hashlib.sha1(model.encode()).hexdigest()[:8]
    return f"{base}.{readable}.{digest}"


def broker_transport_options(settings: Settings) -> dict[str, object]:
    """How kombu's Redis transport keeps the queue; the publisher and the worker must agree on these."""
    return {"visibility_timeout": settings.visibility_timeout_s, "priority_steps": PRIORITY_STEPS}


def publisher_config(settings: Settings) -> dict[str, object]:
    """What publishing needs: the broker, how it keeps messages, the serializer and the default queue.

    The worker's own settings (pool, prefetch, acknowledgement) live with it, in `worker.celery_app`.
    """
    return {
        "broker_url": settings.resolved_redis_url(),
        "broker_transport_options": broker_transport_options(settings),
        "task_default_queue": settings.queue_name,
        "task_serializer": "json",
    }


def make_celery(settings: Settings, name: str = "nightrender") -> Celery:
    """A Celery app that publishes to our broker; the worker adds its settings to one."""
    app = Celery(name)
    app.conf.update(publisher_config(settings))
    return app


def priority_lists(channel: Channel, queue: str) -> list[str]:
    """The Redis lists kombu keeps a queue's messages in, one per priority step, highest first."""
    return [priority_list(channel, queue, step) for step in channel.priority_steps]


def priority_list(channel: Channel, queue: str, step: int) -> str:
    """The Redis list kombu's Redis channel keeps a queue's messages of one priority step in."""
    # kombu's own naming (the list its `_put` pushes to and its consumer pops), so the separator and
    # the steps are the channel's, not a copy of them.
    return str(channel._q_for_pri(queue, step))


def broker_priority(priority: int) -> int:
    """Map a user priority (higher runs sooner) onto kombu's Redis steps (lower runs sooner)."""
    return MAX_PRIORITY - max(0, min(MAX_PRIORITY, priority))


@dataclass(frozen=True)
class Publication:
    """One wake-up message: which job, at what priority, for which model (the queue it goes to)."""

    job_id: str
    priority: int
    model: str


class Publisher:
    """Sends wake-up messages for committed jobs to their model's queue; the Celery task id is the job id."""

    def __init__(self, settings: Settings) -> None:
        self._app = make_celery(settings, name="nightrender-publisher")
        self._base = settings.queue_name
        # Every model a job may name: their queues are the ones `live_job_ids` reads without being told.
        self._models = frozenset([*settings.allowed_model_names(), settings.resolved_worker_model()])
        self._origin = anon_nodename()  # what `send_task` would compute again for every message
        self._pinger = redis.Redis.from_url(
            settings.resolved_redis_url(),
            socket_connect_timeout=2,
            socket_timeout=2,
            retry=Retry(NoBackoff(), 0),
        )
        self._legacy_lists: list[str] = []  # the old single queue's lists, named by the first drain

    def queue_for(self, model: str) -> str:
        """The Celery queue of this model's jobs."""
        return model_queue(self._base, model)

    def publish(self, items: Iterable[Publication]) -> list[str]:
        """Publish over one connection, PIPELINE_MESSAGES per round trip; returns the job ids sent.

        Raises on a broker error; chunks written before it stay written (a duplicate wake-up is
        harmless: the claim refuses it).
        """
        items = list(items)
        # A fresh connection each time: kombu caches which queues it declared per connection, and
        # after Redis loses its data (FLUSHALL, a restart without AOF) a pooled connection would
        # publish to a queue whose binding no longer exists.
        with self._app.connection_for_write() as connection:
            channel = connection.default_channel
            for queue in sorted({self.queue_for(item.model) for item in items}):
                # Once per queue, as send_task would: the app builds the Queue a worker's `-Q` builds.
                maybe_declare(self._app.amqp.queues[queue], channel)
            with channel.client.pipeline(transaction=False) as pipeline:
                for start in range(0, len(items), PIPELINE_MESSAGES):
                    for name, messages in self._messages_by_list(
                        channel, items[start : start + PIPELINE_MESSAGES]
                    ):
                        pipeline.lpush(name, *messages)  # = one LPUSH per message, in order
                    pipeline.execute()
        return [item.job_id for item in items]

    def _messages_by_list(self, channel: Channel, items: list[Publication]) -> list[tuple[str, list[str]]]:
        """Each job's message, grouped by the priority list of its model's queue it is kept in."""
        lists: dict[str, list[str]] = {}
        for index, item in enumerate(items):
            step = broker_priority(item.priority)
            queue = self.queue_for(item.model)
            lists.setdefault(priority_list(channel, queue, step), []).append(
                self._message(channel, item, queue, step)
            )
            if index % YIELD_EVERY == 0:
                time.sleep(0)  # hand the GIL to the API's event loop now and then
        return list(lists.items())

    def _message(self, channel: Channel, item: Publication, queue: str, step: int) -> str:
        """The message `send_task(..., queue=queue)` sends for this job, as kombu's Redis transport stores it.

        Built here because `send_task` costs 0.5 ms a message (10,000 of them took 4 s), and even
        kombu's own publish batch spends half its time on routing and wrappers a fixed queue does not
        need: celery's factory builds the task message, kombu serializes and wraps it, and only the
        envelope fields kombu's `basic_publish` adds are set here. `tests/service/test_bulk_publish.py`
        checks the result against what `send_task` writes.
        """
        task = self._app.amqp.create_task_message(
            item.job_id,
            RENDER_TASK,
            [item.job_id],
            reply_to=self._app.thread_oid,
            origin=self._origin,
            ignore_result=None,  # as send_task leaves it
            argsrepr=repr([item.job_id]),  # saferepr's output for one short string, at a tenth the cost
            kwargsrepr="{}",
        )
        content_type, encoding, body = dumps(task.body, serializer="json")
        properties = {**task.properties, "delivery_mode": PERSISTENT_DELIVERY_MODE}
        message = channel.prepare_message(body, step, content_type, encoding, task.headers, properties)
        message["body"], body_encoding = channel.encode_body(message["body"], channel.body_encoding)
        message["properties"].update(body_encoding=body_encoding, delivery_tag=uuid())
        # send_task's anonymous exchange for a direct queue: kombu routes by the queue's name.
        message["properties"]["delivery_info"].update(exchange="", routing_key=queue)
        return str(json_dumps(message))

    def ping(self) -> None:
        """Raise if the broker cannot be reached."""
        # A pooled client, not a kombu connection: building one per health check cost 30 times more
        # CPU, and /healthz is polled while big batches are being published.
        self._pinger.ping()

    def live_job_ids(self, models: Iterable[str] = ()) -> set[str]:
        """Job ids with a message waiting or delivered and not yet acknowledged, in any model's queue.

        Reads the queues of every allowed model and of `models` (the reconciler adds the models of the
        queued jobs in SQL, so a model no longer allowed is still read while it has jobs waiting).
        """
        with self._app.connection_for_write() as connection:
            channel = connection.default_channel
            live: set[str] = set()
            for name in self._priority_lists(channel, models):
                live.update(_task_id(raw) for raw in channel.client.lrange(name, 0, -1))
            # kombu's hash of delivered, not yet acknowledged messages (shared by every queue).
            for raw in channel.client.hvals(channel.unacked_key):
                live.add(_unacked_task_id(raw))
            live.discard("")
            return live

    def drain_legacy_queue(self) -> list[str]:
        """Take every message out of the single queue of versions before one queue per model; their job ids.

        Nobody consumes QUEUE_NAME itself any more, so what an older version left there (or a kombu
        restore of one of its unacknowledged messages puts back there) is read and deleted, for the
        reconciler to publish to the job's model queue. Once the lists are known (the first call), an
        empty old queue costs one EXISTS on the pooled client; the lists are read and deleted in one
        transaction, so a message pushed meanwhile is either taken now or left for the next call.
        """
        if self._legacy_lists and not self._pinger.exists(*self._legacy_lists):
            return []
        with self._app.connection_for_write() as connection:
            channel = connection.default_channel
            self._legacy_lists = priority_lists(channel, self._base)
            with channel.client.pipeline(transaction=True) as pipeline:
                for name in self._legacy_lists:
                    pipeline.lrange(name, 0, -1)
                pipeline.delete(*self._legacy_lists)
                *contents, _deleted = pipeline.execute()
        drained = {_task_id(raw) for messages in contents for raw in messages}
        drained.discard("")
        return sorted(drained)

    def queue_length(self, models: Iterable[str] = ()) -> int:
        """Messages waiting in the broker across every model's priority lists (for tests and ops)."""
        with self._app.connection_for_write() as connection:
            channel = connection.default_channel
            return int(sum(channel.client.llen(name) for name in self._priority_lists(channel, models)))

    def _priority_lists(self, channel: Channel, models: Iterable[str]) -> list[str]:
        """The Redis lists of the queues of every allowed model and of `models`."""
        queues = sorted({self.queue_for(model) for model in self._models.union(models)})
        return [name for queue in queues for name in priority_lists(channel, queue)]


def _task_id(raw: bytes) -> str:
    """The task id (= job id) of a message as kombu stores it in Redis."""
    try:
        return str(json.loads(raw)["headers"]["id"])
    except (ValueError, KeyError, TypeError):
        return ""


def _unacked_task_id(raw: bytes) -> str:
    # The unacked hash stores [message, exchange, routing_key].
    try:
        return str(json.loads(raw)[0]["headers"]["id"])
    except (ValueError, KeyError, TypeError, IndexError):
        return ""
