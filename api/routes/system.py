"""Health and the measured memory-by-resolution table."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import func, select, text

from api.deps import FactoryDep, PublisherDep, SessionDep, SettingsDep, closes_session
from jobs.controls import is_paused, set_paused
from jobs.reconcile import reconcile_once
from jobs.tables import Job
from jobs.views import stats_by_resolution

router = APIRouter(tags=["system"])


@router.get("/v1/stats")
@closes_session
def get_stats(session: SessionDep) -> dict[str, Any]:
    """Peak memory and seconds per image by resolution and offload mode, from recorded jobs."""
    return {"rows": stats_by_resolution(session)}


@router.get("/v1/queue")
@closes_session
def get_queue(session: SessionDep) -> dict[str, Any]:
    """Whether the queue is paused, and how many jobs are queued and running."""
    counts = dict(
        session.execute(
            select(Job.status, func.count()).where(Job.status.in_(["queued", "running"])).group_by(Job.status)
        ).all()
    )
    return {
        "paused": is_paused(session),
        "queued": counts.get("queued", 0),
        "running": counts.get("running", 0),
    }


@router.post("/v1/queue/pause")
def pause_queue(factory: FactoryDep) -> dict[str, Any]:
    """Workers finish their current job and take no more until resumed."""
    with factory() as session, session.begin():
        set_paused(session, True)
    return {"paused": True}


@router.post("/v1/queue/resume")
def resume_queue(factory: FactoryDep, publisher: PublisherDep, settings: SettingsDep) -> dict[str, Any]:
    """Take jobs again; the jobs handed back while paused are published at once."""
    with factory() as session, session.begin():
        set_paused(session, False)
    report = reconcile_once(factory, publisher, stale_after_s=settings.heartbeat_stale_s)
    return {"paused": False, "republished": report.republished}


@router.get("/healthz")
@closes_session
def healthz(session: SessionDep, publisher: PublisherDep) -> JSONResponse:
    """200 when both the database and the broker answer, else 503 naming the one that did not."""
    checks = {"database": _check(lambda: session.execute(text("SELECT 1"))), "broker": _check(publisher.ping)}
    healthy = all(value == "ok" for value in checks.values())
    return JSONResponse(checks, status_code=200 if healthy else 503)


def _check(probe: Any) -> str:
    try:
        probe()
    except Exception as error:  # any failure is the answer to report, not a crash
        return f"error: {type(error).__name__}: {error}"
    return "ok"
