"""Routing by model on real Redis, PostgreSQL and a real Celery worker process (issue 12, item 2).

Each model's jobs go to that model's queue; a worker consumes only the queue of the model it loaded. A job
for a model no worker serves stays queued, is reported (`unserved` on its status, `unserved_models` on its
batch, a warning at submit and in the CLI), and the reconciler leaves its waiting message alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from kombu.transport.redis import Channel
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from cli.stack import Stack
from jobs.presence import announce_worker, mark_ready, mark_stopped
from jobs.queue import PRIORITY_STEPS, Publication, Publisher, model_queue
from jobs.reconcile import reconcile_once
from jobs.serving import serving_counts, serving_workers
from jobs.settings import Settings
from jobs.tables import Job, WorkerPresence, utcnow
from jobs.unserved import unserved_warning
from tests.conftest import REDIS_URL, local_client

SERVED = "synthetic:tiny"  # the settings fixture's worker model
UNSERVED = "synthetic:full"  # allowed, but no worker of it ever starts here
SMALL = {"width": 64, "height": 64, "steps": 2}
HOUR_S = 3600.0
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """The real app in-process, with status answers never reused (each poll reads the database)."""
    app = create_app(settings.model_copy(update={"api_status_cache_s": 0.0}), reconcile=False)
    with local_client(app) as test_client:
        yield test_client


def waiting_messages(settings: Settings, model: str) -> Counter[str]:
    """How many messages wait in the model's queue (all its priority lists) for each job id."""
    queue = model_queue(settings.queue_name, model)
    names = [queue] + [f"{queue}{Channel.sep}{step}" for step in PRIORITY_STEPS[1:]]
    client = redis.Redis.from_url(REDIS_URL)
    return Counter(json.loads(raw)["headers"]["id"] for name in names for raw in client.lrange(name, 0, -1))


def submit(client: TestClient, model: str, prompt: str = "a red fox", priority: int = 0) -> dict[str, Any]:
    """POST /v1/jobs for one small job of `model`; the 201 answer."""
    response = client.post("/v1/jobs", json={"prompt": prompt, "model": model, "priority": priority, **SMALL})
    assert response.status_code == 201, response.text
    return dict(response.json())


def submit_batch(client: TestClient, model: str, count: int) -> dict[str, Any]:
    """POST /v1/batches (JSON) for `count` small jobs of `model`; the 201 answer."""
    body = {"prompts": [f"prompt {n}" for n in range(count)], "model": model, "sizes": ["64x64"], "steps": 2}
    response = client.post("/v1/batches", json=body)
    assert response.status_code == 201, response.text
    return dict(response.json())


def get(client: TestClient, path: str) -> dict[str, Any]:
    """GET a JSON answer that must be a 200."""
    response = client.get(path)
    assert response.status_code == 200, response.text
    return dict(response.json())


def wait_until(ready: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """Poll until `ready()`; fail naming `what` if it never is (served models are read once a second)."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def ready_worker(factory: sessionmaker[Session], model: str) -> str:
    """A presence row of a ready, beating worker serving `model` (no process: the API reads only rows)."""
    with factory() as session:
        worker_id = announce_worker(
            session, node=f"test@{model}", model=model, dtype="bf16", offload_mode="auto"
        )
        mark_ready(session, worker_id=worker_id, device_name="test", vram_budget_bytes=None)
    return worker_id


def job_row(factory: sessionmaker[Session], job_id: str) -> Job:
    """The job's row, read in a fresh session."""
    with factory() as session:
        return session.get_one(Job, job_id)


# (a) Each model's queue, and a worker that consumes only its own


def test_a_worker_never_takes_a_job_of_a_model_it_does_not_serve(
    settings: Settings, client: TestClient, factory: sessionmaker[Session], publisher: Publisher
) -> None:
    """A job for another model waits in its own queue, even at the head of the queue by priority."""
    waiting = submit(client, UNSERVED, "for a model nobody serves", priority=9)["id"]
    served = [submit(client, SERVED, f"served {n}")["id"] for n in range(3)]
    assert waiting_messages(settings, UNSERVED) == Counter({waiting: 1})
    assert waiting_messages(settings, SERVED) == Counter(dict.fromkeys(served, 1))
    assert publisher.queue_length() == 4

    stack = Stack(settings)  # one real worker; it consumes model_queue(QUEUE_NAME, SERVED) only
    try:
        stack.start(api=False)
        wait_until(
            lambda: all(job_row(factory, i).status == "succeeded" for i in served), "the served jobs", 180
        )
    finally:
        stack.stop()

    left = job_row(factory, waiting)
    assert (left.status, left.attempts, left.started_at) == ("queued", 0, None)
    assert waiting_messages(settings, UNSERVED) == Counter({waiting: 1})  # never delivered, still waiting
    assert waiting_messages(settings, SERVED) == Counter()
    assert waiting in publisher.live_job_ids()


# (b) The unserved flag on a job's and a batch's status


def test_the_unserved_flag_follows_the_workers_that_serve_the_model(
    client: TestClient, factory: sessionmaker[Session]
) -> None:
    job_id = submit(client, UNSERVED)["id"]
    batch_id = submit_batch(client, UNSERVED, 3)["id"]
    assert get(client, f"/v1/jobs/{job_id}")["unserved"] is True
    assert get(client, f"/v1/batches/{batch_id}")["unserved_models"] == [UNSERVED]

    served_job = submit(client, SERVED)["id"]
    other = ready_worker(factory, SERVED)  # a worker of another model changes nothing for UNSERVED
    wait_until(lambda: get(client, f"/v1/jobs/{served_job}")["unserved"] is False, "the SERVED worker")
    assert get(client, f"/v1/jobs/{job_id}")["unserved"] is True

    with factory() as session:  # a starting worker (its model still loading) counts as serving
        starting = announce_worker(
            session, node="starting@test", model=UNSERVED, dtype="bf16", offload_mode="auto"
        )
    wait_until(lambda: get(client, f"/v1/jobs/{job_id}")["unserved"] is False, "the starting worker")
    assert get(client, f"/v1/batches/{batch_id}")["unserved_models"] == []

    with factory() as session:
        mark_stopped(session, worker_id=starting)
        mark_stopped(session, worker_id=other)
    wait_until(lambda: get(client, f"/v1/jobs/{job_id}")["unserved"] is True, "the stop to show")
    assert get(client, f"/v1/batches/{batch_id}")["unserved_models"] == [UNSERVED]

    cancelled = client.post(f"/v1/jobs/{job_id}/cancel", json={})
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["unserved"] is False  # only a queued job waits for a worker
    assert get(client, f"/v1/jobs/{job_id}")["status"] == "cancelled"


def test_a_batch_lists_only_the_models_of_its_queued_jobs(
    client: TestClient, factory: sessionmaker[Session]
) -> None:
    batch_id = submit_batch(client, UNSERVED, 2)["id"]
    assert get(client, f"/v1/batches/{batch_id}")["unserved_models"] == [UNSERVED]
    cancelled = client.post(f"/v1/batches/{batch_id}/cancel", json={})
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["unserved_models"] == []


# (c) The warning at submit


def test_submitting_for_a_model_nobody_serves_succeeds_with_a_warning(
    client: TestClient, factory: sessionmaker[Session], tmp_path: Path
) -> None:
    warning = unserved_warning(UNSERVED)
    assert "no running worker serves model 'synthetic:full'" in warning
    assert "WORKER_MODEL=synthetic:full" in warning

    single = submit(client, UNSERVED)
    assert (single["status"], single["warnings"]) == ("queued", [warning])
    assert submit_batch(client, UNSERVED, 2)["warnings"] == [warning]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\na hare\n")
    with prompts.open("rb") as file:
        uploaded = client.post(
            "/v1/batches",
            files={"file": ("prompts.txt", file, "text/plain")},
            data={"model": UNSERVED, "sizes": "64x64", "steps": "2"},
        )
    assert uploaded.status_code == 201, uploaded.text
    assert uploaded.json()["warnings"] == [warning]
    assert job_row(factory, single["id"]).status == "queued"  # stored and waiting, not refused

    ready_worker(factory, UNSERVED)
    wait_until(lambda: get(client, f"/v1/jobs/{single['id']}")["unserved"] is False, "the ready worker")
    assert submit(client, UNSERVED)["warnings"] == []
    assert submit_batch(client, UNSERVED, 1)["warnings"] == []


def test_the_cli_prints_the_warning_and_the_waiting_batch(
    api_only: Stack, settings: Settings, tmp_path: Path
) -> None:
    """`nightrender submit` prints the API's warning; `nightrender status` says which models nobody serves."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\n")
    env = {**api_only.env, "API_URL": settings.resolved_api_url(), "COLUMNS": "200"}

    def cli(*argv: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "cli.main", *argv],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return " ".join(done.stdout.split())  # rich wraps long lines

    submitted = cli("submit", str(prompts), "--model", UNSERVED, "--sizes", "64", "--steps", "2")
    assert "1 jobs queued" in submitted
    assert f"warning: {unserved_warning(UNSERVED)}" in submitted
    batch_id = submitted.split()[1].rstrip(":")
    status = cli("status", batch_id)
    assert f"no running worker serves '{UNSERVED}'" in status
    assert f"WORKER_MODEL={UNSERVED}" in status


# (d) The reconciler and messages waiting for a worker


def test_the_reconciler_never_duplicates_the_messages_of_unserved_jobs(
    settings: Settings, client: TestClient, factory: sessionmaker[Session], publisher: Publisher
) -> None:
    job_ids = submit_batch(client, UNSERVED, 5)["job_ids"]
    expected = Counter(dict.fromkeys(job_ids, 1))
    # The model is later dropped from ALLOWED_MODELS: its queued jobs' queue is still read (from SQL).
    narrowed = Publisher(settings.model_copy(update={"allowed_models": SERVED}))

    for reconciling in (publisher, narrowed, publisher, narrowed):
        report = reconcile_once(factory, reconciling, stale_after_s=HOUR_S, republish_after_s=0)
        assert report.republished == 0
        assert waiting_messages(settings, UNSERVED) == expected

    # Lost from Redis, they are published again to their model's queue, once.
    broker = redis.Redis.from_url(REDIS_URL)
    assert broker.delete(*broker.scan_iter(match=f"{settings.queue_name}.*")) > 0
    assert reconcile_once(factory, narrowed, stale_after_s=HOUR_S, republish_after_s=0).republished == 5
    for _ in range(2):
        assert reconcile_once(factory, narrowed, stale_after_s=HOUR_S, republish_after_s=0).republished == 0
    assert waiting_messages(settings, UNSERVED) == expected


# (e) Every model's queue is read


def test_live_job_ids_and_queue_length_cover_every_models_queue(
    settings: Settings, publisher: Publisher
) -> None:
    folder_model = "/models/my model:v2"  # not allowed here: read when named
    items = [
        Publication(job_id=str(uuid.uuid4()), priority=index % 10, model=model)
        for index, model in enumerate([SERVED, UNSERVED, folder_model] * 3)
    ]
    publisher.publish(items)
    ids = {model: {i.job_id for i in items if i.model == model} for model in (SERVED, UNSERVED, folder_model)}

    for model, job_ids in ids.items():
        assert waiting_messages(settings, model).keys() == job_ids
    assert ids[SERVED] | ids[UNSERVED] <= publisher.live_job_ids()
    assert not ids[folder_model] & publisher.live_job_ids()  # its queue is only read when named
    assert {i.job_id for i in items} <= publisher.live_job_ids([folder_model])
    assert publisher.queue_length() == 6
    assert publisher.queue_length([folder_model]) == 9
    assert redis.Redis.from_url(REDIS_URL).llen(settings.queue_name) == 0  # nothing in the old shared queue


def test_the_workers_list_names_the_queue_each_worker_consumes(
    settings: Settings, client: TestClient, factory: sessionmaker[Session]
) -> None:
    ready_worker(factory, UNSERVED)
    (worker,) = get(client, "/v1/workers")["workers"]
    assert (worker["model"], worker["queue"]) == (UNSERVED, model_queue(settings.queue_name, UNSERVED))


def test_a_starting_worker_serves_only_while_it_beats(factory: sessionmaker[Session]) -> None:
    """One killed while loading its model stops counting after the silence a ready one gets (not 30 min)."""
    now = utcnow()
    with factory() as session:
        beating = announce_worker(
            session, node="loading@test", model=UNSERVED, dtype="bf16", offload_mode="auto"
        )
        killed = announce_worker(
            session, node="killed@test", model=UNSERVED, dtype="bf16", offload_mode="auto"
        )
        session.execute(
            update(WorkerPresence)
            .where(WorkerPresence.id == killed)
            .values(started_at=now - timedelta(minutes=2), beat_at=now - timedelta(minutes=2))
        )
        session.commit()
        assert serving_workers(session, model=UNSERVED, now=now, silent_after_s=30.0) == 1
        mark_stopped(session, worker_id=beating)
        assert serving_counts(session, now=now, silent_after_s=30.0)[UNSERVED] == 0
