"""A big batch submitted to the real server does not stall it, and every job gets exactly one message.

`POST /v1/batches` used to validate, insert and publish on the event loop, so a /healthz poll sent while a
large batch was accepted was answered only after the batch: none of the polls sent during the POST came
back before it did. Now that work runs in a worker thread and publishes in Redis pipelines. The test
polls /healthz every 20 ms in an open loop while it submits a few thousand prompts to a real uvicorn
process, and asserts that most polls sent during the POST were answered during it (a proportion, not a
time limit); then that Redis holds one message per job and SQL has every job stamped as published.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
import redis
from kombu.transport.redis import Channel
from sqlalchemy import create_engine, func, select

from cli.stack import Stack
from jobs.queue import PRIORITY_STEPS, model_queue
from jobs.settings import Settings
from jobs.tables import Job
from tests.conftest import BACKENDS, REDIS_URL

pytestmark = pytest.mark.e2e
PROMPTS = 4000
POLL_EVERY_S = 0.02


@dataclass
class Poll:
    """One /healthz request: when it left, when it came back (None: failed) and its status."""

    sent: float
    answered: float | None = None
    status: int | None = None


@dataclass
class Polling:
    """The polls sent so far and the tasks still waiting for an answer."""

    polls: list[Poll] = field(default_factory=list)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


@pytest.fixture
def one_api_process(settings: Settings) -> Iterator[Stack]:
    """The API alone as one real uvicorn process (a second process would answer for a stalled one)."""
    running = Stack(settings.model_copy(update={"api_workers": 1}))
    try:
        running.start(worker=False)
        yield running
    finally:
        running.stop()


async def one_poll(client: httpx.AsyncClient, poll: Poll) -> None:
    """GET /healthz and note when and how it answered."""
    try:
        response = await client.get("/healthz")
    except httpx.HTTPError:
        return
    poll.answered, poll.status = time.perf_counter(), response.status_code


async def poll_until(client: httpx.AsyncClient, polling: Polling, done: asyncio.Event) -> None:
    """Start a poll every POLL_EVERY_S, each on its own task, until `done` is set."""
    while not done.is_set():
        poll = Poll(sent=time.perf_counter())
        polling.polls.append(poll)
        task = asyncio.create_task(one_poll(client, poll))
        polling.tasks.add(task)
        task.add_done_callback(polling.tasks.discard)
        await asyncio.sleep(POLL_EVERY_S)


async def submit_while_polling(base: str, body: bytes) -> tuple[httpx.Response, float, float, list[Poll]]:
    """POST the batch with /healthz polled alongside; returns the answer, its start and end, and the polls."""
    limits = httpx.Limits(max_connections=500, max_keepalive_connections=500)
    async with httpx.AsyncClient(base_url=base, timeout=60.0, limits=limits) as client:
        polling, done = Polling(), asyncio.Event()
        poller = asyncio.create_task(poll_until(client, polling, done))
        await asyncio.sleep(5 * POLL_EVERY_S)  # polling runs before the POST leaves
        start = time.perf_counter()
        response = await client.post(
            "/v1/batches", content=body, headers={"content-type": "application/json"}
        )
        end = time.perf_counter()
        done.set()
        await poller
        await asyncio.gather(*list(polling.tasks))
    return response, start, end, polling.polls


def messages_per_job(queue: str) -> Counter[str]:
    """How many messages wait in the queue's priority lists for each task id."""
    client = redis.Redis.from_url(REDIS_URL)
    names = [queue] + [f"{queue}{Channel.sep}{step}" for step in PRIORITY_STEPS[1:]]
    return Counter(json.loads(raw)["headers"]["id"] for name in names for raw in client.lrange(name, 0, -1))


def unpublished_jobs(database_url: str, batch_id: str) -> tuple[int, int]:
    """The batch's jobs in SQL, and how many of them have no publish stamp."""
    engine = create_engine(database_url)
    try:
        with engine.connect() as connection:
            total = connection.scalar(select(func.count()).where(Job.batch_id == batch_id))
            missing = connection.scalar(
                select(func.count()).where(Job.batch_id == batch_id, Job.published_at.is_(None))
            )
    finally:
        engine.dispose()
    return int(total or 0), int(missing or 0)


@pytest.mark.parametrize("empty_database_url", BACKENDS, indirect=True)
def test_healthz_answers_while_a_big_batch_is_submitted(one_api_process: Stack, settings: Settings) -> None:
    prompts = [f"a big batch, prompt {i}: a lighthouse at dusk" for i in range(PROMPTS)]
    body = json.dumps({"prompts": prompts, "sizes": ["64x64"], "steps": 2}).encode()

    response, start, end, polls = asyncio.run(submit_while_polling(settings.resolved_api_url(), body))

    assert response.status_code == 201, response.text[:500]
    during = [poll for poll in polls if start <= poll.sent < end]
    answered = [
        poll for poll in during if poll.status == 200 and poll.answered is not None and poll.answered < end
    ]
    assert during, "no poll was sent while the POST was in flight"
    assert 2 * len(answered) >= len(during), (
        f"{len(answered)} of {len(during)} polls answered during the POST"
    )

    created = response.json()
    assert len(created["job_ids"]) == PROMPTS
    counts = messages_per_job(model_queue(settings.queue_name, settings.resolved_worker_model()))
    assert counts.keys() == set(created["job_ids"])
    assert set(counts.values()) == {1}
    assert unpublished_jobs(settings.resolved_database_url(), created["id"]) == (PROMPTS, 0)
