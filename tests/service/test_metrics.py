"""GET /metrics over a real database (PostgreSQL and SQLite): the figures match the rows behind them."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine, select, update

from api.app import create_app
from jobs.controls import set_paused
from jobs.db import make_database, make_session_factory, transaction
from jobs.lifecycle import claim_job, fail_job, finish_job
from jobs.params import GenerationParams
from jobs.settings import Settings
from jobs.submit import insert_job
from jobs.tables import Job, utcnow
from tests.conftest import BACKENDS, local_client

pytestmark = pytest.mark.parametrize("empty_database_url", BACKENDS, indirect=True)

MODEL = "synthetic:tiny"
OOM = "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    """A plain engine on the test's database, to write the rows the metrics must reflect."""
    engine = make_database(settings.resolved_database_url())
    yield engine
    engine.dispose()


def scrape(client: TestClient) -> Samples:
    """GET /metrics parsed by prometheus-client's own parser: {(sample name, labels): value}."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; KeyError names what is missing."""
    return samples[(name, frozenset(labels.items()))]


def stats(peak: int, denoise_s: float, rung: str = "resident", **extra: Any) -> dict[str, Any]:
    """JobStats columns as a worker records them."""
    return {
        "peak_allocated_bytes": peak // 2,
        "peak_reserved_bytes": peak,
        "rung": rung,
        "load_s": 0.0,
        "encode_s": 0.2,
        "denoise_s": denoise_s,
        "decode_s": 0.3,
        "save_s": 0.05,
        "place_s": 0.0,
        "device_name": "test-device",
        "torch_version": "2.x",
        "diffusers_version": "0.x",
        **extra,
    }


def ran_out(rungs: list[str], last_ok: bool) -> dict[str, Any]:
    """The record and count of attempts that ran out of memory on `rungs` (then one succeeded, or none)."""
    attempts = [{"plan": rung, "rung": rung, "outcome": OOM, "seconds": 0.1} for rung in rungs]
    if last_ok:
        attempts.append({"plan": "stream", "rung": "stream", "outcome": "ok", "seconds": 1.0})
    record = {"rung": "stream" if last_ok else "exhausted", "attempts": attempts}
    return {"plan": record, "oom_attempts": len(rungs)}


def add_jobs(engine: Engine, count: int, width: int = 64, height: int = 64) -> list[str]:
    """Queued jobs inserted by the same code the API uses."""
    params = GenerationParams(prompt="a fox", width=width, height=height, steps=2, seed=1, model=MODEL)
    with transaction(make_session_factory(engine)) as session:
        return [
            insert_job(session, params=params, priority=0, max_attempts=3).job_ids[0] for _ in range(count)
        ]


def claim(engine: Engine, job_id: str) -> str:
    """Claim a job as a worker does; returns its lease token."""
    with transaction(make_session_factory(engine)) as session:
        claimed = claim_job(session, job_id=job_id)
    assert claimed is not None
    return claimed.lease_token


def finish(engine: Engine, job_id: str, values: dict[str, Any]) -> None:
    """Claim and finish a job with its stats."""
    token = claim(engine, job_id)
    with transaction(make_session_factory(engine)) as session:
        assert finish_job(session, job_id=job_id, lease_token=token, result_path="/tmp/x.png", stats=values)


def exhaust(engine: Engine, job_id: str, rungs: list[str]) -> None:
    """Claim a job and fail it as a worker does when every rung ran out of memory."""
    token = claim(engine, job_id)
    values = stats(0, 0.0, rung="exhausted", peak_reserved_bytes=None, **ran_out(rungs, last_ok=False))
    with transaction(make_session_factory(engine)) as session:
        assert fail_job(session, job_id=job_id, lease_token=token, error="resource_exhausted", stats=values)


def set_heartbeat(engine: Engine, job_id: str, seconds_ago: float) -> None:
    """Age a running job's heartbeat."""
    with transaction(make_session_factory(engine)) as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(seconds=seconds_ago))
        )


def test_queue_depth_heartbeats_and_pause(api_client: TestClient, engine: Engine) -> None:
    """Queued and running counts, both heartbeat ages and the pause switch come from the rows."""
    empty = scrape(api_client)
    assert value(empty, "nightrender_queue_jobs", status="queued") == 0
    assert value(empty, "nightrender_metrics_database_up") == 1
    assert ("nightrender_worker_heartbeat_age_seconds", frozenset()) not in empty  # nothing runs

    ids = add_jobs(engine, 5)
    claim(engine, ids[0])
    claim(engine, ids[1])
    set_heartbeat(engine, ids[0], 30)
    set_heartbeat(engine, ids[1], 500)
    with transaction(make_session_factory(engine)) as session:
        set_paused(session, True)

    samples = scrape(api_client)
    assert value(samples, "nightrender_queue_jobs", status="queued") == 3
    assert value(samples, "nightrender_queue_jobs", status="running") == 2
    assert value(samples, "nightrender_queue_paused") == 1
    # Ages are measured from the scrape, a moment after the rows were written.
    assert 30 <= value(samples, "nightrender_worker_heartbeat_age_seconds") < 90
    assert 500 <= value(samples, "nightrender_stalest_heartbeat_age_seconds") < 560


def test_phase_times_peak_vram_and_oom_retries(api_client: TestClient, engine: Engine) -> None:
    """The phase histogram, peak VRAM by size and plan, and OOM retries match the recorded stats."""
    small = add_jobs(engine, 2, 64, 64)
    large = add_jobs(engine, 2, 128, 96)
    finish(engine, small[0], stats(1000, 0.4))
    finish(engine, small[1], stats(3000, 2.0, **ran_out([], last_ok=True)))  # ran out on no rung
    finish(engine, large[0], stats(8000, 7.0, rung="stream", **ran_out(["resident", "te_streamed"], True)))
    exhaust(engine, large[1], ["resident", "stream", "sequential"])

    samples = scrape(api_client)
    bucket = "nightrender_recent_job_phase_seconds_bucket"
    # Three renders finished (the exhausted job has no phase times): denoise 0.4, 2.0 and 7.0 s.
    assert value(samples, "nightrender_recent_job_phase_seconds_gcount", phase="denoise") == 3
    assert value(samples, "nightrender_recent_job_phase_seconds_gsum", phase="denoise") == pytest.approx(9.4)
    assert value(samples, bucket, phase="denoise", le="0.5") == 1
    assert value(samples, bucket, phase="denoise", le="2.5") == 2
    assert value(samples, bucket, phase="denoise", le="10.0") == 3
    assert value(samples, bucket, phase="denoise", le="+Inf") == 3
    assert value(samples, "nightrender_recent_job_phase_seconds_gsum", phase="decode") == pytest.approx(0.9)

    vram = {"size": "64x64", "rung": "resident"}
    assert value(samples, "nightrender_recent_job_peak_reserved_max_bytes", **vram) == 3000
    assert value(samples, "nightrender_recent_job_peak_reserved_mean_bytes", **vram) == 2000
    assert value(samples, "nightrender_recent_jobs", **vram) == 2
    streamed = {"size": "128x96", "rung": "stream"}
    assert value(samples, "nightrender_recent_job_peak_reserved_max_bytes", **streamed) == 8000

    # Recovered: 2 rungs ran out, both retried. Exhausted: 3 ran out, the last had nothing left to try.
    assert value(samples, "nightrender_recent_oom_retries") == 4
    assert value(samples, "nightrender_recent_oom_jobs", outcome="recovered") == 1
    assert value(samples, "nightrender_recent_oom_jobs", outcome="exhausted") == 1


def test_recent_window_holds_only_the_newest_jobs(settings: Settings, engine: Engine) -> None:
    """METRICS_RECENT_JOBS bounds the stats read: older rows drop out of the figures."""
    ids = add_jobs(engine, 3)
    now = utcnow()
    for age_s, job_id, peak in ((300, ids[0], 9000), (200, ids[1], 1000), (100, ids[2], 2000)):
        finish(engine, job_id, stats(peak, 1.0, recorded_at=now - timedelta(seconds=age_s)))
    with local_client(
        create_app(settings.model_copy(update={"metrics_recent_jobs": 2}), reconcile=False)
    ) as client:
        samples = scrape(client)
    vram = {"size": "64x64", "rung": "resident"}
    assert value(samples, "nightrender_recent_jobs", **vram) == 2
    assert value(samples, "nightrender_recent_job_peak_reserved_max_bytes", **vram) == 2000


def test_latency_by_route_template_and_status(api_client: TestClient) -> None:
    """Requests are counted under their route template, never their raw path, with their status."""
    job_path = "/v1/jobs/{job_id}"
    statuses = [api_client.get(f"/v1/jobs/{i:08d}-0000-4000-8000-000000000000").status_code for i in range(3)]
    api_client.get("/livez")
    api_client.get("/no/such/page/x")
    api_client.request("BREW", "/livez")  # an odd method must not become a label of its own
    samples = scrape(api_client)
    name = "nightrender_http_request_duration_seconds_count"
    for status in set(statuses):
        expected = statuses.count(status)
        assert value(samples, name, method="GET", route=job_path, status=str(status)) == expected
    assert value(samples, name, method="GET", route="/livez", status="200") == 1
    assert value(samples, name, method="GET", route="unmatched", status="404") == 1
    assert value(samples, name, method="OTHER", route="/livez", status="405") == 1
    assert not any("00000000-0000" in str(labels) for _name, labels in samples)


def test_pool_use_is_reported(settings: Settings) -> None:
    """The pool's size and the connections checked out now, read from the app's own engine."""
    app = create_app(settings, reconcile=False)
    with local_client(app) as client:
        idle = scrape(client)
        with app.state.session_factory() as held:
            held.execute(select(1))  # a connection is checked out until this block ends
            busy = scrape(client)
    assert value(idle, "nightrender_db_pool_size") == settings.api_threads + 2
    assert value(idle, "nightrender_db_pool_checked_out") == 0
    assert value(busy, "nightrender_db_pool_checked_out") == 1


def unreadable_database_url(settings: Settings) -> str:
    """A database with no tables (SQLite) or none at all (a PostgreSQL name that does not exist)."""
    url = settings.resolved_database_url()
    if url.startswith("sqlite"):
        return f"sqlite:///{settings.data_dir.resolve() / 'unmigrated.db'}"
    return url.rsplit("/", 1)[0] + "/nr_test_no_such_database"


def test_an_unreadable_database_is_reported_not_raised(settings: Settings) -> None:
    """A scrape with the database unreadable answers 200: database_up 0, the process metrics still there."""
    broken = settings.model_copy(update={"database_url": unreadable_database_url(settings)})
    with local_client(create_app(broken, reconcile=False)) as client:
        samples = scrape(client)
    assert value(samples, "nightrender_metrics_database_up") == 0
    assert value(samples, "nightrender_db_pool_checked_out") == 0
    assert not any(name.startswith("nightrender_queue_") for name, _labels in samples)


def test_metrics_can_be_turned_off(settings: Settings) -> None:
    """METRICS_ENABLED=false: /metrics is a 404 and requests still get their id."""
    with local_client(
        create_app(settings.model_copy(update={"metrics_enabled": False}), reconcile=False)
    ) as client:
        response = client.get("/metrics")
        assert response.status_code == 404
        assert response.headers["X-Request-ID"]
        assert client.get("/livez").status_code == 200
        assert "/metrics" not in client.get("/openapi.json").json()["paths"]
