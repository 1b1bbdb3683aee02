"""Client errors in FastAPI's own 422 shape, so every bad field is named with its reason."""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError


def invalid(loc: list[Any], message: str) -> RequestValidationError:
    """A 422 naming one field and what is wrong with it."""
    return RequestValidationError([{"loc": loc, "msg": message, "type": "value_error"}])


def not_found(kind: str, item_id: str) -> HTTPException:
    """A 404 for an unknown id."""
    return HTTPException(status_code=404, detail=f"{kind} {item_id} not found")
