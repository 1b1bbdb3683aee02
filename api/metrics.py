"""`GET /metrics` for Prometheus: API latency and the database pool per process, the queue from SQL.

Process-local metrics (request latency, the pool) live in prometheus-client objects. When
`PROMETHEUS_MULTIPROC_DIR` is set (several uvicorn workers), prometheus-client keeps them in files in that
folder and a scrape of any worker merges every worker's files; the SQL-derived metrics are a collector
that reads the database at scrape time, so they are right whichever worker answers.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from fastapi import APIRouter, Request, Response
from prometheus_client import (
    CollectorRegistry,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from api.auth import AdminDep
from api.queue_metrics import QueueCollector
from api.schemas import CALLER_ERRORS, error_responses
from jobs.settings import Settings

log = logging.getLogger(__name__)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

router = APIRouter(tags=["system"])


def multiprocess_dir() -> str | None:
    """The folder prometheus-client shares between processes, as it reads it: from the environment."""
    return os.environ.get(MULTIPROC_ENV) or None


class PoolGauges:
    """The database pool's use in this process; in multiprocess mode summed over live processes."""

    def __init__(self, database: Engine, registry: CollectorRegistry) -> None:
        self._pool = database.pool

        def gauge(name: str, documentation: str) -> Gauge:
            return Gauge(name, documentation, registry=registry, multiprocess_mode="livesum")

        self.checked_out = gauge("nightrender_db_pool_checked_out", "Connections lent to requests now")
        self.idle = gauge("nightrender_db_pool_idle", "Open connections waiting in the pool")
        self.size = gauge("nightrender_db_pool_size", "Connections the pool keeps (API_THREADS + 2)")
        self.overflow = gauge("nightrender_db_pool_overflow", "Connections open beyond the pool size")

    def publish(self) -> None:
        """Copy the pool's counts into the gauges (after each request, and at each scrape)."""
        pool = self._pool
        # Pools without a size (SQLite in memory, NullPool) report only what they have.
        self.checked_out.set(_count(pool, "checkedout"))
        self.idle.set(_count(pool, "checkedin"))
        self.size.set(_count(pool, "size"))
        self.overflow.set(max(0, _count(pool, "overflow")))  # negative until the pool has filled


def _count(pool: object, method: str) -> int:
    read = getattr(pool, method, None)
    return int(read()) if callable(read) else 0


@dataclass
class ApiMetrics:
    """What /metrics renders, and the process-local metrics requests feed."""

    exposed: CollectorRegistry
    latency: Histogram
    pool: PoolGauges

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Record one finished request (the RequestObserver middleware calls this)."""
        self.latency.labels(method=method, route=route, status=str(status)).observe(seconds)
        self.pool.publish()

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition in the format the scraper asked for, and its content type."""
        self.pool.publish()
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.exposed), content_type


def build_metrics(database: Engine, factory: sessionmaker[Session], settings: Settings) -> ApiMetrics:
    """The app's metrics: its own registry, or every process's files merged in multiprocess mode."""
    check_multiprocess_setting(settings)
    disable_created_metrics()  # a `_created` series per label set doubles the output for no use here
    own = CollectorRegistry()
    latency = Histogram(
        "nightrender_http_request_duration_seconds",
        "Seconds from a request's arrival to its last byte, by method, route template and status",
        ["method", "route", "status"],
        buckets=LATENCY_BUCKETS_S,
        registry=own,
    )
    pool = PoolGauges(database, own)
    queue = QueueCollector(factory, settings.metrics_recent_jobs)
    if multiprocess_dir() is None:
        ProcessCollector(registry=own)  # CPU, memory, open files: meaningless merged, so single process only
        own.register(queue)
        return ApiMetrics(exposed=own, latency=latency, pool=pool)
    merged = CollectorRegistry()
    MultiProcessCollector(merged)
    merged.register(queue)
    return ApiMetrics(exposed=merged, latency=latency, pool=pool)


def check_multiprocess_setting(settings: Settings) -> None:
    """Fail fast if the setting and the environment disagree, and warn when several workers lack it."""
    wanted, actual = settings.prometheus_multiproc_dir, multiprocess_dir()
    if wanted is not None and (actual is None or Path(actual).resolve() != wanted.resolve()):
        raise RuntimeError(
            f"{MULTIPROC_ENV}={wanted} must be in the process environment (prometheus-client reads it at "
            "import), not only in .env"
        )
    if settings.api_workers > 1 and actual is None:
        log.warning(
            "API_WORKERS=%d without %s: each scrape shows one worker's latency and pool metrics",
            settings.api_workers,
            MULTIPROC_ENV,
        )


def release_process_metrics() -> None:
    """At shutdown in multiprocess mode, drop this process's live gauges (its pool) from the merge."""
    folder = multiprocess_dir()
    if folder is not None:
        mark_process_dead(os.getpid(), folder)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"description": "Prometheus text format", "content": {"text/plain": {}}},
        **error_responses(*CALLER_ERRORS),
    },
)
def metrics(request: Request, _admin: AdminDep) -> Response:
    """Prometheus metrics (OpenMetrics when asked for): an admin key, or loopback while no key exists."""
    body, content_type = request.app.state.metrics.render(request.headers.get("accept"))
    return Response(body, media_type=content_type)
