"""Single jobs: submit, status, image, cancel."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import FileResponse

from api.auth import Caller, CallerDep
from api.deps import (
    ActionBody,
    FactoryDep,
    IdempotencyKeyDep,
    JobId,
    PublisherDep,
    SessionDep,
    SettingsDep,
    StatusCacheDep,
    closes_session,
)
from api.errors import not_found, refusals_as_http
from api.schemas import CALLER_ERRORS, JobCreated, JobRetried, JobView, error_responses
from api.submission import check_quota, expansion_errors, idempotency_for, resolve_model
from jobs import actions
from jobs.batching import ExpansionError, JobCreate, job_params
from jobs.results import result_file
from jobs.states import JobStatus
from jobs.submit import IdempotencyConflict, submit_job
from jobs.tables import Job
from jobs.unserved import served_now, unserved_warnings
from jobs.views import job_view

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=error_responses(*CALLER_ERRORS))


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=JobCreated,
    responses=error_responses(409, 400, 413, 415),
)
def create_job(
    body: JobCreate,
    caller: CallerDep,
    factory: FactoryDep,
    publisher: PublisherDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyKeyDep,
    cache: StatusCacheDep,
) -> dict[str, Any]:
    """Queue one prompt; returns its id."""
    model = resolve_model(body.model, settings)
    try:
        params = job_params(body, model)
    except ExpansionError as error:
        raise expansion_errors(error) from None
    check_quota(factory, caller, settings, adding=1)
    try:
        submission = submit_job(
            factory,
            publisher,
            params=params,
            priority=body.priority,
            max_attempts=settings.max_attempts,
            owner=caller.owner,
            idempotency=idempotency_for(idempotency_key, body),
        )
    except IdempotencyConflict as error:
        raise HTTPException(status_code=409, detail=str(error)) from None
    cache.clear()  # queue positions moved
    with factory() as session:
        warnings = unserved_warnings(session, settings, [params.model])
    return {
        "id": submission.job_ids[0],
        "status": JobStatus.QUEUED.value,
        "seed": submission.seed,
        "warnings": warnings,
    }


def load_job(session: SessionDep, job_id: str, caller: Caller) -> Job:
    """The caller's job with this id, or a 404 (another key's job is not found either)."""
    with refusals_as_http():
        return actions.owned_job(session, job_id=job_id, owner=caller.owner)


@router.get("/{job_id}", response_model=JobView, responses=error_responses(404))
@closes_session
def get_job(
    job_id: JobId, caller: CallerDep, session: SessionDep, settings: SettingsDep, cache: StatusCacheDep
) -> dict[str, Any]:
    """A job's status, progress, queue position, error, memory stats and whether a worker serves its model.

    At most API_STATUS_CACHE_S old.
    """

    def owned_view() -> tuple[str, dict[str, Any]]:
        job = session.get(Job, job_id)
        if job is None:
            raise not_found("job", job_id)
        return job.owner, job_view(session, job, served=served_now(session, settings))

    view = cache.view_or("job", job_id, caller.owner, owned_view)
    if view is None:
        raise not_found("job", job_id)
    return view


@router.get(
    "/{job_id}/image",
    response_class=FileResponse,
    responses={
        200: {"content": {"image/png": {}}, "description": "the PNG"},
        **error_responses(404, 409, 410),
    },
)
@closes_session
def get_job_image(
    job_id: JobId, caller: CallerDep, session: SessionDep, settings: SettingsDep
) -> FileResponse:
    """The PNG of a succeeded job; its text metadata holds the prompt, seed, size, steps and model."""
    job = load_job(session, job_id, caller)
    if job.status != JobStatus.SUCCEEDED or not job.result_path:
        raise HTTPException(status_code=409, detail=f"job {job_id} has no image: it is {job.status}")
    # Only files under this machine's outputs folder are ever served (the path is stored relative to it).
    path = result_file(settings.resolved_outputs_dir(), job.result_path)
    if path is None:
        raise HTTPException(status_code=410, detail=f"the image of job {job_id} is no longer on disk")
    return FileResponse(path, media_type="image/png", filename=f"{job_id}.png")


@router.post(
    "/{job_id}/retry",
    status_code=status.HTTP_201_CREATED,
    response_model=JobRetried,
    responses=error_responses(404, 409, 400, 413, 415),
)
def retry_job(
    job_id: JobId,
    caller: CallerDep,
    _body: ActionBody,
    factory: FactoryDep,
    publisher: PublisherDep,
    cache: StatusCacheDep,
) -> dict[str, Any]:
    """Queue a fresh copy of a failed or cancelled job, linked to it by `retry_of`."""
    cache.clear()
    with refusals_as_http():
        created = actions.retry_job(factory, publisher, job_id=job_id, owner=caller.owner)
    return {"id": created, "retry_of": job_id, "status": JobStatus.QUEUED.value}


@router.post(
    "/{job_id}/cancel",
    response_model=JobView,
    responses=error_responses(404, 400, 413, 415),
)
def cancel_job(
    job_id: JobId,
    caller: CallerDep,
    _body: ActionBody,
    factory: FactoryDep,
    settings: SettingsDep,
    cache: StatusCacheDep,
) -> dict[str, Any]:
    """Cancel a queued job at once, or stop a running one at its next step."""
    cache.clear()
    with refusals_as_http():
        actions.cancel_job(factory, job_id=job_id, owner=caller.owner)
    with factory() as session:
        return job_view(session, load_job(session, job_id, caller), served=served_now(session, settings))
