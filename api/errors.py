"""Client errors in FastAPI's own 422 shape, so every bad field is named with its reason."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

# Error messages quote what was sent, but never more than this: a 10 MB prompt is not echoed back.
QUOTE_LIMIT = 100


def invalid(loc: list[Any], message: str) -> RequestValidationError:
    """A 422 naming one field and what is wrong with it."""
    return RequestValidationError([{"loc": loc, "msg": message, "type": "value_error"}])


def not_found(kind: str, item_id: str) -> HTTPException:
    """A 404 for an unknown id."""
    return HTTPException(status_code=404, detail=f"{kind} {item_id} not found")


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
