"""Cursor pagination of `/v1/batches/{id}/jobs` and `/v1/batches`, over a real database and Redis.

Before, the job list of a 10,000-job batch came back whole (1.75 MB) and batches could not be listed.
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event
from sqlalchemy.orm import Session, sessionmaker

from jobs.db import transaction
from jobs.lifecycle import claim_job, fail_job, retry_jobs
from jobs.pages import BATCHES_LIST, encode_cursor
from tests.conftest import BACKENDS

pytestmark = pytest.mark.parametrize("empty_database_url", BACKENDS, indirect=True)

SMALL = {"width": 64, "height": 64, "steps": 2, "model": "synthetic:tiny"}


def create_batch(client: TestClient, prompts: int, priority: int = 0) -> dict[str, Any]:
    """Submit a batch of `prompts` small jobs; returns the 201 body."""
    body = {"prompts": [f"prompt {i}" for i in range(prompts)], "priority": priority, **SMALL}
    response = client.post("/v1/batches", json=body)
    assert response.status_code == 201, response.text
    return dict(response.json())


def walk(client: TestClient, path: str, key: str, limit: int) -> list[list[dict[str, Any]]]:
    """Every page of a list, following next_cursor until it is null."""
    pages: list[list[dict[str, Any]]] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": limit, **({"cursor": cursor} if cursor else {})}
        response = client.get(path, params=params)
        assert response.status_code == 200, response.text
        pages.append(response.json()[key])
        cursor = response.json()["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 100, "the cursor never ended"


def engine_of(client: TestClient) -> Engine:
    """The engine the app under test reads with."""
    return client.app.state.session_factory.kw["bind"]  # type: ignore[attr-defined, no-any-return]


def test_batch_jobs_walk_every_job_once_in_order(
    api_client: TestClient, factory: sessionmaker[Session]
) -> None:
    """Pages of 5 cover a 23-job batch once each, in submission order; a retried job shows its retry."""
    created = create_batch(api_client, 23)
    ids = created["job_ids"]
    with transaction(factory) as session:
        claim = claim_job(session, job_id=ids[7])
        assert claim is not None
        assert fail_job(
            session, job_id=ids[7], lease_token=claim.lease_token, error="out of memory", stats=None
        )
    with transaction(factory) as session:
        claim = claim_job(session, job_id=ids[12])
        assert claim is not None
        fail_job(session, job_id=ids[12], lease_token=claim.lease_token, error="lost", stats=None)
        (retried,) = retry_jobs(session, job_ids=[ids[12]])

    pages = walk(api_client, f"/v1/batches/{created['id']}/jobs", "jobs", limit=5)
    assert [len(page) for page in pages] == [5, 5, 5, 5, 3]
    rows = [row for page in pages for row in page]
    assert [row["id"] for row in rows] == [*ids[:12], retried, *ids[13:]]
    assert [row["batch_index"] for row in rows] == list(range(23))
    assert rows[7]["status"] == "failed"
    assert rows[7]["error"] == "out of memory"
    assert rows[0]["error"] is None
    assert {"prompt", "seed", "width", "height", "status"} <= set(rows[0])


def test_batch_jobs_default_page_is_100(api_client: TestClient) -> None:
    """Without a limit a page holds 100 jobs, and the exact end of a list has no next page."""
    created = create_batch(api_client, 150)
    first = api_client.get(f"/v1/batches/{created['id']}/jobs").json()
    assert [row["id"] for row in first["jobs"]] == created["job_ids"][:100]
    assert first["next_cursor"] is not None
    rest = api_client.get(f"/v1/batches/{created['id']}/jobs", params={"cursor": first["next_cursor"]})
    assert [row["id"] for row in rest.json()["jobs"]] == created["job_ids"][100:]
    assert rest.json()["next_cursor"] is None
    whole = api_client.get(f"/v1/batches/{created['id']}/jobs", params={"limit": 150}).json()
    assert len(whole["jobs"]) == 150
    assert whole["next_cursor"] is None


@pytest.mark.parametrize("query", [{"limit": 0}, {"limit": 1001}, {"limit": "ten"}, {"limit": -1}])
def test_a_bad_limit_is_a_422(api_client: TestClient, query: dict[str, Any]) -> None:
    """Both lists refuse a limit outside 1..1000."""
    created = create_batch(api_client, 2)
    for path in (f"/v1/batches/{created['id']}/jobs", "/v1/batches"):
        response = api_client.get(path, params=query)
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"] == ["query", "limit"]


def test_a_bad_cursor_is_a_422(api_client: TestClient) -> None:
    """Garbage, a crafted cursor and a cursor of the other list are refused, never a 500."""
    created = create_batch(api_client, 2)
    jobs_path = f"/v1/batches/{created['id']}/jobs"
    batch_cursor = encode_cursor(BATCHES_LIST, "2026-01-01T00:00:00+00:00", created["id"])
    cases = [
        (jobs_path, "not base64 at all!"),
        (jobs_path, "bm90IGpzb24"),  # base64 of "not json"
        (jobs_path, encode_cursor("j", "seven")),
        (jobs_path, encode_cursor("j", 2**70)),
        (jobs_path, encode_cursor("j", -5)),
        (jobs_path, batch_cursor),
        (jobs_path, "x" * 201),
        ("/v1/batches", encode_cursor("j", 3)),
        ("/v1/batches", encode_cursor(BATCHES_LIST, "yesterday", created["id"])),
        ("/v1/batches", encode_cursor(BATCHES_LIST, "2026-01-01T00:00:00", created["id"])),
        ("/v1/batches", encode_cursor(BATCHES_LIST, "0001-01-01T00:00:00+01:00", created["id"])),
    ]
    for path, cursor in cases:
        response = api_client.get(path, params={"cursor": cursor})
        assert response.status_code == 422, (path, cursor, response.text)
        assert response.json()["detail"][0]["loc"] == ["query", "cursor"], response.text


def test_batches_list_newest_first_with_counts(
    api_client: TestClient, factory: sessionmaker[Session]
) -> None:
    """Seven batches in pages of 3: newest first, each once, with its status, total and counts."""
    created = [create_batch(api_client, n % 3 + 1, priority=n % 2) for n in range(7)]
    first_job = created[0]["job_ids"][0]
    with transaction(factory) as session:
        assert claim_job(session, job_id=first_job) is not None

    pages = walk(api_client, "/v1/batches", "batches", limit=3)
    assert [len(page) for page in pages] == [3, 3, 1]
    rows = [row for page in pages for row in page]
    assert [row["id"] for row in rows] == [batch["id"] for batch in reversed(created)]
    oldest = rows[-1]
    assert oldest["status"] == "running"
    assert oldest["counts"] == {"queued": 0, "running": 1, "succeeded": 0, "failed": 0, "cancelled": 0}
    assert [row["total"] for row in rows] == [n % 3 + 1 for n in reversed(range(7))]
    assert [row["priority"] for row in rows] == [n % 2 for n in reversed(range(7))]
    assert all(row["status"] == "queued" for row in rows[:-1])
    assert all(row["created_at"] for row in rows)


def test_batches_list_counts_with_one_query_per_page(api_client: TestClient) -> None:
    """A page of 8 batches runs no more statements than a page of 2: counts are one grouped query."""
    for n in range(8):
        create_batch(api_client, n + 1)
    statements: list[str] = []
    engine = engine_of(api_client)

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    api_client.get("/v1/batches", params={"limit": 2})  # warm: key ring and pool
    event.listen(engine, "before_cursor_execute", record)
    try:
        small = api_client.get("/v1/batches", params={"limit": 2})
        counted_small = len(statements)
        large = api_client.get("/v1/batches", params={"limit": 8})
        counted_large = len(statements) - counted_small
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert len(small.json()["batches"]) == 2
    assert len(large.json()["batches"]) == 8
    assert counted_large <= counted_small


def test_an_empty_list_has_no_next_page(api_client: TestClient) -> None:
    """No batches: an empty page and a null cursor."""
    response = api_client.get("/v1/batches")
    assert response.status_code == 200
    assert response.json() == {"batches": [], "next_cursor": None}
