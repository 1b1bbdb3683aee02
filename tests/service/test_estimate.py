"""`GET /v1/workers` and `POST /v1/estimate` through the real app on both backends, and after a real worker
starts (SQLite): measured stats first, else the live worker's forecast, else nothing; nothing stored.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session

from jobs import presence
from jobs.db import make_database, make_session_factory, transaction
from jobs.lifecycle import claim_job, finish_job
from jobs.params import GenerationParams
from jobs.queue import Publisher
from jobs.settings import Settings
from jobs.submit import insert_job
from jobs.tables import Batch, Job, WorkerPresence, utcnow
from worker.context import WorkerContext

MODEL = "synthetic:tiny"
GIB = 1024**3
BACKEND = pytest.mark.parametrize("empty_database_url", ["postgres", "sqlite"], indirect=True)
FORECAST = [  # as worker/engine/forecast.py stores it
    {"width": 1024, "height": 1024, "rung": "resident", "predicted_peak_bytes": 5 * GIB, "fits": True,
     "seconds_base": 0.2, "seconds_per_step": 0.1},
    {"width": 2048, "height": 2048, "rung": "sequential", "predicted_peak_bytes": 9 * GIB, "fits": False,
     "seconds_base": 1.0, "seconds_per_step": 0.5},
]  # fmt: skip


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    """A plain engine on the test's database."""
    engine = make_database(settings.resolved_database_url())
    yield engine
    engine.dispose()


def ready_worker(engine: Engine, *, budget: int | None, forecast: Any = None, device: str = "gpu-1") -> str:
    """A worker that has started and said ready, as worker/presence.py records it."""
    with Session(engine) as session:
        worker_id = presence.announce_worker(
            session, node="celery@test", model=MODEL, dtype="bf16", offload_mode="auto"
        )
        presence.mark_ready(
            session, worker_id=worker_id, device_name=device, vram_budget_bytes=budget, forecast=forecast
        )
    return worker_id


def measured_job(engine: Engine, *, size: tuple[int, int], peak: int, denoise_s: float, **stats: Any) -> None:
    """A finished job of `size` at 2 steps with its stats, through the lifecycle the worker uses."""
    factory = make_session_factory(engine)
    params = GenerationParams(prompt="a fox", width=size[0], height=size[1], steps=2, seed=1, model=MODEL)
    with transaction(factory) as session:
        job_id = insert_job(session, params=params, priority=0, max_attempts=3).job_ids[0]
    values = {"peak_reserved_bytes": peak, "rung": "resident", "encode_s": 0.5, "denoise_s": denoise_s,
              "decode_s": 0.25, "save_s": 0.25, "device_name": "gpu-1", "torch_version": "2",
              "diffusers_version": "0", **stats}  # fmt: skip
    with transaction(factory) as session:
        claim = claim_job(session, job_id=job_id)
        assert claim is not None
        assert finish_job(
            session, job_id=job_id, lease_token=claim.lease_token, result_path="/x", stats=values
        )


def estimate(api: TestClient, *sizes: tuple[int, int], steps: int = 4, jobs_per_size: int = 10) -> Any:
    """POST /v1/estimate and return its 200 answer."""
    body = {"model": MODEL, "steps": steps, "jobs_per_size": jobs_per_size}
    response = api.post("/v1/estimate", json={**body, "sizes": [{"width": w, "height": h} for w, h in sizes]})
    assert response.status_code == 200, response.text
    return response.json()


@BACKEND
def test_workers_lists_the_newest_first_and_which_are_live(api_client: TestClient, engine: Engine) -> None:
    stale = ready_worker(engine, budget=8 * GIB)
    with Session(engine) as session:
        session.execute(
            update(WorkerPresence)
            .where(WorkerPresence.id == stale)
            .values(beat_at=utcnow() - timedelta(hours=1))
        )
        session.commit()
        failed = presence.announce_worker(
            session, node="celery@b", model=MODEL, dtype="bf16", offload_mode="auto"
        )
        presence.mark_failed(session, worker_id=failed, error="CUDA out of memory while loading")
    ready_worker(engine, budget=12 * GIB, device="NVIDIA RTX 4070")

    workers = api_client.get("/v1/workers").json()["workers"]
    assert [(w["state"], w["live"]) for w in workers] == [
        ("ready", True),
        ("failed", False),
        ("ready", False),
    ]
    newest = workers[0]
    assert (newest["device_name"], newest["vram_budget_bytes"], newest["model"]) == (
        "NVIDIA RTX 4070",
        12 * GIB,
        MODEL,
    )
    assert newest["ready_at"] is not None and workers[1]["error"] == "CUDA out of memory while loading"


@BACKEND
def test_measured_stats_come_first_scaled_to_the_steps(api_client: TestClient, engine: Engine) -> None:
    measured_job(engine, size=(96, 64), peak=2 * GIB, denoise_s=1.0)  # 0.5 s a step
    measured_job(engine, size=(96, 64), peak=3 * GIB, denoise_s=3.0)  # 1.5 s a step
    measured_job(engine, size=(96, 64), peak=4 * GIB, denoise_s=90.0, recompiles=2)  # compiling: peak only
    measured_job(engine, size=(96, 64), peak=11 * GIB, denoise_s=1.0, device_name="another card")
    ready_worker(engine, budget=12 * GIB, forecast=FORECAST)

    answer = estimate(api_client, (96, 64), steps=4, jobs_per_size=10)
    (size,) = answer["sizes"]
    # 1.0 s of encode, decode and save, and 1.0 s a step on average: 5.0 s at 4 steps.
    assert size == {"width": 96, "height": 64, "images": 10, "fits": True, "peak_bytes": 4 * GIB,
                    "seconds_per_image": 5.0, "source": "measured"}  # fmt: skip
    assert (answer["budget_bytes"], answer["device_name"], answer["images"]) == (12 * GIB, "gpu-1", 10)
    assert answer["seconds_total"] == 50.0
    assert answer["summary"] == "fits in 12 GB, about 5.0 s per image, about 50 seconds for 10 images"

    ready_worker(engine, budget=3 * GIB, forecast=[{**FORECAST[0], "width": 96, "height": 64}])
    (smaller,) = estimate(api_client, (96, 64))["sizes"]  # measured over today's budget: the planner's word
    assert (smaller["source"], smaller["peak_bytes"]) == ("forecast", 5 * GIB)


@BACKEND
def test_forecast_prices_sizes_and_says_what_does_not_fit(api_client: TestClient, engine: Engine) -> None:
    ready_worker(engine, budget=6 * GIB, forecast=FORECAST)
    answer = estimate(api_client, (1024, 1024), (2048, 2048), (1536, 1536), steps=8, jobs_per_size=480)
    square, large, between = answer["sizes"]
    assert (square["source"], square["fits"], square["peak_bytes"]) == ("forecast", True, 5 * GIB)
    assert square["seconds_per_image"] == pytest.approx(0.2 + 8 * 0.1)
    assert (large["fits"], large["peak_bytes"], large["seconds_per_image"]) == (False, 9 * GIB, 5.0)
    # 1536x1536 is 5/12 of the way from 1024x1024 to 2048x2048 in pixels.
    assert between["peak_bytes"] == pytest.approx(5 * GIB + 5 / 12 * 4 * GIB, rel=1e-6)
    assert between["fits"] is False
    assert answer["images"] == 1440 and answer["seconds_total"] == pytest.approx(
        480 * sum(s["seconds_per_image"] for s in answer["sizes"]), abs=0.1
    )
    assert answer["summary"].startswith("does not fit in 6 GB at 2048x2048, 1536x1536: about ")
    assert answer["summary"].endswith("for 1,440 images")


@BACKEND
def test_without_measurements_or_a_usable_forecast_nothing_is_known(
    api_client: TestClient, engine: Engine
) -> None:
    ready_worker(engine, budget=None, forecast=[{"width": "bad"}])  # a forecast that says nothing
    answer = estimate(api_client, (512, 512))
    assert answer["sizes"][0] == {"width": 512, "height": 512, "images": 10, "fits": None, "peak_bytes": None,
                                  "seconds_per_image": None, "source": "none"}  # fmt: skip
    assert (answer["budget_bytes"], answer["seconds_total"]) == (None, None)
    assert answer["summary"] == "no measurements or forecast yet"


BAD_ESTIMATES = [
    ({"steps": 0}, ["body", "steps"], "greater than or equal to 1"),
    ({"steps": 101}, ["body", "steps"], "less than or equal to 100"),
    ({"steps": "8"}, ["body", "steps"], "valid integer"),
    ({"sizes": []}, ["body", "sizes"], "at least 1 item"),
    ({"sizes": [{"width": 64, "height": 64}] * 33}, ["body", "sizes"], "at most 32 items"),
    ({"sizes": [{"width": 72, "height": 64}]}, ["body", "sizes", 0, "width"], "multiple of 16"),
    (
        {"sizes": [{"width": 64, "height": 4096}]},
        ["body", "sizes", 0, "height"],
        "less than or equal to 2048",
    ),
    ({"jobs_per_size": 0}, ["body", "jobs_per_size"], "greater than or equal to 1"),
    ({"jobs_per_size": 100_001}, ["body", "jobs_per_size"], "less than or equal to 100000"),
    ({"model": "nope"}, ["body", "model"], "unknown model"),
    ({"prompts": ["a"]}, ["body", "prompts"], "Extra inputs"),
]


@BACKEND
def test_bad_estimates_are_422s_and_store_nothing(
    api_client: TestClient, engine: Engine, publisher: Publisher
) -> None:
    for change, loc, reason in BAD_ESTIMATES:
        body = {"model": MODEL, "steps": 4, "sizes": [{"width": 64, "height": 64}], "jobs_per_size": 1}
        response = api_client.post("/v1/estimate", json={**body, **change})
        assert response.status_code == 422, (change, response.text)
        assert any(e["loc"] == loc and reason in e["msg"] for e in response.json()["detail"]), response.json()
    with Session(engine) as session:
        tables = (Batch, Job, WorkerPresence)
        assert [session.scalar(select(func.count()).select_from(t)) for t in tables] == [0, 0, 0]
    assert publisher.queue_length() == 0


@pytest.mark.parametrize("empty_database_url", ["sqlite"], indirect=True)
def test_a_started_worker_is_live_and_its_forecast_prices_sizes(
    api_client: TestClient, settings: Settings
) -> None:
    context = WorkerContext.build(settings, node="test@host")
    try:
        context.start()
        (worker,) = api_client.get("/v1/workers").json()["workers"]
        assert (worker["live"], worker["state"], worker["model"]) == (True, "ready", MODEL)
        assert (worker["device_name"], worker["vram_budget_bytes"]) == ("cpu", None)
        answer = estimate(api_client, (1024, 1024), (640, 640), steps=4, jobs_per_size=5)
        assert [(s["source"], s["fits"]) for s in answer["sizes"]] == [("forecast", None)] * 2
        assert all(s["seconds_per_image"] > 0 and s["peak_bytes"] > 0 for s in answer["sizes"])
        assert answer["budget_bytes"] is None and answer["device_name"] == "cpu"
        assert "fit" not in answer["summary"] and answer["summary"].endswith(" for 10 images")
    finally:
        context.close()
    (stopped,) = api_client.get("/v1/workers").json()["workers"]
    assert (stopped["live"], stopped["state"]) == (False, "stopped")
    assert estimate(api_client, (1024, 1024))["summary"] == "no measurements or forecast yet"
