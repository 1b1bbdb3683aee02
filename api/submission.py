"""Shared checks for submitting work: the model a job may name, and validation errors as 422s."""

from __future__ import annotations

import hashlib
import json
from typing import Any, TypeVar

from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from sqlalchemy.orm import Session, sessionmaker

from api.auth import Caller
from api.errors import invalid
from jobs.batching import ExpansionError
from jobs.settings import Settings
from jobs.submit import Idempotency, active_jobs

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


def idempotency_for(key: str | None, body: BaseModel) -> Idempotency | None:
    """The key with a hash of the validated request, so a reuse with another body can be refused."""
    if key is None:
        return None
    canonical = json.dumps(body.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return Idempotency(key=key, request_hash=hashlib.sha256(canonical.encode()).hexdigest())


QUOTA_RETRY_AFTER_S = 60


def check_quota(factory: sessionmaker[Session], caller: Caller, settings: Settings, *, adding: int) -> None:
    """Refuse with 429 a submission that would take the caller past its queued-jobs quota.

    Checked before the insert, not in the same transaction: two racing submissions may both pass, so
    the quota can be exceeded by one request's worth; that is fine for a fairness limit.
    """
    with factory() as session:
        active = active_jobs(session, owner=caller.owner)
    limit = settings.api_max_queued_per_key
    if active + adding > limit:
        raise HTTPException(
            status_code=429,
            detail=f"this key has {active} jobs queued or running; "
            f"{adding} more would pass its quota of {limit}",
            headers={"Retry-After": str(QUOTA_RETRY_AFTER_S)},
        )
