"""Keys, ownership and the limits a client cannot talk past, through the real app on both backends.

Before this, anyone could read, cancel or retry any job, any web page could submit batches or pause
the queue (text/plain and bodiless POSTs need no CORS preflight), a chunked body was read whole, and
an Idempotency-Key reused with another body answered 201 with the first request's id.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from api.app import create_app
from jobs.db import make_database, make_session_factory, transaction
from jobs.keys import add_key, revoke_key
from jobs.queue import Publisher
from jobs.settings import Settings
from jobs.tables import Batch, Job
from tests.conftest import BACKENDS, local_client

pytestmark = pytest.mark.parametrize("empty_database_url", BACKENDS, indirect=True)

SMALL = {"width": 64, "height": 64, "steps": 2, "model": "synthetic:tiny"}
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    """A plain engine on the test's database."""
    engine = make_database(settings.resolved_database_url())
    yield engine
    engine.dispose()


def new_key(engine: Engine, name: str, *, admin: bool = False) -> str:
    """Issue a key straight in SQL, as `nightrender keys add` does."""
    with transaction(make_session_factory(engine)) as session:
        return add_key(session, name=name, admin=admin)


def bearer(key: str) -> dict[str, str]:
    """The header that presents a key."""
    return {"Authorization": f"Bearer {key}"}


def stored(engine: Engine) -> tuple[int, int]:
    """How many batches and jobs exist."""
    with Session(engine) as session:
        batches = session.scalar(select(func.count()).select_from(Batch)) or 0
        jobs = session.scalar(select(func.count()).select_from(Job)) or 0
    return int(batches), int(jobs)


def client_for(settings: Settings, **changes: Any) -> TestClient:
    """The real app with some settings changed, called from loopback."""
    return local_client(create_app(settings.model_copy(update=changes), reconcile=False))  # type: ignore[no-any-return]


def test_without_keys_only_loopback_is_served(settings: Settings) -> None:
    app = create_app(settings, reconcile=False)
    with TestClient(app, base_url="http://127.0.0.1", client=("203.0.113.7", 4000)) as remote:
        refused = remote.get("/v1/queue")
        assert refused.status_code == 403
        assert "keys add" in refused.json()["detail"]
    # DNS rebinding: a foreign page whose name resolves to 127.0.0.1 still sends its own Host.
    with TestClient(app, base_url="http://attacker.example:8000", client=("127.0.0.1", 4000)) as rebound:
        assert rebound.get("/v1/queue").status_code == 403
    with local_client(app) as local:
        assert local.get("/v1/queue").status_code == 200
        assert local.get("/healthz").status_code == 200


def test_a_key_sees_only_its_own_batches_and_jobs(settings: Settings, engine: Engine) -> None:
    alice, bob = new_key(engine, "alice"), new_key(engine, "bob")
    with client_for(settings) as api:
        assert api.get("/v1/queue").status_code == 401  # keys exist: the keyless local user is out
        assert api.get("/v1/queue", headers=bearer("nr_wrong")).status_code == 401
        created = api.post("/v1/batches", json={"prompts": ["a", "b"], **SMALL}, headers=bearer(alice))
        assert created.status_code == 201, created.text
        batch_id, job_id = created.json()["id"], created.json()["job_ids"][0]
        single = api.post("/v1/jobs", json={"prompt": "c", **SMALL}, headers=bearer(alice)).json()["id"]
        reads = [f"/v1/batches/{batch_id}", f"/v1/batches/{batch_id}/jobs", f"/v1/batches/{batch_id}/archive"]
        reads += [f"/v1/jobs/{job_id}", f"/v1/jobs/{single}", f"/v1/jobs/{single}/image"]
        actions = [
            f"/v1/batches/{batch_id}/cancel",
            f"/v1/batches/{batch_id}/retry",
            f"/v1/jobs/{single}/cancel",
        ]
        for path in reads:
            assert api.get(path, headers=bearer(bob)).status_code == 404, path
        for path in actions:
            assert api.post(path, json={}, headers=bearer(bob)).status_code == 404, path
        assert api.get(f"/v1/batches/{batch_id}", headers=bearer(alice)).json()["counts"]["queued"] == 2
        assert api.post(f"/v1/jobs/{single}/cancel", json={}, headers=bearer(alice)).status_code == 200


def test_queue_controls_need_an_admin_key(settings: Settings, engine: Engine) -> None:
    user, admin = new_key(engine, "user"), new_key(engine, "root", admin=True)
    with client_for(settings) as api:
        refused = api.post("/v1/queue/pause", json={}, headers=bearer(user))
        assert refused.status_code == 403
        assert "admin" in refused.json()["detail"]
        assert api.post("/v1/queue/pause", json={}, headers=bearer(admin)).json() == {"paused": True}
        assert api.get("/v1/queue", headers=bearer(user)).json()["paused"] is True


def test_a_revoked_key_stops_working(settings: Settings, engine: Engine) -> None:
    key = new_key(engine, "temp")
    new_key(engine, "stays")  # with no key left, the keyless loopback user would be served again
    with client_for(settings, api_key_cache_s=0.001) as api:
        assert api.get("/v1/queue", headers=bearer(key)).status_code == 200
        with transaction(make_session_factory(engine)) as session:
            revoke_key(session, name="temp")
        assert api.get("/v1/queue", headers=bearer(key)).status_code == 401


def test_foreign_origins_and_other_body_types_change_nothing(
    settings: Settings, engine: Engine, publisher: Publisher
) -> None:
    body = {"prompts": ["a"], **SMALL}
    with client_for(settings, api_allowed_origins="https://dash.example") as api:
        foreign = api.post("/v1/batches", json=body, headers={"Origin": "http://evil.example"})
        assert foreign.status_code == 403
        plain = api.post("/v1/batches", content=b'{"prompts": ["a"]}', headers={"Content-Type": "text/plain"})
        assert plain.status_code == 415
        assert api.post("/v1/queue/pause").status_code == 415  # bodiless: no preflight in a browser either
        assert stored(engine) == (0, 0)
        assert publisher.queue_length() == 0
        assert api.get("/v1/queue").json()["paused"] is False
        own = api.post("/v1/batches", json=body, headers={"Origin": "http://127.0.0.1"})
        allowed = api.post("/v1/batches", json=body, headers={"Origin": "https://dash.example"})
        assert (own.status_code, allowed.status_code) == (201, 201)


def chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    """A chunked body (no Content-Length): a valid JSON batch of about `total` bytes."""
    prompts = ["a" * 1000] * (total // 1003)
    body = json.dumps({"prompts": prompts, "width": 64, "height": 64, "steps": 2}).encode()
    for start in range(0, len(body), size):
        yield body[start : start + size]


def test_chunked_bodies_past_the_limit_are_413(settings: Settings, engine: Engine) -> None:
    """The limit used to check only Content-Length: a chunked body was read whole and accepted."""
    with client_for(settings, api_max_upload_bytes=256 * 1024, api_max_body_bytes=4096) as api:
        json_type = {"Content-Type": "application/json"}
        batch = api.post("/v1/batches", content=chunks(512 * 1024), headers=json_type)
        assert batch.status_code == 413, batch.text
        job = api.post("/v1/jobs", content=chunks(16 * 1024), headers=json_type)
        assert job.status_code == 413, job.text
        assert stored(engine) == (0, 0)
        within = api.post("/v1/batches", content=chunks(64 * 1024), headers=json_type)
        assert within.status_code == 201, within.text


def test_idempotency_keys_are_per_owner_and_per_request(settings: Settings, engine: Engine) -> None:
    alice, bob = new_key(engine, "alice"), new_key(engine, "bob")
    key = {"Idempotency-Key": "nightly-1"}
    with client_for(settings) as api:
        first = api.post("/v1/jobs", json={"prompt": "a", **SMALL}, headers={**key, **bearer(alice)})
        again = api.post("/v1/jobs", json={"prompt": "a", **SMALL}, headers={**key, **bearer(alice)})
        assert first.status_code == again.status_code == 201
        assert again.json() == first.json()  # the stored seed, not a new random one
        other = api.post("/v1/jobs", json={"prompt": "b", **SMALL}, headers={**key, **bearer(alice)})
        assert other.status_code == 409
        assert "different request" in other.json()["detail"]
        bobs = api.post("/v1/jobs", json={"prompt": "b", **SMALL}, headers={**key, **bearer(bob)})
        assert bobs.status_code == 201
        assert bobs.json()["id"] != first.json()["id"]
        batch = {"prompts": ["x"], **SMALL}
        made = api.post("/v1/batches", json=batch, headers={**key, **bearer(alice)})
        changed = api.post("/v1/batches", json={**batch, "prompts": ["y"]}, headers={**key, **bearer(alice)})
        assert (made.status_code, changed.status_code) == (201, 409)
    assert stored(engine) == (1, 3)


def test_rate_limit_per_key_is_429_with_retry_after(settings: Settings, engine: Engine) -> None:
    key = new_key(engine, "busy")
    with client_for(settings, api_rate_limit_per_min=5) as api:
        codes = [api.get("/v1/queue", headers=bearer(key)).status_code for _ in range(6)]
        assert codes[:5] == [200] * 5
        assert codes[5] == 429
        limited = api.get("/v1/queue", headers=bearer(key))
        assert 1 <= int(limited.headers["Retry-After"]) <= 60


def test_queued_jobs_quota_is_429_and_stores_nothing(settings: Settings, engine: Engine) -> None:
    key = new_key(engine, "small")
    with client_for(settings, api_max_queued_per_key=3) as api:
        first = api.post("/v1/batches", json={"prompts": ["a", "b"], **SMALL}, headers=bearer(key))
        assert first.status_code == 201
        over = api.post("/v1/batches", json={"prompts": ["c", "d"], **SMALL}, headers=bearer(key))
        assert over.status_code == 429
        assert over.headers["Retry-After"]
        assert "quota of 3" in over.json()["detail"]
    assert stored(engine) == (1, 2)


def test_an_open_address_without_keys_refuses_to_start(settings: Settings, engine: Engine) -> None:
    env = {
        **os.environ,
        "DATABASE_URL": settings.resolved_database_url(),
        "REDIS_URL": settings.resolved_redis_url(),
        "API_HOST": "0.0.0.0",
        "API_PORT": str(settings.api_port),
    }
    command = [sys.executable, "-m", "cli.main", "api"]
    refused = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert refused.returncode != 0
    assert "no API keys exist" in refused.stderr
    new_key(engine, f"admin-{uuid.uuid4().hex[:6]}", admin=True)
    with client_for(settings, api_host="0.0.0.0") as api:  # with a key it starts
        assert api.get("/healthz").status_code == 200


def test_errors_do_not_echo_unbounded_input(api_client: TestClient) -> None:
    """A 422 used to carry the whole offending value back (`input`), a 10 kB field in full."""
    huge = "9" * 10_000
    answers = [
        api_client.post("/v1/jobs", json={"prompt": "a", "width": huge}),
        api_client.post("/v1/jobs", json={"prompt": "a", huge: 1}),
        api_client.post("/v1/batches", json={"prompts": ["a"], "sizes": [huge]}),
        api_client.post("/v1/jobs", json={"prompt": "a", "model": huge}),
    ]
    for answer in answers:
        assert answer.status_code == 422, answer.text
        assert len(answer.content) < 2_000, answer.text[:300]
        assert "more characters" in answer.text or huge[:200] not in answer.text
