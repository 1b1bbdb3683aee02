"""Request ids and structured logs: every request gets an id, and the API logs one JSON object a line."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Callable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI
from sqlalchemy import Engine
from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import metrics
from jobs.settings import Settings

REQUEST_ID_HEADER = "X-Request-ID"
# A client's id is kept only when it is a short token: anything else could forge or flood log lines.
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_LOGGED_PATH = 200
# Probes and scrapes come every few seconds: their access lines are DEBUG, so INFO logs show real traffic.
QUIET_PATHS = frozenset({"/livez", "/readyz", "/healthz", "/metrics"})
ACCESS_FIELDS = ("method", "path", "status", "duration_ms")
# Any other method is logged and counted as OTHER, so a client cannot mint metric series or long lines.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
access_log = logging.getLogger("api.access")

# Called once per finished request with (method, route template, status, seconds).
ResponseObserver = Callable[[str, str, int, float], None]


def add_observability(app: FastAPI, settings: Settings, database: Engine) -> None:
    """Structured logs, request ids with one access line each, and /metrics when enabled.

    Added last in `create_app`, so it wraps every other middleware: shed and refused requests get an id,
    an access line and a latency sample too.
    """
    configure_logging(settings.log_format, settings.log_level)
    observe: ResponseObserver | None = None
    if settings.metrics_enabled:
        app.state.metrics = metrics.build_metrics(database, app.state.session_factory, settings)
        app.include_router(metrics.router)
        observe = app.state.metrics.observe
    app.add_middleware(RequestObserver, observe=observe)


def request_id_for(headers: Headers) -> str:
    """The client's X-Request-ID when it is a sane short token, else a new one."""
    incoming = headers.get(REQUEST_ID_HEADER, "")
    return incoming if SANE_REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex


def loggable_path(path: str) -> str:
    """The path cut to a bounded length, with control characters escaped."""
    cut = path[:MAX_LOGGED_PATH]
    shown = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in cut)
    return shown + ("..." if len(path) > MAX_LOGGED_PATH else "")


def route_template(scope: Scope) -> str:
    """The matched route's template (`/v1/jobs/{job_id}`), so metric labels stay few; else "unmatched"."""
    route = scope.get("route")
    if route is None and "app" in scope:
        # Requests answered before routing (shed, too large) still name the route they were for.
        routes = getattr(getattr(scope["app"], "router", None), "routes", [])
        route = next((r for r in routes if r.matches(scope)[0] != Match.NONE), None)
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class RequestObserver:
    """ASGI middleware: a request id in context and in the response, one access line, one observation."""

    def __init__(self, app: ASGIApp, observe: ResponseObserver | None = None) -> None:
        self.app = app
        self.observe = observe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve the request with its id set, then log and observe it."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_for(Headers(scope=scope))
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        response: dict[str, int] = {}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                response["status"] = message["status"]
                MutableHeaders(scope=message).append(REQUEST_ID_HEADER, request_id)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            if "status" not in response:
                await internal_error(request_id)(scope, receive, send_with_id)
            self._finish(scope, response.get("status", 500), started)
            # The id stays set: the server logs this exception next, in this same request's task.
            raise
        self._finish(scope, response.get("status", 500), started)
        request_id_var.reset(token)

    def _finish(self, scope: Scope, status: int, started: float) -> None:
        seconds = time.perf_counter() - started
        method = str(scope.get("method"))
        method = method if method in KNOWN_METHODS else "OTHER"
        path = str(scope.get("path", ""))
        level = logging.DEBUG if path in QUIET_PATHS else logging.INFO
        fields = {"method": method, "path": loggable_path(path), "status": status}
        fields["duration_ms"] = round(seconds * 1000, 2)
        access_log.log(level, "%s %s %d", method, fields["path"], status, extra=fields)
        if self.observe is not None:
            self.observe(method, route_template(scope), status, seconds)


def internal_error(request_id: str) -> JSONResponse:
    """The 500 a client sees for an unhandled error, with the id to quote."""
    return JSONResponse({"detail": "internal server error", "request_id": request_id}, status_code=500)


class RequestIdFilter(logging.Filter):
    """Puts the current request's id (or None) on every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Annotate; never drop."""
        record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request_id and the access fields."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line."""
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
        entry.update({name: getattr(record, name) for name in ACCESS_FIELDS if hasattr(record, name)})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """A plain line for people at a terminal: time, level, logger, [request id], message."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """The record as text; '-' outside a request."""
        if getattr(record, "request_id", None) is None:
            record.request_id = "-"
        return super().format(record)


class ApiLogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The API's one log handler (a class of its own, so configuring again replaces it)."""


def configure_logging(log_format: str, level: str) -> None:
    """Send every log line of the process, uvicorn's included, through one handler in `log_format`."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, ApiLogHandler)]:
        root.removeHandler(handler)
    handler = ApiLogHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(RequestIdFilter())
    # On the handler too: loggers with their own level (uvicorn's are INFO) would pass lower lines on.
    handler.setLevel(level.upper())
    root.addHandler(handler)
    root.setLevel(level.upper())
    route_uvicorn_logs()


def route_uvicorn_logs() -> None:
    """uvicorn's own lines go through our handler; its access log is off, as ours replaces it."""
    for name in ("uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    access = logging.getLogger("uvicorn.access")
    access.handlers.clear()
    # No handler and no propagation: uvicorn sees no handler and skips formatting its access line.
    access.propagate = False
    access.disabled = True
