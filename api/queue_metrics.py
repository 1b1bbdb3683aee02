"""Metrics read from SQL at scrape time, so any API process reports the same truth.

Queue depth and heartbeats read only live jobs (the indexed `status` column: as many rows as are queued or
running). Phase times, peak VRAM and out-of-memory retries come from the most recent `METRICS_RECENT_JOBS`
stats rows, aggregated here from columns alone (`oom_attempts` is one, so no stored record is read); picking
them is `ORDER BY recorded_at DESC LIMIT n`, which reads n rows through the index on `job_stats.recorded_at`
(migration 0007; without it a scrape sorted the whole table, see bench/metrics_scrape.py). Being windows, not
running totals, they are gauges: the phase times are a gauge histogram, which `histogram_quantile` reads
without `rate`.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime

from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.utils import floatToGoString
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from jobs.controls import is_paused
from jobs.states import ACTIVE, JobStatus
from jobs.tables import Job, JobStats, utcnow

log = logging.getLogger(__name__)

PHASES = ("load", "encode", "denoise", "decode", "save", "place")
PHASE_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
LIVE = sorted(ACTIVE)  # queued, running: the order the gauges are written in
# The rung worker/engine/records.py records for a job that ran out of memory on every rung (the API does not
# import the engine).
EXHAUSTED = "exhausted"


@dataclass(frozen=True)
class RecentRender:
    """One recent job_stats row: its size, rung, phase seconds, peak and attempts that ran out of memory."""

    size: str
    rung: str
    phase_s: tuple[float, ...]
    peak_reserved_bytes: int | None
    oom_attempts: int


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
    finished = [r for r in renders if r.rung != EXHAUSTED]
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
    """The most recently recorded job stats, newest first."""
    # Pick the rows first on the stats table alone, then join and read the rest for those rows only.
    recent = select(JobStats.job_id).order_by(JobStats.recorded_at.desc()).limit(limit).subquery()
    phases = [getattr(JobStats, f"{phase}_s") for phase in PHASES]
    rows = session.execute(
        select(
            Job.width, Job.height, JobStats.rung, JobStats.peak_reserved_bytes, JobStats.oom_attempts, *phases
        )
        .join(recent, recent.c.job_id == JobStats.job_id)
        .join(Job, Job.id == JobStats.job_id)
    ).all()
    return [
        RecentRender(
            size=f"{row[0]}x{row[1]}",
            rung=row[2],
            peak_reserved_bytes=row[3],
            oom_attempts=int(row[4] or 0),
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
    """Peak reserved VRAM by size and rung (the plan's placement): max, mean and how many jobs."""
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for render in renders:
        if render.peak_reserved_bytes is not None:
            groups[(render.size, render.rung)].append(render.peak_reserved_bytes)
    labels = ["size", "rung"]
    top = GaugeMetricFamily(
        "nightrender_recent_job_peak_reserved_max_bytes",
        "Largest peak of reserved VRAM, by size and rung, over the recent jobs",
        labels=labels,
    )
    mean = GaugeMetricFamily(
        "nightrender_recent_job_peak_reserved_mean_bytes",
        "Mean peak of reserved VRAM, by size and rung, over the recent jobs",
        labels=labels,
    )
    jobs = GaugeMetricFamily(
        "nightrender_recent_jobs", "Recent jobs with a recorded peak, by size and rung", labels=labels
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
        if not render.oom_attempts:
            continue
        exhausted = render.rung == EXHAUSTED
        # The last failure of an exhausted job was not retried: there was no rung left.
        retries += render.oom_attempts - 1 if exhausted else render.oom_attempts
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
