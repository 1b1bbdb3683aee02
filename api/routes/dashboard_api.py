"""What the dashboard needs besides the queue's routes: thumbnails, the workers, and a batch's estimate."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import FileResponse

from api.auth import CallerDep
from api.deps import FactoryDep, JobId, SessionDep, SettingsDep, closes_session
from api.routes.jobs import load_job
from api.schemas import CALLER_ERRORS, BatchEstimate, WorkerList, error_responses
from api.submission import resolve_model
from jobs import thumbnails
from jobs.estimate import EstimateRequest, estimate_batch
from jobs.queue import model_queue
from jobs.tables import utcnow
from jobs.worker_views import newest_live_worker, silent_after_s, worker_views

router = APIRouter(responses=error_responses(*CALLER_ERRORS))

# A thumbnail never changes (a retry is another job); only its owner's browser may keep it.
THUMBNAIL_CACHE_CONTROL = "private, max-age=86400"


@router.get(
    "/v1/jobs/{job_id}/thumbnail",
    tags=["jobs"],
    response_class=FileResponse,
    responses={
        200: {"content": {thumbnails.MEDIA_TYPE: {}}, "description": "at most 256 px on its long side"},
        304: {"description": "If-None-Match named this thumbnail's ETag: the cached copy is current"},
        **error_responses(404, 409, 410),
    },
)
@closes_session
def get_job_thumbnail(
    job_id: JobId, caller: CallerDep, session: SessionDep, settings: SettingsDep, request: Request
) -> Response:
    """A small WebP of a succeeded job's image, made on the first request and kept on disk after that."""
    job = load_job(session, job_id, caller)
    try:
        thumbnail = thumbnails.thumbnail_of(job, settings.resolved_outputs_dir())
    except thumbnails.NoImage as error:  # 409 as for /image: the job exists, its image does not yet
        raise HTTPException(status_code=409, detail=str(error)) from None
    except thumbnails.ImageGone as error:
        raise HTTPException(status_code=410, detail=str(error)) from None
    headers = {"Cache-Control": THUMBNAIL_CACHE_CONTROL, "ETag": thumbnail.etag}
    if _names(request.headers.get("if-none-match", ""), thumbnail.etag):
        return Response(status_code=304, headers=headers)
    if thumbnail.path is None:
        return Response(thumbnail.content, media_type=thumbnails.MEDIA_TYPE, headers=headers)
    return FileResponse(thumbnail.path, media_type=thumbnails.MEDIA_TYPE, headers=headers)


def _names(if_none_match: str, etag: str) -> bool:
    """Whether an If-None-Match header names this ETag (weak or strong) or any (`*`)."""
    tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return etag in tags or "*" in tags


@router.get("/v1/workers", tags=["workers"], response_model=WorkerList)
@closes_session
def get_workers(_caller: CallerDep, session: SessionDep, settings: SettingsDep) -> dict[str, Any]:
    """The newest worker starts, newest first: what each loaded, its queue, and whether it is live."""
    silence = silent_after_s(settings.heartbeat_interval_s)
    views = worker_views(session, now=utcnow(), silent_after_s=silence)
    return {"workers": [{**view, "queue": model_queue(settings.queue_name, view["model"])} for view in views]}


@router.post(
    "/v1/estimate",
    tags=["workers"],
    response_model=BatchEstimate,
    responses=error_responses(400, 413, 415),
)
def estimate(
    body: EstimateRequest, _caller: CallerDep, factory: FactoryDep, settings: SettingsDep
) -> dict[str, Any]:
    """Whether each size fits and how long the batch takes, from measured jobs or the worker's forecast.

    Stores nothing and queues nothing.
    """
    model = resolve_model(body.model, settings)
    silence = silent_after_s(settings.heartbeat_interval_s)
    with factory() as session:
        worker = newest_live_worker(session, now=utcnow(), silent_after_s=silence)
        return estimate_batch(session, body, model=model, worker=worker)
