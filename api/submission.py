"""Shared checks for submitting work: the model a job may name, and validation errors as 422s."""

from __future__ import annotations

from typing import Any, TypeVar

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from api.errors import invalid
from jobs.batching import ExpansionError
from jobs.settings import Settings

Schema = TypeVar("Schema", bound=BaseModel)


def resolve_model(requested: str | None, settings: Settings) -> str:
    """The model a job runs on: the one asked for, if allowed, else the worker's."""
    model = requested or settings.resolved_worker_model()
    allowed = settings.allowed_model_names()
    if model not in allowed:
        raise invalid(["body", "model"], f"unknown model {model!r}; this server allows {allowed}")
    return model


def parse_body(schema: type[Schema], data: Any) -> Schema:
    """Validate a body into `schema`, reporting errors at their place in the body."""
    try:
        return schema.model_validate(data)
    except ValidationError as error:
        raise RequestValidationError(
            [
                {"loc": ["body", *e["loc"]], "msg": e["msg"], "type": e["type"]}
                for e in error.errors(include_url=False, include_context=False, include_input=False)
            ]
        ) from None


def expansion_errors(error: ExpansionError) -> RequestValidationError:
    """An expansion error as a 422."""
    return RequestValidationError(error.errors)
