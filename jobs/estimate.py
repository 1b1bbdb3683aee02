"""A batch's estimate before it is submitted: per size, does it fit the worker's budget, and how long.

Each size is priced from the first source that knows it: the measured stats of finished jobs of the same
model and size; else the newest live worker's forecast (its planner's prediction, stored when it became
ready); else nothing. Nothing is stored and nothing is queued.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from jobs.estimate_forecast import ForecastPoint, forecast_points, nearest_forecast
from jobs.params import MAX_SIDE, MIN_SIDE, SIZE_MULTIPLE, ModelName
from jobs.states import JobStatus
from jobs.tables import Job, JobStats, WorkerPresence

MAX_ESTIMATE_SIZES = 32
MAX_JOBS_PER_SIZE = 100_000
Source = Literal["measured", "forecast", "none"]


class SizeToEstimate(BaseModel):
    """A size to estimate, in pixels, within a job's limits."""

    model_config = ConfigDict(extra="forbid", strict=True)

    width: int = Field(ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIZE_MULTIPLE)
    height: int = Field(ge=MIN_SIDE, le=MAX_SIDE, multiple_of=SIZE_MULTIPLE)


class EstimateRequest(BaseModel):
    """`POST /v1/estimate`: a batch's model, steps and sizes, and how many images of each size."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: ModelName | None = Field(None, description="unset = the worker's model")
    steps: int = Field(9, ge=1, le=100)
    sizes: list[SizeToEstimate] = Field(min_length=1, max_length=MAX_ESTIMATE_SIZES)
    jobs_per_size: int = Field(1, ge=1, le=MAX_JOBS_PER_SIZE, description="images of each size")


@dataclass(frozen=True)
class SizeEstimate:
    """One size: its images, whether its peak fits the budget, its seconds per image, and where from."""

    width: int
    height: int
    images: int
    fits: bool | None
    peak_bytes: int | None
    seconds_per_image: float | None
    source: Source


@dataclass(frozen=True)
class Measured:
    """Finished jobs of one size: the highest reserved peak, and seconds as fixed + per denoising step."""

    peak_bytes: int | None
    seconds_fixed: float
    seconds_per_step: float

    def seconds(self, steps: int) -> float:
        """Seconds per image at this many steps."""
        return self.seconds_fixed + self.seconds_per_step * steps


def estimate_batch(
    session: Session, request: EstimateRequest, *, model: str, worker: WorkerPresence | None
) -> dict[str, Any]:
    """What `POST /v1/estimate` answers, for `model` and the newest live worker (None when none is)."""
    budget = worker.vram_budget_bytes if worker else None
    device = worker.device_name if worker else None
    measured = measured_sizes(session, model=model, sizes=request.sizes, device_name=device)
    points = forecast_points(worker.forecast) if worker is not None and worker.model == model else []
    sizes = [
        size_estimate(size, request, measured.get((size.width, size.height)), points, budget)
        for size in request.sizes
    ]
    images = len(sizes) * request.jobs_per_size
    timed = [s.seconds_per_image * s.images for s in sizes if s.seconds_per_image is not None]
    seconds_total = round(sum(timed), 1) if len(timed) == len(sizes) else None
    return {
        "budget_bytes": budget,
        "device_name": device,
        "images": images,
        "seconds_total": seconds_total,
        "sizes": [asdict(s) for s in sizes],
        "summary": summary_of(sizes, budget_bytes=budget, images=images, seconds_total=seconds_total),
    }


def size_estimate(
    size: SizeToEstimate,
    request: EstimateRequest,
    measured: Measured | None,
    points: list[ForecastPoint],
    budget: int | None,
) -> SizeEstimate:
    """One size from its measured stats, else the forecast, else unknown."""
    source, priced = first_source(measured, nearest_forecast(points, size.width, size.height), budget)
    if priced is None:
        return SizeEstimate(size.width, size.height, request.jobs_per_size, None, None, None, "none")
    peak, seconds = priced.peak_bytes, round(priced.seconds(request.steps), 3)
    fits = None if budget is None or peak is None else peak <= budget
    return SizeEstimate(size.width, size.height, request.jobs_per_size, fits, peak, seconds, source)


def first_source(
    measured: Measured | None, forecast: ForecastPoint | None, budget: int | None
) -> tuple[Source, Measured | ForecastPoint | None]:
    """Measured stats, unless a forecast exists and they were taken under a larger budget; else the forecast.

    A measured peak over today's budget says little: the planner would now pick another rung, which its
    forecast prices.
    """
    if forecast is None:
        return ("measured", measured) if measured is not None else ("none", None)
    if measured is None or (budget is not None and (measured.peak_bytes or 0) > budget):
        return "forecast", forecast
    return "measured", measured


def measured_sizes(
    session: Session, *, model: str, sizes: list[SizeToEstimate], device_name: str | None
) -> dict[tuple[int, int], Measured]:
    """Measured stats of the succeeded jobs of `model` at these sizes (on `device_name` when given).

    Seconds come from jobs that compiled nothing when there are any: their time is rendering, not a
    one-off compile.
    """
    warm = JobStats.recompiles == 0
    fixed = JobStats.encode_s + JobStats.decode_s + JobStats.save_s
    per_step = JobStats.denoise_s / Job.steps
    query = (
        select(
            Job.width,
            Job.height,
            func.max(JobStats.peak_reserved_bytes),
            func.avg(case((warm, fixed))),
            func.avg(case((warm, per_step))),
            func.avg(fixed),
            func.avg(per_step),
        )
        .join(JobStats, JobStats.job_id == Job.id)
        .where(
            Job.status == JobStatus.SUCCEEDED,
            Job.model == model,
            Job.width.in_({s.width for s in sizes}),
            Job.height.in_({s.height for s in sizes}),
        )
        .group_by(Job.width, Job.height)
    )
    if device_name is not None:
        query = query.where(JobStats.device_name == device_name)
    return {(row[0], row[1]): _measured(row) for row in session.execute(query)}


def _measured(row: Any) -> Measured:
    _, _, peak, warm_fixed, warm_step, all_fixed, all_step = row
    fixed, step = (warm_fixed, warm_step) if warm_fixed is not None else (all_fixed, all_step)
    return Measured(
        peak_bytes=int(peak) if peak is not None else None,
        seconds_fixed=float(fixed),
        seconds_per_step=float(step),
    )


GIB = 1024**3  # the worker's budgets are in these units (VRAM_BUDGET_GB)
NOTHING_KNOWN = "no measurements or forecast yet"


def summary_of(
    sizes: list[SizeEstimate], *, budget_bytes: int | None, images: int, seconds_total: float | None
) -> str:
    """One sentence: "fits in 12 GB, about 1.8 s per image, about 29 minutes for 960 images"."""
    known = [s for s in sizes if s.source != "none"]
    if not known:
        return NOTHING_KNOWN
    if seconds_total is not None:
        timing = [f"about {seconds_text(seconds_total / images)} per image"]
        timing.append(f"about {duration_text(seconds_total)} for {images:,} image{'s' * (images != 1)}")
    else:
        timing = [
            f"about {seconds_text(s.seconds_per_image or 0)} per image at {s.width}x{s.height}" for s in known
        ]
    unknown = [s for s in sizes if s.source == "none"]
    if unknown:
        timing.append(f"no measurements or forecast for {size_labels(unknown)}")
    too_big = [s for s in known if s.fits is False]
    if budget_bytes is not None and too_big:
        head = f"does not fit in {gb_text(budget_bytes)} at {size_labels(too_big)}"
        return ": ".join([head, ", ".join(timing)]) if timing else head
    if budget_bytes is not None and all(s.fits for s in known):
        timing.insert(0, f"fits in {gb_text(budget_bytes)}")
    return ", ".join(timing)


def size_labels(sizes: list[SizeEstimate]) -> str:
    """The distinct sizes as 1024x768, in request order."""
    return ", ".join(dict.fromkeys(f"{s.width}x{s.height}" for s in sizes))


def gb_text(size_bytes: int) -> str:
    """Bytes as GB (GiB, as budgets are given): 12 GB, 7.5 GB."""
    return f"{size_bytes / GIB:.1f}".removesuffix(".0") + " GB"


def seconds_text(seconds: float) -> str:
    """A time per image: 0.42 s, 1.8 s, 12 s."""
    if seconds < 1:
        return f"{max(seconds, 0.01):.2f} s"  # "about 0.00 s" reads as free
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"


def duration_text(seconds: float) -> str:
    """A batch's time, rounded for people: 40 seconds, 29 minutes, 3.2 hours."""
    if seconds < 1.5:
        return "1 second"
    if seconds < 90:
        return f"{round(seconds)} seconds"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} minutes"
    return f"{seconds / 3600:.1f} hours"
