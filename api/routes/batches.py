"""Batches: submit (JSON or an uploaded prompt file), list, summary, jobs, archive, cancel."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from api.archive import ESTIMATED_BYTES_HEADER, archived_image_bytes, stream_archive
from api.auth import Caller, CallerDep
from api.deps import (
    ActionBody,
    BatchId,
    FactoryDep,
    IdempotencyKeyDep,
    PublisherDep,
    SessionDep,
    SettingsDep,
    StatusCacheDep,
    closes_session,
)
from api.errors import invalid, not_found, refusals_as_http
from api.openapi import schema_ref
from api.paging import DEFAULT_PAGE, PageCursor, PageLimit, page_or_422
from api.schemas import (
    CALLER_ERRORS,
    BatchCreated,
    BatchJobsPage,
    BatchPage,
    BatchRetried,
    BatchView,
    error_responses,
)
from api.submission import check_quota, expansion_errors, idempotency_for, parse_body, resolve_model
from api.uploads import parse_prompt_file, typed_form_field
from jobs import actions
from jobs.batching import BatchCreate, ExpansionError, expand_batch
from jobs.pages import batch_jobs_page, batches_page
from jobs.params import GenerationParams
from jobs.queue import Publisher
from jobs.settings import Settings
from jobs.submit import IdempotencyConflict, Submission, submit_batch
from jobs.tables import Batch
from jobs.unserved import serving_now, unserved_warnings
from jobs.views import batch_view
from jobs.webhooks import webhook_refusal_off_loop, webhook_status

router = APIRouter(prefix="/v1/batches", tags=["batches"], responses=error_responses(*CALLER_ERRORS))

BATCH_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": schema_ref(BatchCreate)},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": ".txt, .csv or .jsonl"},
                        "seeds": {"type": "string", "description": "comma-separated, e.g. 1,2,3"},
                        "sizes": {"type": "string", "description": "comma-separated, e.g. 512x512,768x512"},
                        **{
                            name: {"type": "string"}
                            for name in BatchCreate.model_fields
                            if name not in {"prompts", "seeds", "sizes"}
                        },
                    },
                }
            },
        },
    }
}


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=BatchCreated,
    responses=error_responses(400, 409, 413, 415),
    openapi_extra=BATCH_BODY_DOC,
)
async def create_batch(
    request: Request,
    caller: CallerDep,
    factory: FactoryDep,
    publisher: PublisherDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKeyDep,
    cache: StatusCacheDep,
) -> dict[str, Any]:
    """Queue prompts x seeds x sizes in one transaction; returns the batch id and every job id.

    The work runs in worker threads: validating, inserting and publishing 10,000 jobs takes most of
    a second, and on the event loop it stalled every other request (even /healthz) that long.
    """
    body, params = await run_in_threadpool(_expanded_batch, await _batch_payload(request), settings)
    if refusal := await webhook_refusal_off_loop(body.webhook_url, settings=settings):
        raise invalid(["body", "webhook_url"], refusal)
    submission, warnings = await run_in_threadpool(
        _queue_batch,
        body,
        params,
        caller=caller,
        factory=factory,
        publisher=publisher,
        settings=settings,
        idempotency_key=idempotency_key,
    )
    cache.clear()  # queue positions moved
    return {
        "id": submission.batch_id,
        "job_ids": submission.job_ids,
        "created": submission.created,
        "warnings": warnings,
    }


def _expanded_batch(payload: Any, settings: Settings) -> tuple[BatchCreate, list[GenerationParams]]:
    """The validated request and every job's parameters, or a 422."""
    body = parse_body(BatchCreate, payload)
    model = resolve_model(body.model, settings)
    if body.job_count() > settings.max_batch_jobs:
        limit = settings.max_batch_jobs
        message = f"this batch expands to {body.job_count()} jobs; the limit is {limit} per request"
        raise invalid(["body", "prompts"], message)
    try:
        return body, expand_batch(body, model)
    except ExpansionError as error:
        raise expansion_errors(error) from None


def _queue_batch(
    body: BatchCreate,
    params: list[GenerationParams],
    *,
    caller: Caller,
    factory: sessionmaker[Session],
    publisher: Publisher,
    settings: Settings,
    idempotency_key: str | None,
) -> tuple[Submission, list[str]]:
    """Check the caller's quota, then commit and publish the batch (409 for a key reused otherwise).

    Also returns a warning for each of its models no worker serves: those jobs wait, they do not fail.
    """
    check_quota(factory, caller, settings, adding=len(params))
    try:
        submission = submit_batch(
            factory,
            publisher,
            params=params,
            priority=body.priority,
            max_attempts=settings.max_attempts,
            owner=caller.owner,
            idempotency=idempotency_for(idempotency_key, body),
            webhook_url=body.webhook_url,
        )
    except IdempotencyConflict as error:
        raise HTTPException(status_code=409, detail=str(error)) from None
    with factory() as session:
        return submission, unserved_warnings(session, settings, {job.model for job in params})


async def _batch_payload(request: Request) -> Any:
    """The batch as a dict, from a JSON body or from a multipart upload with form fields."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        return await _form_payload(request)
    try:
        return await run_in_threadpool(json.loads, await request.body())  # 20 MB take a while
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise invalid(["body"], f"body is not valid JSON: {error}") from None


async def _form_payload(request: Request) -> dict[str, Any]:
    form = await request.form()
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise invalid(["body", "file"], "a multipart batch needs a 'file' field with the prompts")
    prompts = await run_in_threadpool(parse_prompt_file, upload.filename or "", await upload.read())
    payload: dict[str, Any] = {"prompts": prompts}
    for name, value in form.multi_items():
        if name in ("file", "prompts") or not isinstance(value, str) or value == "":
            continue
        payload[name] = typed_form_field(name, value)
    return payload


def load_batch(session: SessionDep, batch_id: str, caller: Caller) -> Batch:
    """The caller's batch with this id, or a 404 (another key's batch is not found either)."""
    with refusals_as_http():
        return actions.owned_batch(session, batch_id=batch_id, owner=caller.owner)


@router.get("", response_model=BatchPage)
@closes_session
def list_batches(
    caller: CallerDep, session: SessionDep, limit: PageLimit = DEFAULT_PAGE, cursor: PageCursor = None
) -> dict[str, Any]:
    """Batches newest first, a page at a time, each with its status and counts per state."""
    # OWNER FILTER: only the caller's batches; every narrowing of the list goes in `scope`.
    scope = [Batch.owner == caller.owner]
    page = page_or_422(lambda: batches_page(session, limit=limit, cursor=cursor, scope=scope))
    return {"batches": page.items, "next_cursor": page.next_cursor}


@router.get("/{batch_id}", response_model=BatchView, responses=error_responses(404))
@closes_session
def get_batch(
    batch_id: BatchId, caller: CallerDep, session: SessionDep, settings: SettingsDep, cache: StatusCacheDep
) -> dict[str, Any]:
    """Status, counts per state, progress in [0, 1], an ETA, the webhook's state and the unserved models.

    At most API_STATUS_CACHE_S old: a crowd of pollers costs one summary a second.
    """

    def owned_summary() -> tuple[str, dict[str, Any]]:
        batch = session.get(Batch, batch_id)
        if batch is None:
            raise not_found("batch", batch_id)
        return batch.owner, batch_summary(session, batch, settings)

    view = cache.view_or("batch", batch_id, caller.owner, owned_summary)
    if view is None:
        raise not_found("batch", batch_id)
    return view


def batch_summary(session: Session, batch: Batch, settings: Settings) -> dict[str, Any]:
    """What `GET /v1/batches/{id}` and a batch cancel answer."""
    view = batch_view(session, batch, serving=serving_now(session, settings))
    return {**view, "webhook": webhook_status(session, batch=batch)}


@router.get("/{batch_id}/jobs", response_model=BatchJobsPage, responses=error_responses(404))
@closes_session
def list_batch_jobs(
    batch_id: BatchId,
    caller: CallerDep,
    session: SessionDep,
    limit: PageLimit = DEFAULT_PAGE,
    cursor: PageCursor = None,
) -> dict[str, Any]:
    """The batch's jobs in submission order, a page at a time, each with its status and failure reason."""
    load_batch(session, batch_id, caller)
    page = page_or_422(lambda: batch_jobs_page(session, batch_id=batch_id, limit=limit, cursor=cursor))
    return {"id": batch_id, "jobs": page.items, "next_cursor": page.next_cursor}


ARCHIVE_DOC: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"application/zip": {}},
        "description": "the zip, streamed",
        "headers": {
            ESTIMATED_BYTES_HEADER: {
                "description": "the images' total size in bytes, known before the zip (for a progress bar)",
                "schema": {"type": "integer", "minimum": 0},
            }
        },
    },
    **error_responses(404),
}


@router.get("/{batch_id}/archive", response_class=StreamingResponse, responses=ARCHIVE_DOC)
@closes_session
def get_batch_archive(
    batch_id: BatchId, caller: CallerDep, session: SessionDep, factory: FactoryDep, settings: SettingsDep
) -> StreamingResponse:
    """A zip streamed as it is built: the images, then manifest.json (every job, its params and stats)."""
    load_batch(session, batch_id, caller)
    outputs = settings.resolved_outputs_dir()
    headers = {
        "Content-Disposition": f'attachment; filename="batch-{batch_id}.zip"',
        # The images' total size, for a progress bar (the zip adds its headers and the manifest).
        ESTIMATED_BYTES_HEADER: str(archived_image_bytes(session, batch_id, outputs)),
    }
    return StreamingResponse(
        stream_archive(factory, batch_id, outputs), media_type="application/zip", headers=headers
    )


@router.post(
    "/{batch_id}/retry",
    status_code=status.HTTP_201_CREATED,
    response_model=BatchRetried,
    responses=error_responses(404, 409, 400, 413, 415),
)
def retry_batch(
    batch_id: BatchId,
    caller: CallerDep,
    _body: ActionBody,
    factory: FactoryDep,
    publisher: PublisherDep,
    cache: StatusCacheDep,
) -> dict[str, Any]:
    """Queue a fresh copy of every failed or cancelled job of the batch (each linked to its original)."""
    cache.clear()
    with refusals_as_http():
        created = actions.retry_batch(factory, publisher, batch_id=batch_id, owner=caller.owner)
    return {"id": batch_id, "retried": len(created), "job_ids": created}


@router.post(
    "/{batch_id}/cancel",
    response_model=BatchView,
    responses=error_responses(404, 400, 413, 415),
)
def cancel_batch(
    batch_id: BatchId,
    caller: CallerDep,
    _body: ActionBody,
    factory: FactoryDep,
    settings: SettingsDep,
    cache: StatusCacheDep,
) -> dict[str, Any]:
    """Cancel the batch's queued jobs at once and stop its running job at the next step."""
    cache.clear()
    with refusals_as_http():
        actions.cancel_batch(factory, batch_id=batch_id, owner=caller.owner)
    with factory() as session:
        return batch_summary(session, load_batch(session, batch_id, caller), settings)
