"""The worker's process context on a real database with the tiny model: built once, started, closed warmly;
and the worker's Celery settings, which extend the publisher's.
"""

from __future__ import annotations

import os
import re
import time

import pytest
import redis

from jobs.db import transaction
from jobs.params import GenerationParams
from jobs.queue import model_queue, publisher_config
from jobs.results import result_file
from jobs.settings import Settings
from jobs.stack_identity import StackConflict, claim_broker
from jobs.submit import insert_job
from jobs.tables import Job, JobStats, WorkerPresence
from worker.celery_app import worker_config
from worker.context import WorkerContext
from worker.engine import EngineError
from worker.holder import EngineHolder

pytestmark = pytest.mark.parametrize("empty_database_url", ["sqlite"], indirect=True)


def queued_job(context: WorkerContext) -> str:
    """One small queued job on the tiny model."""
    params = GenerationParams(
        prompt="a lighthouse", width=64, height=64, steps=2, seed=5, model="synthetic:tiny"
    )
    with transaction(context.factory) as session:
        return insert_job(session, params=params, priority=0, max_attempts=3).job_ids[0]


def test_a_started_context_renders_and_closing_it_stores_the_image(settings: Settings) -> None:
    context = WorkerContext.build(settings, node="test@host")
    try:
        context.start()
        assert context.holder.loads == 1  # loaded at start, before any job
        ready = presence_of(context)
        assert ready.state == "ready" and ready.forecast is not None
        square = next(f for f in ready.forecast if (f["width"], f["height"]) == (1024, 1024))
        assert square["seconds_per_step"] > 0 and square["predicted_peak_bytes"] > 0
        job_id = queued_job(context)
        assert context.runner.run(job_id) == "rendered"
    finally:
        context.close()  # what worker_shutdown calls: the writer stores what is rendered first

    with context.factory() as session:
        job = session.get_one(Job, job_id)
    assert job.status == "succeeded"
    assert result_file(settings.resolved_outputs_dir(), job.result_path) is not None  # stored, on disk
    assert context.holder.loads == 1
    stopped = presence_of(context)
    assert (stopped.state, stopped.model, stopped.node) == ("stopped", "synthetic:tiny", "test@host")
    assert stopped.pid == os.getpid()
    assert stopped.device_name == "cpu" and stopped.vram_budget_bytes is None  # the budget caps CUDA only


def test_each_job_records_the_worker_and_the_gpu_it_is_pinned_to(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WORKER_GPU (set by `worker --gpu`, `up --gpus` and compose) reaches the presence row and job_stats."""
    monkeypatch.setenv("WORKER_GPU", "1")
    context = WorkerContext.build(settings, node="worker-gpu1@host")
    try:
        context.start()
        job_id = queued_job(context)
        assert context.runner.run(job_id) == "rendered"
    finally:
        context.close()
    presence = presence_of(context)
    assert (presence.node, presence.gpu_index, presence.device_uuid) == ("worker-gpu1@host", 1, None)
    with context.factory() as session:
        stats = session.get_one(JobStats, job_id)
    # On the CPU there is no device UUID; on CUDA it is the card's (tests/engine/test_gpu.py).
    assert (stats.worker, stats.gpu_index, stats.device_uuid, stats.device_name) == (
        "worker-gpu1@host",
        1,
        None,
        "cpu",
    )


def test_a_worker_not_pinned_records_no_gpu(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORKER_GPU", raising=False)
    context = WorkerContext.build(settings, node="celery@host")
    try:
        context.start()
        job_id = queued_job(context)
        assert context.runner.run(job_id) == "rendered"
    finally:
        context.close()
    with context.factory() as session:
        stats = session.get_one(JobStats, job_id)
    assert (stats.worker, stats.gpu_index, presence_of(context).gpu_index) == ("celery@host", None, None)


def presence_of(context: WorkerContext) -> WorkerPresence:
    """The worker's row in `workers`."""
    with context.factory() as session:
        return session.get_one(WorkerPresence, context.presence.worker_id)


def test_a_worker_of_another_stack_is_refused_before_its_model_loads(settings: Settings) -> None:
    client = redis.Redis.from_url(settings.resolved_redis_url())
    claim_broker(
        client, queue_name=settings.queue_name, stack="another-stack", database_url="sqlite:///other.db"
    )
    context = WorkerContext.build(settings, node="test@host")
    try:
        with pytest.raises(
            StackConflict, match=re.escape("another nightrender stack (database sqlite:///other.db)")
        ):
            context.start()
        assert context.holder.loads == 0
    finally:
        context.database.dispose()


def test_an_unknown_offload_mode_is_refused_before_any_model_loads(settings: Settings) -> None:
    with pytest.raises(EngineError, match="OFFLOAD_MODE must be one of"):
        EngineHolder(settings.model_copy(update={"offload_mode": "streamed"}))


def test_the_worker_reads_the_queue_as_the_publisher_writes_it(settings: Settings) -> None:
    published, worker = publisher_config(settings), worker_config(settings)
    # Same broker and serializer; the same priority lists and visibility timeout, extended. The worker's
    # default queue is its model's, the one the publisher sends that model's jobs to.
    shared = {key for key in published if key not in ("broker_transport_options", "task_default_queue")}
    assert {key: worker[key] for key in shared} == {key: published[key] for key in shared}
    assert worker["task_default_queue"] == model_queue(settings.queue_name, settings.resolved_worker_model())
    transport = worker["broker_transport_options"]
    assert isinstance(transport, dict)
    assert transport.items() >= published["broker_transport_options"].items()  # type: ignore[attr-defined]
    # One job at a time, acknowledged only once it is done; none of it is the publisher's business.
    assert (worker["worker_pool"], worker["worker_concurrency"], worker["worker_prefetch_multiplier"]) == (
        "solo",
        1,
        1,
    )
    assert worker["task_acks_late"] is True and worker["task_reject_on_worker_lost"] is True
    assert not {key for key in published if key.startswith(("worker_", "task_acks", "task_reject"))}


def test_a_starting_worker_beats_before_its_model_is_loaded(settings: Settings) -> None:
    """The beat begins at announce, so a worker killed while loading stops counting as serving."""
    context = WorkerContext.build(settings.model_copy(update={"heartbeat_interval_s": 0.1}), node="test@host")
    try:
        context.presence.announce()  # what start() does first; the model is not loaded yet
        announced = presence_of(context)
        deadline = time.monotonic() + 30
        while presence_of(context).beat_at <= announced.beat_at and time.monotonic() < deadline:
            time.sleep(0.05)
        beaten = presence_of(context)
        assert (beaten.state, context.holder.loads) == ("starting", 0)
        assert beaten.beat_at > announced.beat_at
    finally:
        context.close()
    assert presence_of(context).state == "stopped"
