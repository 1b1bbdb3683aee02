"""Service tests of the HTTP API over a real database (PostgreSQL and SQLite) and the real Redis."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from api.app import create_app
from jobs.db import make_database, make_session_factory, transaction
from jobs.lifecycle import claim_job, finish_job
from jobs.params import GenerationParams
from jobs.queue import Publisher
from jobs.reconcile import reconcile_once
from jobs.settings import Settings
from jobs.submit import insert_job
from jobs.tables import Batch, Job
from tests.conftest import BACKENDS, local_client

pytestmark = pytest.mark.parametrize("empty_database_url", BACKENDS, indirect=True)

MODEL = "synthetic:tiny"
CLOSED_BROKER = "redis://127.0.0.1:1/0"
SMALL = {"width": 64, "height": 64, "steps": 2, "model": MODEL}
ZERO_COUNTS = {"queued": 0, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 0}


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    """A plain engine on the test's database, to check what the API stored."""
    engine = make_database(settings.resolved_database_url())
    yield engine
    engine.dispose()


def count(engine: Engine, table: type[Batch] | type[Job]) -> int:
    """Rows in a table."""
    with Session(engine) as session:
        return int(session.scalar(select(func.count()).select_from(table)) or 0)


def job_rows(engine: Engine, batch_id: str) -> list[Any]:
    """A batch's job rows in submission order."""
    with Session(engine) as session:
        return list(session.scalars(select(Job).where(Job.batch_id == batch_id).order_by(Job.batch_index)))


def get_job_row(engine: Engine, job_id: str) -> Job:
    """One job row, read fresh."""
    with Session(engine) as session:
        return session.get_one(Job, job_id)


def assert_nothing_stored(engine: Engine, publisher: Publisher) -> None:
    """No batch, no job and no broker message."""
    assert count(engine, Batch) == 0
    assert count(engine, Job) == 0
    assert publisher.queue_length() == 0


def assert_error_names(response: Any, loc: list[Any], reason: str) -> None:
    """A 422 whose detail has an entry at `loc` whose message contains `reason`."""
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    matches = [entry for entry in detail if entry["loc"] == loc]
    assert matches, f"no error at {loc}: {detail}"
    assert any(reason in entry["msg"] for entry in matches), detail


def test_json_batch_expands_prompts_seeds_and_sizes(
    api_client: TestClient, engine: Engine, publisher: Publisher
) -> None:
    body = {
        "prompts": ["a red fox", "a blue owl", "a green frog"],
        "seeds": [1, 2],
        "sizes": ["64x64", "96x64"],
        "steps": 2,
        "model": MODEL,
    }
    response = api_client.post("/v1/batches", json=body)
    assert response.status_code == 201, response.text
    payload = response.json()
    assert len(payload["job_ids"]) == 12
    assert len(set(payload["job_ids"])) == 12

    assert count(engine, Batch) == 1
    assert count(engine, Job) == 12
    rows = job_rows(engine, payload["id"])
    assert [row.id for row in rows] == payload["job_ids"]
    expected = [
        (prompt, seed, width, height)
        for prompt in body["prompts"]
        for seed in (1, 2)
        for width, height in ((64, 64), (96, 64))
    ]
    assert [(r.prompt, r.seed, r.width, r.height) for r in rows] == expected
    assert all(row.status == "queued" and row.steps == 2 and row.model == MODEL for row in rows)
    assert all(row.published_at is not None for row in rows)
    assert publisher.queue_length() == 12


def test_txt_upload_with_form_fields(api_client: TestClient, engine: Engine, publisher: Publisher) -> None:
    text = "# prompts for tonight\na red fox\n\n  a blue owl  \n"
    response = api_client.post(
        "/v1/batches",
        files={"file": ("prompts.txt", text.encode(), "text/plain")},
        data={"steps": "3", "model": MODEL, "seeds": "1,2", "sizes": "64x64, 96x64"},
    )
    assert response.status_code == 201, response.text
    rows = job_rows(engine, response.json()["id"])
    assert len(rows) == 2 * 2 * 2
    assert {row.prompt for row in rows} == {"a red fox", "a blue owl"}
    assert {(row.seed, row.width, row.height) for row in rows} == {
        (seed, w, h) for seed in (1, 2) for w, h in ((64, 64), (96, 64))
    }
    assert all(row.steps == 3 for row in rows)
    assert publisher.queue_length() == 8


def test_csv_upload_stores_per_row_overrides(
    api_client: TestClient, engine: Engine, publisher: Publisher
) -> None:
    csv_text = "prompt,width,height,steps,negative_prompt\na red fox,128,64,5,blurry\na blue owl,,,,\n"
    response = api_client.post(
        "/v1/batches",
        files={"file": ("prompts.csv", csv_text.encode(), "text/csv")},
        data={"width": "64", "height": "80", "steps": "2", "model": MODEL, "seeds": "1,2"},
    )
    assert response.status_code == 201, response.text
    rows = job_rows(engine, response.json()["id"])
    assert len(rows) == 4
    fox = [(r.seed, r.width, r.height, r.steps, r.negative_prompt) for r in rows if r.prompt == "a red fox"]
    owl = [(r.seed, r.width, r.height, r.steps, r.negative_prompt) for r in rows if r.prompt == "a blue owl"]
    assert fox == [(1, 128, 64, 5, "blurry"), (2, 128, 64, 5, "blurry")]
    assert owl == [(1, 64, 80, 2, None), (2, 64, 80, 2, None)]
    assert publisher.queue_length() == 4


def test_jsonl_upload_mixes_strings_and_objects(
    api_client: TestClient, engine: Engine, publisher: Publisher
) -> None:
    lines = ['"a plain prompt"', "", '{"prompt": "a fixed seed", "seed": 42, "steps": 4}']
    response = api_client.post(
        "/v1/batches",
        files={"file": ("prompts.jsonl", "\n".join(lines).encode(), "application/jsonl")},
        data={"width": "64", "height": "64", "steps": "2", "model": MODEL, "sizes": "64x64,96x64"},
    )
    assert response.status_code == 201, response.text
    rows = job_rows(engine, response.json()["id"])
    assert len(rows) == 2 * 2
    plain = [(r.width, r.height, r.steps) for r in rows if r.prompt == "a plain prompt"]
    fixed = [(r.seed, r.width, r.height, r.steps) for r in rows if r.prompt == "a fixed seed"]
    assert plain == [(64, 64, 2), (96, 64, 2)]
    # The row's own seed and steps win; each size of the matrix still applies.
    assert fixed == [(42, 64, 64, 4), (42, 96, 64, 4)]
    assert publisher.queue_length() == 4


BAD_JSON_BATCHES: list[Any] = [
    pytest.param({"prompts": ["a"], "width": 100}, ["body", "width"], "multiple of 16", id="width-not-16"),
    pytest.param(
        {"prompts": ["a"], "width": 4096}, ["body", "width"], "less than or equal to 2048", id="width-big"
    ),
    pytest.param(
        {"prompts": ["a"], "steps": 0}, ["body", "steps"], "greater than or equal to 1", id="steps-0"
    ),
    pytest.param(
        {"prompts": ["   "]}, ["body", "prompts", 0, "prompt"], "must not be blank", id="blank-prompt"
    ),
    pytest.param({"prompts": []}, ["body", "prompts"], "at least 1 item", id="no-prompts"),
    pytest.param(
        {"prompts": ["a"], "seed": 1, "seeds": [1, 2]}, ["body"], "'seed' or 'seeds'", id="seed-and-seeds"
    ),
    pytest.param(
        {"prompts": ["a"], "model": "evil/model"}, ["body", "model"], "unknown model", id="unknown-model"
    ),
    pytest.param({"prompts": ["a"], "colour": "red"}, ["body", "colour"], "Extra inputs", id="extra-field"),
    pytest.param(
        {"prompts": ["ok", {"prompt": "x", "width": 70}]},
        ["body", "prompts", 1, "width"],
        "multiple of 16",
        id="bad-override",
    ),
    pytest.param({"prompts": ["a"], "sizes": ["64by64"]}, ["body", "sizes", 0], "1024x768", id="bad-size"),
    pytest.param(
        {"prompts": ["a"], "seeds": [-1]},
        ["body", "seeds", 0],
        "greater than or equal to 0",
        id="negative-seed",
    ),
]


@pytest.mark.parametrize(("body", "loc", "reason"), BAD_JSON_BATCHES)
def test_bad_json_batch_is_rejected_whole(
    api_client: TestClient,
    engine: Engine,
    publisher: Publisher,
    body: dict[str, Any],
    loc: list[Any],
    reason: str,
) -> None:
    response = api_client.post("/v1/batches", json=body)
    assert_error_names(response, loc, reason)
    assert_nothing_stored(engine, publisher)


def test_invalid_json_body_is_a_422(api_client: TestClient, engine: Engine, publisher: Publisher) -> None:
    response = api_client.post(
        "/v1/batches", content=b'{"prompts": ["a",', headers={"content-type": "application/json"}
    )
    assert_error_names(response, ["body"], "not valid JSON")
    assert_nothing_stored(engine, publisher)


BAD_UPLOADS: list[Any] = [
    pytest.param("prompts.pdf", b"a red fox\n", ["body", "file"], "unsupported file type", id="pdf"),
    pytest.param(
        "prompts.csv", b"text,seed\na red fox,1\n", ["body", "file"], "'prompt' column", id="csv-no-prompt"
    ),
    pytest.param(
        "prompts.txt", b"# only a comment\n\n", ["body", "file"], "holds no prompts", id="empty-txt"
    ),
    pytest.param("prompts.txt", b"\xff\xfe\x00bad", ["body", "file"], "not UTF-8", id="not-utf8"),
    pytest.param(
        "prompts.csv", b"prompt,seed\nfox,abc\n", ["body", "file", "line 2", "seed"], "number", id="csv-nan"
    ),
    pytest.param(
        "prompts.jsonl", b'"ok"\n{broken\n', ["body", "file", "line 2"], "invalid JSON", id="jsonl-bad"
    ),
    pytest.param(
        "prompts.jsonl", b"42\n", ["body", "file", "line 1"], "string or an object", id="jsonl-number"
    ),
]


@pytest.mark.parametrize(("filename", "content", "loc", "reason"), BAD_UPLOADS)
def test_bad_upload_is_rejected_whole(
    api_client: TestClient,
    engine: Engine,
    publisher: Publisher,
    filename: str,
    content: bytes,
    loc: list[Any],
    reason: str,
) -> None:
    response = api_client.post(
        "/v1/batches", files={"file": (filename, content, "application/octet-stream")}, data={"model": MODEL}
    )
    assert_error_names(response, loc, reason)
    assert_nothing_stored(engine, publisher)


def test_multipart_without_file_is_a_422(
    api_client: TestClient, engine: Engine, publisher: Publisher
) -> None:
    response = api_client.post(
        "/v1/batches", files={"notes": ("notes.txt", b"a red fox", "text/plain")}, data={"model": MODEL}
    )
    assert_error_names(response, ["body", "file"], "needs a 'file' field")
    assert_nothing_stored(engine, publisher)


def test_upload_bad_form_field_is_a_422(api_client: TestClient, engine: Engine, publisher: Publisher) -> None:
    response = api_client.post(
        "/v1/batches",
        files={"file": ("prompts.txt", b"a red fox\n", "text/plain")},
        data={"width": "70", "model": MODEL},
    )
    assert_error_names(response, ["body", "width"], "multiple of 16")
    assert_nothing_stored(engine, publisher)


def test_oversized_body_is_a_413(api_client: TestClient, engine: Engine, publisher: Publisher) -> None:
    response = api_client.post(
        "/v1/batches", content=b" " * (20 * 1024 * 1024 + 1), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413, response.text
    assert "bytes" in response.json()["detail"]
    assert_nothing_stored(engine, publisher)


def test_batch_over_the_limit_is_rejected(settings: Settings, engine: Engine, publisher: Publisher) -> None:
    limited = settings.model_copy(update={"max_batch_jobs": 5})
    with local_client(create_app(limited, reconcile=False)) as client:
        body = {"prompts": ["a", "b", "c"], "seeds": [1, 2], **SMALL}
        response = client.post("/v1/batches", json=body)
        assert_error_names(response, ["body", "prompts"], "expands to 6 jobs; the limit is 5")
        assert_nothing_stored(engine, publisher)
        body["seeds"] = [1]
        accepted = client.post("/v1/batches", json=body)
    assert accepted.status_code == 201, accepted.text
    assert count(engine, Job) == 3


def test_bad_single_job_is_rejected(api_client: TestClient, engine: Engine, publisher: Publisher) -> None:
    response = api_client.post("/v1/jobs", json={"prompt": "a", "width": 72, "model": MODEL})
    assert_error_names(response, ["body", "width"], "multiple of 16")
    response = api_client.post("/v1/jobs", json={"prompt": "a", "priority": 10})
    assert_error_names(response, ["body", "priority"], "less than or equal to 9")
    assert_nothing_stored(engine, publisher)


def submit(client: TestClient, priority: int = 0, **extra: Any) -> str:
    """Submit one small job and return its id."""
    response = client.post("/v1/jobs", json={"prompt": "a red fox", **SMALL, "priority": priority, **extra})
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "queued"
    return str(response.json()["id"])


def test_job_status_progress_and_queue_position(
    api_client: TestClient, engine: Engine, publisher: Publisher
) -> None:
    first = submit(api_client, steps=4, seed=7)
    second = submit(api_client)

    view = api_client.get(f"/v1/jobs/{first}").json()
    assert view["status"] == "queued"
    assert view["progress"] == {"step": 0, "total": 4}
    assert view["params"]["seed"] == 7
    assert view["batch_id"] is None
    assert view["memory"] is None
    assert view["queue_position"] == 0
    assert api_client.get(f"/v1/jobs/{second}").json()["queue_position"] == 1

    urgent = submit(api_client, priority=5)
    assert api_client.get(f"/v1/jobs/{urgent}").json()["queue_position"] == 0
    assert api_client.get(f"/v1/jobs/{first}").json()["queue_position"] == 1
    assert api_client.get(f"/v1/jobs/{second}").json()["queue_position"] == 2

    assert count(engine, Job) == 3
    assert all(get_job_row(engine, job_id).published_at is not None for job_id in (first, second, urgent))
    assert publisher.queue_length() == 3


def test_job_without_seed_gets_one_stored(api_client: TestClient, engine: Engine) -> None:
    response = api_client.post("/v1/jobs", json={"prompt": "a red fox", **SMALL})
    assert response.status_code == 201, response.text
    seed = response.json()["seed"]
    assert isinstance(seed, int)
    assert get_job_row(engine, response.json()["id"]).seed == seed


def test_idempotency_key_returns_the_same_job(
    api_client: TestClient, engine: Engine, publisher: Publisher
) -> None:
    body = {"prompt": "a red fox", **SMALL}
    headers = {"Idempotency-Key": "nightly-42"}
    first = api_client.post("/v1/jobs", json=body, headers=headers)
    second = api_client.post("/v1/jobs", json=body, headers=headers)
    assert first.status_code == second.status_code == 201
    assert first.json()["id"] == second.json()["id"]
    assert count(engine, Job) == 1
    assert publisher.queue_length() == 1
    other = api_client.post("/v1/jobs", json=body, headers={"Idempotency-Key": "nightly-43"})
    assert other.json()["id"] != first.json()["id"]
    assert count(engine, Job) == 2


def test_idempotency_key_returns_the_same_batch(
    api_client: TestClient, engine: Engine, publisher: Publisher
) -> None:
    body = {"prompts": ["a", "b"], **SMALL}
    headers = {"Idempotency-Key": "batch-7"}
    first = api_client.post("/v1/batches", json=body, headers=headers)
    second = api_client.post("/v1/batches", json=body, headers=headers)
    assert first.status_code == second.status_code == 201
    assert {**first.json(), "created": False} == second.json()  # the same batch, and it says so
    assert first.json()["created"] is True
    assert count(engine, Batch) == 1
    assert count(engine, Job) == 2
    assert publisher.queue_length() == 2


def test_unknown_ids_are_404(api_client: TestClient) -> None:
    missing = str(uuid.uuid4())
    for path in (f"/v1/jobs/{missing}", f"/v1/batches/{missing}", f"/v1/jobs/{missing}/image"):
        response = api_client.get(path)
        assert response.status_code == 404, path
        assert f"{missing} not found" in response.json()["detail"]
    assert api_client.get(f"/v1/batches/{missing}/jobs").status_code == 404
    assert api_client.post(f"/v1/jobs/{missing}/cancel", json={}).status_code == 404
    assert api_client.post(f"/v1/batches/{missing}/cancel", json={}).status_code == 404


def test_ids_that_are_not_uuids_are_422_before_any_query(api_client: TestClient) -> None:
    """A NUL or any other non-UUID id is refused by the route (it used to reach PostgreSQL: a 500)."""
    for path in ("/v1/jobs/nope", "/v1/jobs/%00", "/v1/batches/nope/jobs", "/v1/jobs/nope/image"):
        response = api_client.get(path)
        assert response.status_code == 422, path
        assert response.json()["detail"][0]["loc"][0] == "path", path
    assert api_client.post("/v1/batches/%00/cancel", json={}).status_code == 422


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompts": ["a lighthouse\x00 at dusk"]}, "prompt"),
        ({"prompts": ["fine"], "negative_prompt": "bad\x07bell"}, "negative_prompt"),
        ({"prompts": ["fine"], "sizes": ["\uff16\uff14x64"]}, "sizes"),
        ({"prompts": ["fine"], "model": ""}, "model"),
    ],
)
def test_odd_text_is_a_422_and_nothing_is_stored(
    api_client: TestClient, engine: Engine, publisher: Publisher, body: dict[str, Any], field: str
) -> None:
    """Control characters, full-width digits in a size and an empty model name are refused."""
    response = api_client.post("/v1/batches", json={**SMALL, **body})
    assert response.status_code == 422, response.text
    assert field in json.dumps(response.json()["detail"])
    assert_nothing_stored(engine, publisher)


def test_an_empty_idempotency_key_is_no_key(api_client: TestClient, engine: Engine) -> None:
    """An empty key used to be stored as a key: 201 once, then 500 forever. It now means no key."""
    body = {"prompts": ["a"], **SMALL}
    first = api_client.post("/v1/batches", json=body, headers={"Idempotency-Key": ""})
    second = api_client.post("/v1/batches", json=body, headers={"Idempotency-Key": "  "})
    assert first.status_code == second.status_code == 201
    assert first.json()["id"] != second.json()["id"]
    assert count(engine, Batch) == 2


def test_image_of_a_queued_job_is_409(api_client: TestClient) -> None:
    job_id = submit(api_client)
    response = api_client.get(f"/v1/jobs/{job_id}/image")
    assert response.status_code == 409
    assert "queued" in response.json()["detail"]


def test_cancel_a_queued_job(api_client: TestClient, engine: Engine) -> None:
    job_id = submit(api_client)
    other = submit(api_client)
    response = api_client.post(f"/v1/jobs/{job_id}/cancel", json={})
    assert response.status_code == 200
    view = response.json()
    assert view["status"] == "cancelled"
    assert view["queue_position"] is None
    assert view["error"] == "cancelled by request"
    assert view["finished_at"] is not None
    row = get_job_row(engine, job_id)
    assert row.status == "cancelled"
    assert row.cancel_requested is True
    # The cancelled job no longer counts towards anyone's place in the queue.
    assert api_client.get(f"/v1/jobs/{other}").json()["queue_position"] == 0


def test_batch_summary_and_cancel(api_client: TestClient, engine: Engine) -> None:
    created = api_client.post("/v1/batches", json={"prompts": ["a", "b", "c"], "seeds": [1, 2], **SMALL})
    assert created.status_code == 201, created.text
    batch_id = created.json()["id"]

    summary = api_client.get(f"/v1/batches/{batch_id}").json()
    assert summary["status"] == "queued"
    assert summary["total"] == 6
    assert summary["counts"] == {"queued": 6, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 0}
    assert summary["progress"] == 0.0
    assert summary["eta_seconds"] is None

    listing = api_client.get(f"/v1/batches/{batch_id}/jobs").json()
    assert [job["id"] for job in listing["jobs"]] == created.json()["job_ids"]

    cancelled = api_client.post(f"/v1/batches/{batch_id}/cancel", json={})
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["counts"]["cancelled"] == 6
    assert cancelled.json()["counts"]["queued"] == 0
    summary = api_client.get(f"/v1/batches/{batch_id}").json()
    assert summary["status"] == "cancelled"
    assert summary["total"] == 6
    assert summary["progress"] == 1.0
    assert summary["eta_seconds"] == 0.0
    assert {row.status for row in job_rows(engine, batch_id)} == {"cancelled"}


def test_batch_cancel_flags_the_running_job(
    api_client: TestClient, settings: Settings, engine: Engine
) -> None:
    created = api_client.post("/v1/batches", json={"prompts": ["a", "b"], **SMALL})
    batch_id, job_ids = created.json()["id"], created.json()["job_ids"]
    factory = make_session_factory(engine)
    with transaction(factory) as session:
        assert claim_job(session, job_id=job_ids[0]) is not None

    summary = api_client.post(f"/v1/batches/{batch_id}/cancel", json={}).json()
    assert summary["counts"]["running"] == 1
    assert summary["counts"]["cancelled"] == 1
    assert summary["status"] == "running"
    running = get_job_row(engine, job_ids[0])
    assert running.status == "running"
    assert running.cancel_requested is True


def test_healthz_ok(api_client: TestClient) -> None:
    response = api_client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"database": "ok", "broker": "ok"}


def test_healthz_names_a_dead_broker(settings: Settings) -> None:
    broken = settings.model_copy(update={"redis_url": CLOSED_BROKER})
    with local_client(create_app(broken, reconcile=False)) as client:
        response = client.get("/healthz")
    assert response.status_code == 503
    checks = response.json()
    assert checks["database"] == "ok"
    assert checks["broker"].startswith("error:")


def test_broker_outage_loses_nothing_and_reconciler_publishes(
    settings: Settings, engine: Engine, publisher: Publisher
) -> None:
    broken = settings.model_copy(update={"redis_url": CLOSED_BROKER})
    with local_client(create_app(broken, reconcile=False)) as client:
        job_id = submit(client)
        assert client.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
    row = get_job_row(engine, job_id)
    assert row.status == "queued"
    assert row.published_at is None
    assert publisher.queue_length() == 0

    report = reconcile_once(make_session_factory(engine), publisher, stale_after_s=120)
    assert report.republished == 1
    assert get_job_row(engine, job_id).published_at is not None
    assert publisher.queue_length() == 1


def test_openapi_documents_both_batch_bodies(api_client: TestClient) -> None:
    schema = api_client.get("/openapi.json").json()
    content = schema["paths"]["/v1/batches"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(content)
    assert "file" in content["multipart/form-data"]["schema"]["required"]
    assert "/v1/jobs/{job_id}" in schema["paths"]


def test_stats_empty_on_a_fresh_database(api_client: TestClient) -> None:
    response = api_client.get("/v1/stats")
    assert response.status_code == 200
    assert response.json() == {"rows": []}


def stats_values(peak: int, denoise_s: float) -> dict[str, Any]:
    """JobStats columns as a worker would record them."""
    return {
        "peak_allocated_bytes": peak,
        "peak_reserved_bytes": peak * 2,
        "rung": "none",
        "encode_s": 0.5,
        "denoise_s": denoise_s,
        "decode_s": 0.25,
        "save_s": 0.25,
        "device_name": "test-device",
        "torch_version": "2.x",
        "diffusers_version": "0.x",
    }


def test_stats_aggregate_finished_jobs(api_client: TestClient, engine: Engine) -> None:
    factory = make_session_factory(engine)
    params = GenerationParams(prompt="a red fox", width=96, height=64, steps=2, seed=1, model=MODEL)
    with transaction(factory) as session:
        ids = [insert_job(session, params=params, priority=0, max_attempts=3).job_ids[0] for _ in range(3)]
    for job_id, peak, denoise in ((ids[0], 100, 1.0), (ids[1], 300, 3.0)):
        with transaction(factory) as session:
            claim = claim_job(session, job_id=job_id)
            assert claim is not None
            stored = finish_job(
                session,
                job_id=job_id,
                lease_token=claim.lease_token,
                result_path=f"/tmp/{job_id}.png",
                stats=stats_values(peak, denoise),
            )
            assert stored
    # ids[2] stays queued and has no stats: it must not count.

    rows = api_client.get("/v1/stats").json()["rows"]
    assert len(rows) == 1
    row = rows[0]
    assert (row["width"], row["height"], row["rung"], row["device_name"]) == (
        96,
        64,
        "none",
        "test-device",
    )
    assert row["jobs"] == 2
    assert row["peak_allocated_bytes_max"] == 300
    assert row["peak_reserved_bytes_max"] == 600
    assert row["peak_reserved_bytes_mean"] == 400
    assert row["denoise_seconds_mean"] == pytest.approx(2.0)
    assert row["seconds_per_image_mean"] == pytest.approx(3.0)


def test_a_jobs_memory_holds_its_rung_and_its_record_as_an_object(
    api_client: TestClient, engine: Engine
) -> None:
    """`memory.plan` is the stored record itself (a JSON object, not JSON text inside JSON)."""
    record: dict[str, Any] = {
        "rung": "stream",
        "attempts": [{"plan": "stream", "rung": "stream", "outcome": "ok", "seconds": 1.5}],
    }
    record |= {"predicted_peak_bytes": 12_884_901_888, "notes": {"group": 3}}
    factory = make_session_factory(engine)
    params = GenerationParams(prompt="a red fox", width=64, height=64, steps=2, seed=1, model=MODEL)
    with transaction(factory) as session:
        job_id = insert_job(session, params=params, priority=0, max_attempts=3).job_ids[0]
    with transaction(factory) as session:
        claim = claim_job(session, job_id=job_id)
        assert claim is not None
        values = {**stats_values(100, 1.0), "rung": "stream", "plan": record}
        assert finish_job(
            session, job_id=job_id, lease_token=claim.lease_token, result_path="/x.png", stats=values
        )
    memory = api_client.get(f"/v1/jobs/{job_id}").json()["memory"]
    assert (memory["rung"], memory["plan"], memory["oom_attempts"]) == ("stream", record, 0)
    assert api_client.get("/v1/stats").json()["rows"][0]["rung"] == "stream"


def test_status_answers_are_reused_for_a_second_and_dropped_on_change(
    settings: Settings, engine: Engine
) -> None:
    """Pollers share one answer per item per API_STATUS_CACHE_S; this process's own changes show at once."""
    with local_client(
        create_app(settings.model_copy(update={"api_status_cache_s": 60.0}), reconcile=False)
    ) as api:
        created = api.post("/v1/batches", json={"prompts": ["a", "b"], **SMALL}).json()
        batch_id, job_id = created["id"], created["job_ids"][0]
        assert api.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
        assert api.get(f"/v1/batches/{batch_id}").json()["counts"]["running"] == 0
        with transaction(make_session_factory(engine)) as session:  # the worker claims it
            assert claim_job(session, job_id=job_id) is not None
        assert api.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"  # the reused answer
        assert api.get(f"/v1/batches/{batch_id}").json()["counts"]["running"] == 0
        api.post(f"/v1/jobs/{created['job_ids'][1]}/cancel", json={})  # a change through this process
        assert api.get(f"/v1/jobs/{job_id}").json()["status"] == "running"
        assert api.get(f"/v1/batches/{batch_id}").json()["counts"] == {
            **ZERO_COUNTS,
            "running": 1,
            "cancelled": 1,
        }
