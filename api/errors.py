"""Client errors in FastAPI's own 422 shape, so every bad field is named with its reason."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.routing import BaseRoute, Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from jobs.actions import NotFound, Refused

# Error messages quote what was sent, but never more than this: a 10 MB prompt is not echoed back.
QUOTE_LIMIT = 100


def invalid(loc: list[Any], message: str) -> RequestValidationError:
    """A 422 naming one field and what is wrong with it."""
    return RequestValidationError([{"loc": loc, "msg": message, "type": "value_error"}])


def not_found(kind: str, item_id: str) -> HTTPException:
    """A 404 for an unknown id."""
    return HTTPException(status_code=404, detail=f"{kind} {item_id} not found")


@contextmanager
def refusals_as_http() -> Iterator[None]:
    """Answer the domain errors of `jobs.actions`: 404 for an item not found, 409 for a refusal."""
    try:
        yield
    except NotFound as error:
        raise not_found(error.kind, error.item_id) from None
    except Refused as error:
        raise HTTPException(status_code=409, detail=str(error)) from None


def shorten(text: str, limit: int = QUOTE_LIMIT) -> str:
    """`text`, cut to `limit` characters with a marker saying how much was left out."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more characters)"


def bounded_errors(errors: list[Any]) -> list[dict[str, Any]]:
    """Validation errors with their field path, message and type only: no echoed input, every part short."""
    return [
        {
            "loc": [part if isinstance(part, int) else shorten(str(part)) for part in error.get("loc", ())],
            "msg": shorten(str(error.get("msg", "")), 4 * QUOTE_LIMIT),
            "type": str(error.get("type", "value_error")),
        }
        for error in errors
    ]


def add_bounded_validation_errors(app: FastAPI) -> None:
    """Answer every 422 in FastAPI's shape, without the `input` it would otherwise echo in full."""

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse(
            {"detail": jsonable_encoder(bounded_errors(list(error.errors())))}, status_code=422
        )


class CompleteAllowHeader:
    """ASGI middleware: a 405's `Allow` lists every method the path has, not only the first route's.

    Starlette answers 405 from the first route whose path matches, so `GET` and `POST /v1/batches` (two
    routes) would each hide the other's method.
    """

    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on, rewriting `Allow` on a 405."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_allow(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 405:
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"allow"]
                message = {**message, "headers": [*headers, (b"allow", self._allowed(scope).encode())]}
            await send(message)

        await self.app(scope, receive, send_with_allow)

    def _allowed(self, scope: Scope) -> str:
        methods: set[str] = set()
        for route in self.routes:
            if isinstance(route, Route) and route.matches(scope)[0] != Match.NONE:
                methods |= route.methods or set()
        return ", ".join(sorted(methods))
