"""Health (liveness, readiness), queue controls and the measured memory-by-resolution table."""

from __future__ import annotations

import functools
from typing import Any, Literal

from alembic.script import ScriptDirectory
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import func, inspect, select, text
from sqlalchemy.orm import Session

from api.auth import AdminDep, CallerDep
from api.deps import ActionBody, FactoryDep, PublisherDep, SessionDep, SettingsDep, closes_session
from api.schemas import CALLER_ERRORS, Health, Paused, QueueState, Resumed, StatsTable, error_responses
from jobs.controls import is_paused, set_paused
from jobs.migrate import alembic_config
from jobs.reconcile import reconcile_once
from jobs.states import ACTIVE, JobStatus
from jobs.tables import Job
from jobs.views import stats_by_resolution

router = APIRouter(tags=["system"])


@router.get("/v1/stats", response_model=StatsTable, responses=error_responses(*CALLER_ERRORS))
@closes_session
def get_stats(_caller: CallerDep, session: SessionDep) -> dict[str, Any]:
    """Peak memory and seconds per image by resolution and offload mode, from recorded jobs."""
    return {"rows": stats_by_resolution(session)}


@router.get("/v1/queue", response_model=QueueState, responses=error_responses(*CALLER_ERRORS))
@closes_session
def get_queue(_caller: CallerDep, session: SessionDep) -> dict[str, Any]:
    """Whether the queue is paused, and how many jobs are queued and running."""
    counts = dict(
        session.execute(
            select(Job.status, func.count()).where(Job.status.in_(ACTIVE)).group_by(Job.status)
        ).all()
    )
    return {
        "paused": is_paused(session),
        "queued": counts.get(JobStatus.QUEUED, 0),
        "running": counts.get(JobStatus.RUNNING, 0),
    }


@router.post(
    "/v1/queue/pause",
    response_model=Paused,
    responses=error_responses(*CALLER_ERRORS, 400, 413, 415),
)
def pause_queue(_admin: AdminDep, _body: ActionBody, factory: FactoryDep) -> dict[str, Any]:
    """Workers finish their current job and take no more until resumed."""
    with factory() as session, session.begin():
        set_paused(session, True)
    return {"paused": True}


@router.post(
    "/v1/queue/resume",
    response_model=Resumed,
    responses=error_responses(*CALLER_ERRORS, 400, 413, 415),
)
def resume_queue(
    _admin: AdminDep, _body: ActionBody, factory: FactoryDep, publisher: PublisherDep, settings: SettingsDep
) -> dict[str, Any]:
    """Take jobs again; the jobs handed back while paused are published at once."""
    with factory() as session, session.begin():
        set_paused(session, False)
    report = reconcile_once(factory, publisher, stale_after_s=settings.heartbeat_stale_s)
    return {"paused": False, "republished": report.republished}


@router.get(
    "/healthz",
    responses={
        200: {"model": Health, "description": "both answer"},
        503: {"model": Health, "description": "one does not answer"},
    },
)
@closes_session
def healthz(session: SessionDep, publisher: PublisherDep) -> JSONResponse:
    """200 when both the database and the broker answer, else 503 naming the one that did not."""
    checks = {"database": _check(lambda: session.execute(text("SELECT 1"))), "broker": _check(publisher.ping)}
    healthy = all(value == "ok" for value in checks.values())
    return JSONResponse(checks, status_code=200 if healthy else 503)


class Liveness(BaseModel):
    """The process answers."""

    status: Literal["alive"] = "alive"


class Readiness(BaseModel):
    """Each dependency of serving: "ok", or what is wrong with it."""

    database: str
    broker: str
    schema_: str = Field(alias="schema", description="ok when the database is at the Alembic head")


@router.get("/livez")
async def livez() -> Liveness:
    """Always 200 while the process serves: no database or broker call, never shed, no worker thread."""
    return Liveness()


@router.get(
    "/readyz",
    responses={
        200: {"model": Readiness, "description": "ready"},
        503: {"model": Readiness, "description": "something is not ready"},
    },
)
@closes_session
def readyz(session: SessionDep, publisher: PublisherDep) -> JSONResponse:
    """200 when the database and broker answer and the schema is at the Alembic head, else 503 naming it."""
    database = _check(lambda: session.execute(text("SELECT 1")))
    schema = _check(lambda: schema_at_head(session)) if database == "ok" else "not checked: no database"
    checks = {"database": database, "broker": _check(publisher.ping), "schema": schema}
    ready = all(value == "ok" for value in checks.values())
    return JSONResponse(checks, status_code=200 if ready else 503)


class SchemaNotAtHead(RuntimeError):
    """The database's migrations are behind (or ahead of) this code's."""


@functools.cache
def migration_heads() -> frozenset[str]:
    """The Alembic head revisions shipped with this code, read once."""
    return frozenset(ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads())


def schema_at_head(session: Session) -> None:
    """Raise unless the database's Alembic revisions are this code's heads."""
    current = current_revisions(session)
    if current != migration_heads():
        raise SchemaNotAtHead(f"at {_revisions(current)}, code expects {_revisions(migration_heads())}")


def current_revisions(session: Session) -> frozenset[str]:
    """The revisions recorded in the database's alembic_version table (none when never migrated)."""
    # Read directly: Alembic's MigrationContext logs two INFO lines per call, one probe every few seconds.
    if not inspect(session.connection()).has_table("alembic_version"):
        return frozenset()
    return frozenset(session.scalars(text("SELECT version_num FROM alembic_version")))


def _revisions(revisions: frozenset[str]) -> str:
    return ", ".join(sorted(revisions)) or "no revision (not migrated)"


MAX_CHECK_MESSAGE = 300


def _check(probe: Any) -> str:
    try:
        probe()
    except Exception as error:  # any failure is the answer to report, not a crash
        return f"error: {type(error).__name__}: {error}"[:MAX_CHECK_MESSAGE]
    return "ok"
