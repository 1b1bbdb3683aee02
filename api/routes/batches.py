"""Batches: submit (JSON or an uploaded prompt file), summary, archive, cancel."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, BackgroundTasks, HTTPException, Request, status
from fastapi.responses import FileResponse
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from starlette.datastructures import UploadFile

from api.archive import build_archive
from api.deps import (
    BatchId,
    FactoryDep,
    IdempotencyKeyDep,
    PublisherDep,
    SessionDep,
    SettingsDep,
    closes_session,
)
from api.errors import invalid, not_found
from api.submission import expansion_errors, parse_body, resolve_model
from api.uploads import parse_prompt_file
from jobs.batching import BatchCreate, ExpansionError, expand_batch
from jobs.lifecycle import request_cancel, retry_jobs
from jobs.queue import Publication
from jobs.submit import publish_jobs, submit_batch
from jobs.tables import Batch, Job
from jobs.views import batch_view, not_superseded

router = APIRouter(prefix="/v1/batches", tags=["batches"])
MAX_UPLOAD_BYTES = 20 * 1024 * 1024
LIST_FIELDS = {"seeds", "sizes"}

BATCH_BODY_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": BatchCreate.model_json_schema()},
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


@router.post("", status_code=status.HTTP_201_CREATED, openapi_extra=BATCH_BODY_DOC)
async def create_batch(
    request: Request,
    factory: FactoryDep,
    publisher: PublisherDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKeyDep,
) -> dict[str, Any]:
    """Queue prompts x seeds x sizes in one transaction; returns the batch id and every job id."""
    body = parse_body(BatchCreate, await _batch_payload(request))
    model = resolve_model(body.model, settings)
    if body.job_count() > settings.max_batch_jobs:
        limit = settings.max_batch_jobs
        message = f"this batch expands to {body.job_count()} jobs; the limit is {limit} per request"
        raise invalid(["body", "prompts"], message)
    try:
        params = expand_batch(body, model)
    except ExpansionError as error:
        raise expansion_errors(error) from None
    submission = submit_batch(
        factory,
        publisher,
        params=params,
        priority=body.priority,
        max_attempts=settings.max_attempts,
        idempotency_key=idempotency_key,
    )
    return {"id": submission.batch_id, "job_ids": submission.job_ids}


async def _batch_payload(request: Request) -> Any:
    """The batch as a dict, from a JSON body or from a multipart upload with form fields."""
    declared = int(request.headers.get("content-length") or 0)
    if declared > MAX_UPLOAD_BYTES:
        raise HTTPException(status_code=413, detail=f"request body over {MAX_UPLOAD_BYTES} bytes")
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        return await _form_payload(request)
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise invalid(["body"], f"body is not valid JSON: {error}") from None


async def _form_payload(request: Request) -> dict[str, Any]:
    form = await request.form()
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise invalid(["body", "file"], "a multipart batch needs a 'file' field with the prompts")
    payload: dict[str, Any] = {"prompts": parse_prompt_file(upload.filename or "", await upload.read())}
    for name, value in form.multi_items():
        if name in ("file", "prompts") or not isinstance(value, str) or value == "":
            continue
        payload[name] = [part.strip() for part in value.split(",")] if name in LIST_FIELDS else value
    return payload


def load_batch(session: SessionDep, batch_id: str) -> Batch:
    """The batch with this id, or a 404."""
    batch = session.get(Batch, batch_id)
    if batch is None:
        raise not_found("batch", batch_id)
    return batch


@router.get("/{batch_id}")
@closes_session
def get_batch(batch_id: BatchId, session: SessionDep) -> dict[str, Any]:
    """Status, counts per state, progress in [0, 1] and an ETA from measured times."""
    return batch_view(session, load_batch(session, batch_id))


@router.get("/{batch_id}/jobs")
@closes_session
def list_batch_jobs(batch_id: BatchId, session: SessionDep) -> dict[str, Any]:
    """Every job of the batch with its status, in submission order."""
    load_batch(session, batch_id)
    rows = session.execute(
        select(Job.id, Job.status, Job.prompt, Job.seed, Job.width, Job.height)
        .where(Job.batch_id == batch_id, not_superseded())
        .order_by(Job.batch_index)
    ).all()
    return {"id": batch_id, "jobs": [row._asdict() for row in rows]}


@router.get("/{batch_id}/archive", response_class=FileResponse)
@closes_session
def get_batch_archive(
    batch_id: BatchId, session: SessionDep, settings: SettingsDep, cleanup: BackgroundTasks
) -> FileResponse:
    """A zip of the batch's images plus manifest.json (every job, its parameters and memory stats)."""
    batch = load_batch(session, batch_id)
    path = build_archive(session, batch, settings.resolved_outputs_dir())
    cleanup.add_task(path.unlink, missing_ok=True)
    return FileResponse(path, media_type="application/zip", filename=f"batch-{batch_id}.zip")


@router.post("/{batch_id}/retry", status_code=status.HTTP_201_CREATED)
def retry_batch(batch_id: BatchId, factory: FactoryDep, publisher: PublisherDep) -> dict[str, Any]:
    """Queue a fresh copy of every failed or cancelled job of the batch (each linked to its original)."""
    try:
        with factory() as session, session.begin():
            batch = load_batch(session, batch_id)
            ids = list(session.scalars(select(Job.id).where(Job.batch_id == batch_id)))
            created = retry_jobs(session, job_ids=ids)
            priority = batch.priority
    except IntegrityError:
        raise HTTPException(status_code=409, detail=f"batch {batch_id} is being retried already") from None
    publish_jobs(factory, publisher, [Publication(job_id=job_id, priority=priority) for job_id in created])
    return {"id": batch_id, "retried": len(created), "job_ids": created}


@router.post("/{batch_id}/cancel")
def cancel_batch(batch_id: BatchId, factory: FactoryDep) -> dict[str, Any]:
    """Cancel the batch's queued jobs at once and stop its running job at the next step."""
    with factory() as session, session.begin():
        load_batch(session, batch_id)
        ids = list(session.scalars(select(Job.id).where(Job.batch_id == batch_id)))
        request_cancel(session, job_ids=ids)
    with factory() as session:
        return batch_view(session, load_batch(session, batch_id))
