"""Health and the measured memory-by-resolution table."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.deps import PublisherDep, SessionDep
from jobs.views import stats_by_resolution

router = APIRouter(tags=["system"])


@router.get("/v1/stats")
def get_stats(session: SessionDep) -> dict[str, Any]:
    """Peak memory and seconds per image by resolution and offload mode, from recorded jobs."""
    return {"rows": stats_by_resolution(session)}


@router.get("/healthz")
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
