"""Alembic owns the schema: upgrade and downgrade work on PostgreSQL and SQLite."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Engine, MetaData, Table, create_engine, insert, inspect, select, text
from sqlalchemy.orm import Session

from jobs import migrate
from jobs.tables import Base, Job, JobStats, WorkerPresence
from tests.conftest import BACKENDS

TABLES = {
    "batches",
    "jobs",
    "job_stats",
    "queue_controls",
    "api_keys",
    "webhook_deliveries",
    "stack_identity",
    "workers",
}


def table_names(url: str) -> set[str]:
    """The tables a database holds, Alembic's own version table aside."""
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


@pytest.mark.parametrize("empty_database_url", BACKENDS, indirect=True)
def test_upgrade_downgrade_upgrade(empty_database_url: str) -> None:
    """head creates every table, base removes them all, and head works again after that."""
    migrate.upgrade(empty_database_url)
    assert table_names(empty_database_url) == TABLES
    migrate.downgrade(empty_database_url)
    assert table_names(empty_database_url) == set()
    migrate.upgrade(empty_database_url)
    assert table_names(empty_database_url) == TABLES


@pytest.mark.parametrize("empty_database_url", BACKENDS, indirect=True)
def test_migrations_match_the_models(empty_database_url: str) -> None:
    """The migrated schema has every column the SQLAlchemy models declare."""
    migrate.upgrade(empty_database_url)
    engine = create_engine(empty_database_url)
    try:
        inspector = inspect(engine)
        for table in Base.metadata.sorted_tables:
            migrated = {column["name"] for column in inspector.get_columns(table.name)}
            assert migrated == {column.name for column in table.columns}, table.name
    finally:
        engine.dispose()


# A plan as revision 0007 stored it: text, with the runner's notes at the top level.
OLD_PLAN: dict[str, Any] = {
    "rung": "te_streamed",
    "description": "te_streamed, transformer 30/30 resident, text encoder streamed, vae full",
    "predicted_peak_bytes": 12_884_901_888,
    "resident_weight_bytes": 9_663_676_416,
    "planned_for": [1024, 1024],
    "compiled": False,
    "recompiles": 0,
    "attempts": [
        {"plan": "resident", "rung": "resident", "outcome": "out of memory: CUDA", "seconds": 0.4},
        {"plan": "te_streamed", "rung": "te_streamed", "outcome": "ok", "seconds": 2.5},
    ],
    "retry": "fp16 output NaN or black; retried in bf16",
    "group": "encoded with 3 jobs",
    "warning": "output is NaN or black",
}
# The same plan as revision 0008 stores it: JSON, the notes under "notes", the group as a number.
RECORD = {key: value for key, value in OLD_PLAN.items() if key not in ("retry", "group", "warning")} | {
    "notes": {"retry": OLD_PLAN["retry"], "group": 3, "warnings": [OLD_PLAN["warning"]]}
}
EXHAUSTED_PLAN = {
    "rung": "exhausted",
    "attempts": [{"plan": "x", "rung": "sequential", "outcome": "out of memory"}],
}
# job id -> (offload_mode, plan text) at revision 0007, then (plan, oom_attempts) at revision 0008.
ROWS: dict[str, tuple[str, str | None, dict[str, Any] | None, int]] = {
    "job-notes": ("te_streamed", json.dumps(OLD_PLAN), RECORD, 1),
    "job-exhausted": ("exhausted", json.dumps(EXHAUSTED_PLAN), EXHAUSTED_PLAN, 1),
    "job-no-plan": ("none", None, None, 0),
    "job-not-json": ("none", "resident, 30/30", None, 0),
}


@pytest.fixture
def engine(empty_database_url: str) -> Iterator[Engine]:
    """An engine on the test's empty database."""
    engine = create_engine(empty_database_url)
    yield engine
    engine.dispose()


def insert_old_rows(engine: Engine) -> None:
    """A job and a stats row per ROWS entry, written with revision 0007's columns."""
    metadata = MetaData()
    jobs, stats = (Table(name, metadata, autoload_with=engine) for name in ("jobs", "job_stats"))
    now = datetime.now(UTC)
    job: dict[str, Any] = {
        "batch_index": 0,
        "prompt": "a fox",
        "width": 64,
        "height": 64,
        "steps": 2,
        "guidance_scale": 0.0,
    }
    job |= {"seed": 1, "model": "m", "dtype": "bf16", "priority": 0, "status": "succeeded", "attempts": 1}
    job |= {"max_attempts": 3, "cancel_requested": False, "progress_step": 2, "created_at": now}
    measured: dict[str, Any] = {
        "load_s": 0.0,
        "encode_s": 0.1,
        "denoise_s": 1.0,
        "decode_s": 0.2,
        "save_s": 0.0,
    }
    measured |= {
        "device_name": "test",
        "torch_version": "2.x",
        "diffusers_version": "0.x",
        "recorded_at": now,
    }
    with engine.begin() as connection:
        for job_id, (mode, plan, _record, _ran_out) in ROWS.items():
            connection.execute(insert(jobs).values(id=job_id, **job))
            connection.execute(insert(stats).values(job_id=job_id, offload_mode=mode, plan=plan, **measured))


def stats_indexes(engine: Engine) -> set[str]:
    """The names of job_stats's indexes."""
    return {index["name"] for index in inspect(engine).get_indexes("job_stats") if index["name"]}


@pytest.mark.parametrize("empty_database_url", BACKENDS, indirect=True)
def test_0008_turns_plans_into_json_records_and_back(empty_database_url: str, engine: Engine) -> None:
    """Plans stored as text become JSON records (notes nested, offload_mode renamed rung, out-of-memory
    attempts counted), and back."""
    migrate.upgrade(empty_database_url, "0007")
    insert_old_rows(engine)

    migrate.upgrade(empty_database_url, "0008")
    with Session(engine) as session:
        for job_id, (mode, _plan, record, ran_out) in ROWS.items():
            # The model's columns as of 0008 only: later revisions add more.
            query = select(JobStats.rung, JobStats.plan, JobStats.oom_attempts).where(
                JobStats.job_id == job_id
            )
            assert tuple(session.execute(query).one()) == (mode, record, ran_out), job_id
    assert stats_indexes(engine) == {"ix_job_stats_recorded_at"}
    (foreign_key,) = inspect(engine).get_foreign_keys("job_stats")
    assert foreign_key["options"].get("ondelete") == "CASCADE"
    plan_type = {c["name"]: c["type"] for c in inspect(engine).get_columns("job_stats")}["plan"]
    assert type(plan_type).__name__ == ("JSONB" if engine.dialect.name == "postgresql" else "JSON")

    migrate.downgrade(empty_database_url, "0007")
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT job_id, offload_mode, plan FROM job_stats")).all()
    old = {job_id: (mode, json.loads(plan) if plan else None) for job_id, mode, plan in rows}
    assert old == {
        "job-notes": ("te_streamed", OLD_PLAN),
        "job-exhausted": ("exhausted", EXHAUSTED_PLAN),
        "job-no-plan": ("none", None),
        "job-not-json": ("none", None),  # text that was never a plan does not come back
    }
    assert stats_indexes(engine) == {"ix_job_stats_recorded_at"}


def columns(engine: Engine, table: str) -> set[str]:
    """The names of a table's columns."""
    return {column["name"] for column in inspect(engine).get_columns(table)}


IDENTITY = {"worker", "gpu_index", "device_uuid"}


@pytest.mark.parametrize("empty_database_url", BACKENDS, indirect=True)
def test_0010_adds_which_worker_and_card_and_takes_them_back(empty_database_url: str, engine: Engine) -> None:
    """job_stats gains worker, gpu_index and device_uuid, workers gains gpu_index and device_uuid (empty on
    the rows already there), jobs and workers gain the claim's and the live workers' indexes, and the
    downgrade drops them all, keeping the rows and the other indexes."""
    migrate.upgrade(empty_database_url, "0007")
    insert_old_rows(engine)
    migrate.upgrade(empty_database_url, "0009")
    now = datetime.now(UTC)
    presence = {"id": "w1", "node": "celery@a", "host": "a", "pid": 1, "state": "ready", "model": "m"}
    presence |= {"dtype": "bf16", "offload_mode": "auto", "started_at": now, "beat_at": now}
    with engine.begin() as connection:
        connection.execute(insert(Table("workers", MetaData(), autoload_with=engine)).values(**presence))
    stats_before, workers_before = columns(engine, "job_stats"), columns(engine, "workers")
    jobs_indexes_before = index_columns(engine, "jobs")

    migrate.upgrade(empty_database_url, "0010")
    assert columns(engine, "job_stats") == stats_before | IDENTITY
    assert columns(engine, "workers") == workers_before | {"gpu_index", "device_uuid"}
    with engine.connect() as connection:
        row = connection.execute(text("SELECT node, gpu_index, device_uuid FROM workers")).one()
        stats = connection.execute(text("SELECT worker, gpu_index, device_uuid FROM job_stats")).all()
    assert tuple(row) == ("celery@a", None, None)
    assert [tuple(identity) for identity in stats] == [(None, None, None)] * len(ROWS)
    assert index_columns(engine, "jobs") == jobs_indexes_before | {
        "ix_jobs_model_queue_order": MODEL_QUEUE_ORDER
    }
    assert index_columns(engine, "workers") == {
        "ix_workers_host": ("host",),
        "ix_workers_state_beat_at": LIVE,
    }
    assert priority_descends(engine, "ix_jobs_model_queue_order")

    migrate.downgrade(empty_database_url, "0009")
    assert (columns(engine, "job_stats"), columns(engine, "workers")) == (stats_before, workers_before)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT id FROM workers")).scalars().all() == ["w1"]
        assert set(connection.execute(text("SELECT job_id FROM job_stats")).scalars()) == set(ROWS)
    assert stats_indexes(engine) == {"ix_job_stats_recorded_at"}
    assert {index["name"] for index in inspect(engine).get_indexes("workers")} == {"ix_workers_host"}
    assert index_columns(engine, "jobs") == jobs_indexes_before
    assert priority_descends(engine, "ix_jobs_queue_order")  # untouched by the downgrade's table copies


MODEL_QUEUE_ORDER = ("status", "model", "priority", "attempts", "created_at", "batch_index", "id")
LIVE = ("state", "beat_at")


def index_columns(engine: Engine, table: str) -> dict[str, tuple[str, ...]]:
    """A table's named indexes and their columns, in order."""
    indexes = inspect(engine).get_indexes(table)
    return {index["name"]: tuple(map(str, index["column_names"])) for index in indexes if index["name"]}


def priority_descends(engine: Engine, name: str) -> bool:
    """Whether a jobs index keeps `priority DESC` (SQLite's batch copies would lose it)."""
    if engine.dialect.name == "postgresql":
        (index,) = [index for index in inspect(engine).get_indexes("jobs") if index["name"] == name]
        return index.get("column_sorting", {}).get("priority") == ("desc",)
    with engine.connect() as connection:
        sql = connection.execute(text("SELECT sql FROM sqlite_master WHERE name = :n"), {"n": name}).scalar()
    return "priority DESC" in str(sql)


@pytest.mark.parametrize("empty_database_url", BACKENDS, indirect=True)
def test_the_models_declare_the_migrated_claim_and_live_worker_indexes(
    empty_database_url: str, engine: Engine
) -> None:
    """jobs.tables declares the indexes migration 0010 makes, with the same columns in the same order."""
    migrate.upgrade(empty_database_url)
    declared = {
        index.name: tuple(str(getattr(c, "name", c)).split()[0] for c in index.expressions)
        for table in (Job.__table__, WorkerPresence.__table__)
        for index in table.indexes  # type: ignore[attr-defined]
    }
    assert declared["ix_jobs_model_queue_order"] == MODEL_QUEUE_ORDER
    assert declared["ix_workers_state_beat_at"] == LIVE
    migrated = index_columns(engine, "jobs") | index_columns(engine, "workers")
    assert migrated["ix_jobs_model_queue_order"] == MODEL_QUEUE_ORDER
    assert migrated["ix_workers_state_beat_at"] == LIVE
