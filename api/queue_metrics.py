"""Metrics read from SQL at scrape time, so any API process reports the same truth.

Queue depth and heartbeats read only live jobs (the indexed `status` column: as many rows as are queued or
running). Phase times, peak VRAM and out-of-memory retries come from the most recent `METRICS_RECENT_JOBS`
stats rows, aggregated here; picking them is `ORDER BY recorded_at DESC LIMIT n`, which reads n rows through
the index on `job_stats.recorded_at` (migration 0007; without it a scrape sorted the whole table, see
bench/metrics_scrape.py). Being windows, not running totals, they are gauges: the phase times are a gauge
histogram, which `histogram_quantile` reads without `rate`.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime

from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.utils import floatToGoString
from sqlalchemy import case, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from jobs.controls import is_paused
from jobs.states import JobStatus
from jobs.tables import Job, JobStats, utcnow

log = logging.getLogger(__name__)

PHASES = ("load", "encode", "denoise", "decode", "save", "place")
PHASE_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
LIVE = (JobStatus.QUEUED, JobStatus.RUNNING)
OOM_OUTCOME = "out of memory"
EXHAUSTED = "exhausted"  # the offload mode recorded for a job that ran out of memory on every rung


@dataclass(frozen=True)
class RecentRender:
    """One recent job_stats row: its size, plan, phase seconds, peak and (only when it ran out) its plan."""

    size: str
    offload_mode: str
    phase_s: tuple[float, ...]
    peak_reserved_bytes: int | None
    oom_plan: str | None


class QueueCollector:
    """A prometheus-client collector that reads the queue, heartbeats and recent job stats from SQL."""

    def __init__(self, factory: sessionmaker[Session], recent_jobs: int) -> None:
        self._factory = factory
        self._recent_jobs = recent_jobs

    def describe(self) -> list[Metric]:
        """Nothing up front: registering must not query the database."""
        return []

    def collect(self) -> Iterator[Metric]:
        """The SQL-derived families, and whether the database could be read at all."""
        try:
            with self._factory() as session:
                families = read_families(session, self._recent_jobs)
        except SQLAlchemyError as error:  # a scrape reports the outage instead of failing
            log.warning("metrics: database unreadable (%s)", type(error).__name__)
            families = []
        up = GaugeMetricFamily(
            "nightrender_metrics_database_up", "1 when the SQL-derived metrics could be read"
        )
        up.add_metric([], 1.0 if families else 0.0)
        yield up
        yield from families


def read_families(session: Session, recent_jobs: int) -> list[Metric]:
    """Every SQL-derived family, read in one session."""
    renders = recent_renders(session, recent_jobs)
    finished = [r for r in renders if r.offload_mode != EXHAUSTED]
    return [
        *queue_families(session),
        *heartbeat_families(session, utcnow()),
        phase_histogram(finished),
        *peak_vram_families(finished),
        *oom_families(renders),
    ]


def queue_families(session: Session) -> list[Metric]:
    """Jobs queued and running, and whether the queue is paused."""
    rows = session.execute(
        select(Job.status, func.count()).where(Job.status.in_(LIVE)).group_by(Job.status)
    ).all()
    counts = {status.value: 0 for status in LIVE} | {status: int(n) for status, n in rows}
    depth = GaugeMetricFamily(
        "nightrender_queue_jobs", "Jobs waiting or rendering, by status", labels=["status"]
    )
    for status, n in counts.items():
        depth.add_metric([status], n)
    paused = GaugeMetricFamily("nightrender_queue_paused", "1 while the queue is paused")
    paused.add_metric([], 1.0 if is_paused(session) else 0.0)
    return [depth, paused]


def heartbeat_families(session: Session, now: datetime) -> list[Metric]:
    """Seconds since the freshest and the stalest heartbeat of running jobs (no sample when none runs)."""
    beat = func.coalesce(Job.heartbeat_at, Job.started_at)
    newest, oldest = session.execute(
        select(func.max(beat), func.min(beat)).where(Job.status == JobStatus.RUNNING)
    ).one()
    freshest = GaugeMetricFamily(
        "nightrender_worker_heartbeat_age_seconds",
        "Seconds since the freshest heartbeat of any running job: how long since a worker was last heard",
    )
    stalest = GaugeMetricFamily(
        "nightrender_stalest_heartbeat_age_seconds",
        "Seconds since the stalest running job's heartbeat; past HEARTBEAT_STALE_S the job is requeued",
    )
    if newest is not None:
        freshest.add_metric([], max(0.0, (now - newest).total_seconds()))
        stalest.add_metric([], max(0.0, (now - oldest).total_seconds()))
    return [freshest, stalest]


def recent_renders(session: Session, limit: int) -> list[RecentRender]:
    """The most recently recorded job stats, newest first; the plan only where it ran out of memory."""
    # Pick the rows first on the stats table alone, then join and read plans for those rows only.
    recent = select(JobStats.job_id).order_by(JobStats.recorded_at.desc()).limit(limit).subquery()
    oom_plan = case((JobStats.plan.like(f"%{OOM_OUTCOME}%"), JobStats.plan), else_=None)
    phases = [getattr(JobStats, f"{phase}_s") for phase in PHASES]
    rows = session.execute(
        select(Job.width, Job.height, JobStats.offload_mode, JobStats.peak_reserved_bytes, oom_plan, *phases)
        .join(recent, recent.c.job_id == JobStats.job_id)
        .join(Job, Job.id == JobStats.job_id)
    ).all()
    return [
        RecentRender(
            size=f"{row[0]}x{row[1]}",
            offload_mode=row[2],
            peak_reserved_bytes=row[3],
            oom_plan=row[4],
            phase_s=tuple(float(value or 0.0) for value in row[5:]),
        )
        for row in rows
    ]


def phase_histogram(renders: Sequence[RecentRender]) -> Metric:
    """Seconds per phase over the recent renders, as a gauge histogram."""
    family = GaugeHistogramMetricFamily(
        "nightrender_recent_job_phase_seconds",
        "Seconds each phase took, over the most recently recorded jobs (METRICS_RECENT_JOBS)",
        labels=["phase"],
    )
    for index, phase in enumerate(PHASES):
        values = [render.phase_s[index] for render in renders]
        family.add_metric([phase], cumulative_buckets(values), gsum_value=sum(values))
    return family


def cumulative_buckets(values: Sequence[float]) -> list[tuple[str, float]]:
    """Prometheus buckets: how many values are at most each bound, then +Inf."""
    buckets = [(floatToGoString(bound), float(sum(v <= bound for v in values))) for bound in PHASE_BUCKETS_S]
    return [*buckets, ("+Inf", float(len(values)))]


def peak_vram_families(renders: Iterable[RecentRender]) -> list[Metric]:
    """Peak reserved VRAM by size and offload mode (the plan's rung): max, mean and how many jobs."""
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for render in renders:
        if render.peak_reserved_bytes is not None:
            groups[(render.size, render.offload_mode)].append(render.peak_reserved_bytes)
    labels = ["size", "offload_mode"]
    top = GaugeMetricFamily(
        "nightrender_recent_job_peak_reserved_max_bytes",
        "Largest peak of reserved VRAM, by size and offload mode, over the recent jobs",
        labels=labels,
    )
    mean = GaugeMetricFamily(
        "nightrender_recent_job_peak_reserved_mean_bytes",
        "Mean peak of reserved VRAM, by size and offload mode, over the recent jobs",
        labels=labels,
    )
    jobs = GaugeMetricFamily(
        "nightrender_recent_jobs", "Recent jobs with a recorded peak, by size and offload mode", labels=labels
    )
    for key, peaks in sorted(groups.items()):
        top.add_metric(list(key), max(peaks))
        mean.add_metric(list(key), sum(peaks) / len(peaks))
        jobs.add_metric(list(key), len(peaks))
    return [top, mean, jobs]


def oom_families(renders: Iterable[RecentRender]) -> list[Metric]:
    """Out-of-memory retries (an attempt that ran out and moved to the next rung) and the jobs they hit."""
    retries = 0
    jobs: Counter[str] = Counter({"recovered": 0, "exhausted": 0})
    for render in renders:
        ran_out = oom_attempts(render.oom_plan)
        if not ran_out:
            continue
        exhausted = render.offload_mode == EXHAUSTED
        retries += (
            ran_out - 1 if exhausted else ran_out
        )  # the last failure of an exhausted job was not retried
        jobs["exhausted" if exhausted else "recovered"] += 1
    total = GaugeMetricFamily(
        "nightrender_recent_oom_retries",
        "Attempts that ran out of memory and were retried on a lower rung, over the recent jobs",
    )
    total.add_metric([], retries)
    outcome = GaugeMetricFamily(
        "nightrender_recent_oom_jobs",
        "Recent jobs that ran out of memory at least once: recovered on a lower rung, or exhausted all",
        labels=["outcome"],
    )
    for name, n in jobs.items():
        outcome.add_metric([name], n)
    return [total, outcome]


def oom_attempts(plan: str | None) -> int:
    """How many of a stored plan's attempts ran out of memory (0 for none or an unreadable plan)."""
    if not plan:
        return 0
    try:
        attempts = json.loads(plan).get("attempts", [])
    except (ValueError, AttributeError):
        return 0
    return sum(
        1 for a in attempts if isinstance(a, dict) and str(a.get("outcome", "")).startswith(OOM_OUTCOME)
    )
