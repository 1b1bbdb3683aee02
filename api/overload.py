"""Shedding load: past a limit of requests in progress, or when no database connection comes in time,
the API answers 503 with Retry-After at once instead of letting requests pile up until they time out.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.types import ASGIApp, Receive, Scope, Send

RETRY_AFTER_S = 1
# Health checks are never shed: an operator must see a busy API as alive.
UNSHED_PATHS = frozenset({"/healthz", "/livez", "/readyz"})


def busy(reason: str) -> JSONResponse:
    """A 503 that tells the client when to come back."""
    return JSONResponse(
        {"detail": f"the API is busy ({reason}); retry in {RETRY_AFTER_S} s"},
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


class LoadShedder:
    """ASGI middleware: requests past `max_inflight` in progress get a 503 at once."""

    def __init__(self, app: ASGIApp, max_inflight: int) -> None:
        self.app = app
        self.max_inflight = max_inflight
        self.inflight = 0  # one event loop: no lock needed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on, or shed it when too many are in progress."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.inflight >= self.max_inflight and scope["path"] not in UNSHED_PATHS:
            await busy(f"{self.inflight} requests in progress")(scope, receive, send)
            return
        self.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight -= 1


def add_load_shedding(app: FastAPI, max_inflight: int) -> None:
    """Refuse requests past `max_inflight` in progress, and map database pool timeouts to 503."""
    app.add_middleware(LoadShedder, max_inflight=max_inflight)

    @app.exception_handler(PoolTimeout)
    async def pool_timeout(_request: Request, _error: Exception) -> JSONResponse:
        return busy("no database connection came in time")
