"""What each route answers, as pydantic models: the OpenAPI document states them, and FastAPI checks them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from jobs.states import JobStatus


class Problem(BaseModel):
    """An error other than a validation error: what went wrong, in words."""

    detail: str


class JobCreated(BaseModel):
    """A queued job (or the one an earlier request with the same Idempotency-Key made)."""

    id: str
    status: JobStatus
    seed: int | None
    warnings: list[str] = Field(
        description="things the client should know, e.g. that no running worker serves the model (its jobs "
        "stay queued until one starts)"
    )


class BatchCreated(BaseModel):
    """A queued batch and its job ids, in submission order (or the batch an earlier request made)."""

    id: str
    job_ids: list[str]
    created: bool = Field(
        description="false when an earlier request with this Idempotency-Key made it (nothing new is queued)"
    )
    warnings: list[str] = Field(
        description="things the client should know, e.g. that no running worker serves the model (its jobs "
        "stay queued until one starts)"
    )


class JobParams(BaseModel):
    """The parameters a job renders with, as stored."""

    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    model: str
    dtype: str
    negative_prompt: str | None


class Progress(BaseModel):
    """Denoising steps done out of the job's total."""

    step: int
    total: int


class JobMemory(BaseModel):
    """A job's measured memory and time (its final attempt)."""

    peak_allocated_bytes: int | None
    peak_reserved_bytes: int | None
    device_total_bytes: int | None
    device_used_start_bytes: int | None
    device_free_start_bytes: int | None
    device_used_end_bytes: int | None
    device_free_end_bytes: int | None
    host_rss_bytes: int | None
    rung: str = Field(
        description="the rung the job rendered on, or `exhausted` when every rung ran out of memory"
    )
    plan: dict[str, Any] | None = Field(
        description="the render's record: the plan's fields, planned_for, compiled, every attempt and notes"
    )
    predicted_peak_bytes: int | None
    vram_budget_bytes: int | None
    load_s: float
    encode_s: float
    denoise_s: float
    decode_s: float
    save_s: float
    place_s: float
    placement_changed: bool
    recompiles: int
    oom_attempts: int = Field(description="how many of its attempts ran out of memory (see `plan.attempts`)")
    device_name: str
    torch_version: str
    diffusers_version: str
    recorded_at: str | None


class JobView(BaseModel):
    """A job's status, progress, place in the queue, error and memory."""

    id: str
    batch_id: str | None
    status: JobStatus
    prompt: str
    params: JobParams
    priority: int
    progress: Progress
    queue_position: int | None = Field(description="queued jobs ahead of this one (FIFO), at most ~1 s old")
    attempts: int
    retry_of: str | None
    error: str | None
    created_at: str
    finished_at: str | None
    memory: JobMemory | None
    unserved: bool = Field(
        description="queued, and no live or starting worker serves its model: it waits for one to start"
    )


class JobRetried(BaseModel):
    """The new job a retry queued."""

    id: str
    retry_of: str
    status: JobStatus


class BatchRetried(BaseModel):
    """How many failed or cancelled jobs of a batch were queued again, and their new ids."""

    id: str
    retried: int
    job_ids: list[str]


class QueueState(BaseModel):
    """Whether the queue is paused, and how many jobs wait and run."""

    paused: bool
    queued: int
    running: int


class Paused(BaseModel):
    """The queue's switch after a pause."""

    paused: bool


class Resumed(BaseModel):
    """The queue's switch after a resume, and the jobs published at once."""

    paused: bool
    republished: int


class StatsRow(BaseModel):
    """Measured memory and time for one resolution and rung."""

    width: int
    height: int
    rung: str
    device_name: str
    jobs: int
    peak_allocated_bytes_max: int | None
    peak_reserved_bytes_max: int | None
    peak_reserved_bytes_mean: int | None
    seconds_per_image_mean: float | None
    denoise_seconds_mean: float | None


class StatsTable(BaseModel):
    """The measured memory-by-resolution table."""

    rows: list[StatsRow]


class Health(BaseModel):
    """Each dependency's answer: "ok" or the error."""

    database: str
    broker: str


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error answers a route can give (422 is documented by FastAPI itself)."""
    return {code: {"model": Problem, "description": ERROR_MEANINGS[code]} for code in codes}


ERROR_MEANINGS = {
    400: "the body could not be read (not UTF-8 or not JSON)",
    401: "no key, or an unknown or revoked key (keys are configured)",
    403: "not allowed: a foreign Origin, a non-loopback client with no keys configured, or not an admin",
    404: "no such id for this key",
    409: "conflicts with the current state, or an Idempotency-Key reused with another body",
    410: "the image is no longer on disk",
    413: "the request body is over its limit",
    415: "a state-changing request must be application/json or multipart/form-data",
    429: "over this key's rate limit or queued-jobs quota; see Retry-After",
    503: "busy or a dependency is down; see Retry-After",
}
# What any /v1 route may answer, besides its own codes.
CALLER_ERRORS = (401, 403, 429, 503)


class WebhookState(BaseModel):
    """A batch's webhook: its last delivery, or waiting for the batch to finish."""

    status: str = Field(description="waiting, pending, delivered, failed or refused")
    sequence: int | None = Field(description="which finish of the batch (retries finish it again)")
    attempts: int
    last_status_code: int | None
    last_error: str | None
    delivered_at: str | None
    next_attempt_at: str | None


class BatchView(BaseModel):
    """A batch's status, counts per state, progress in [0, 1], ETA and webhook."""

    id: str
    status: JobStatus
    total: int
    counts: dict[str, int]
    progress: float
    eta_seconds: float | None = Field(
        description="the remaining jobs' size and steps at the pace measured on this batch (else on recent "
        "jobs of its model); null until one is measured, 0 once the batch is finished"
    )
    created_at: str
    webhook: WebhookState | None = None
    unserved_models: list[str] = Field(
        description="models of its queued jobs that no live or starting worker serves: they wait for one"
    )


class BatchSummary(BaseModel):
    """A batch as listed."""

    id: str
    created_at: str
    total: int
    priority: int
    status: JobStatus
    counts: dict[str, int]


class BatchPage(BaseModel):
    """One page of the caller's batches, newest first."""

    batches: list[BatchSummary]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last")


class BatchJobRow(BaseModel):
    """A job as a batch lists it."""

    id: str
    batch_index: int
    status: JobStatus
    prompt: str
    seed: int
    width: int
    height: int
    error: str | None


class BatchJobsPage(BaseModel):
    """One page of a batch's jobs, in submission order."""

    id: str
    jobs: list[BatchJobRow]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on the last")


class WorkerView(BaseModel):
    """One worker process's start: what it loaded, its state, and whether it is live now."""

    node: str
    host: str
    state: str = Field(description="starting, ready, failed or stopped")
    model: str
    queue: str = Field(description="the Celery queue of its model's jobs, the one it consumes")
    dtype: str
    device_name: str | None
    gpu_index: int | None = Field(description="the GPU it is pinned to (nvidia-smi numbering); null if not")
    device_uuid: str | None = Field(description="its card's UUID (GPU-...), null on the CPU")
    vram_budget_bytes: int | None = Field(description="the allocator cap on CUDA; null on the CPU")
    error: str | None = Field(description="why it could not start (state failed)")
    ready_at: str | None
    beat_at: str
    live: bool = Field(description="ready and heard from within 3 heartbeats (at least 30 s)")


class WorkerList(BaseModel):
    """The newest worker starts (at most 20), newest first."""

    workers: list[WorkerView]


class SizeEstimate(BaseModel):
    """One size of an estimate: whether it fits the budget, its peak and seconds per image, and from where."""

    width: int
    height: int
    images: int
    fits: bool | None = Field(description="peak within the worker's budget; null without a budget or a peak")
    peak_bytes: int | None
    seconds_per_image: float | None
    source: Literal["measured", "forecast", "none"] = Field(
        description="measured: finished jobs of this model and size; forecast: the live worker's planner"
    )


class BatchEstimate(BaseModel):
    """A batch priced before it is submitted, with a one-sentence summary."""

    budget_bytes: int | None = Field(description="the newest live worker's VRAM budget; null on the CPU")
    device_name: str | None
    images: int
    seconds_total: float | None = Field(description="null when a size has no measurement or forecast")
    sizes: list[SizeEstimate]
    summary: str
