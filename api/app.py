"""The FastAPI app: build it with `create_app()`; uvicorn runs it with `--factory`."""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from sqlalchemy.exc import SQLAlchemyError

from api.auth import KeyRing, is_loopback
from api.errors import CompleteAllowHeader, add_bounded_validation_errors
from api.limits import BodyLimit, RateLimiter, StateChangeGuard
from api.metrics import release_process_metrics
from api.observability import add_observability
from api.openapi import publish_models
from api.overload import add_load_shedding
from api.routes import batches, dashboard_api, home, jobs, system
from api.status_cache import StatusCache
from jobs.batching import BatchCreate
from jobs.db import make_database, make_session_factory
from jobs.leader import Leadership
from jobs.queue import Publisher
from jobs.reconcile import reconcile_once
from jobs.settings import Settings, get_settings
from jobs.stack_identity import claim_broker_for
from jobs.webhooks import start_webhook_loop

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, *, reconcile: bool = True) -> FastAPI:
    """An app wired to the configured database and broker."""
    settings = settings or get_settings()
    # Every thread that serves a blocking route can hold a connection; the reconciler holds one more.
    database = make_database(
        settings.resolved_database_url(),
        pool_size=settings.api_threads + 2,
        pool_timeout_s=settings.db_pool_timeout_s,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
        refuse_open_address_without_keys(app.state.key_ring, settings)
        # Serving another stack's broker would hand this stack's jobs to that stack's workers.
        await anyio.to_thread.run_sync(claim_broker_for, settings, app.state.session_factory)
        _read_keys_early(app.state.key_ring)
        stop = threading.Event()
        if reconcile:
            threading.Thread(target=_reconcile_loop, args=(app, settings, stop), daemon=True).start()
            start_webhook_loop(app.state.session_factory, settings=settings, stop=stop)
        # Full collections then skip everything loaded at start-up: a 10,000-job batch used to set off
        # a 70 ms one that held the GIL, and /healthz waited it out.
        gc.freeze()
        # No shorter GIL switch interval: 1 ms slices kept /healthz quick during a 10,000-job submission
        # but cost so much switching under 200 polls a second that the API fell behind and timed out.
        yield
        stop.set()
        await app.state.rate_limiter.close()
        database.dispose()
        release_process_metrics()

    # Swagger UI at /docs and ReDoc at /redoc, with their files served from the installed package: no CDN.
    app = FastAPIOffline(
        title="nightrender",
        version="0.1.0",
        lifespan=lifespan,
        static_url=home.DOCS_ASSETS_URL,
        swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from an outside validator
    )
    app.state.settings = settings
    app.state.session_factory = make_session_factory(database)
    app.state.publisher = Publisher(settings)
    app.state.status_cache = StatusCache(settings.api_status_cache_s)
    app.state.key_ring = KeyRing(app.state.session_factory, settings.api_key_cache_s)
    app.state.rate_limiter = RateLimiter(settings.resolved_redis_url(), settings.api_rate_limit_per_min)
    for module in (jobs, batches, system, dashboard_api, home):
        app.include_router(module.router)
    add_client_limits(app, settings)
    publish_models(app, BatchCreate)
    add_bounded_validation_errors(app)
    app.add_middleware(CompleteAllowHeader, routes=app.router.routes)
    add_load_shedding(app, settings.api_max_inflight)
    add_observability(app, settings, database)  # last added = outermost: every request is seen
    return app


def add_client_limits(app: FastAPI, settings: Settings) -> None:
    """Body sizes counted while reading, and only JSON or multipart state changes from no foreign page."""

    def limit_for(path: str) -> int:
        return settings.api_max_upload_bytes if path == "/v1/batches" else settings.api_max_body_bytes

    app.add_middleware(
        StateChangeGuard, allowed_origins=settings.allowed_origin_set(), routes=app.router.routes
    )
    app.add_middleware(BodyLimit, limit_for=limit_for)


def _read_keys_early(ring: KeyRing) -> None:
    # So the first burst of requests does not wait on the read; a database that is down is fine here.
    try:
        ring.refresh()
    except SQLAlchemyError:
        log.warning("could not read API keys at start-up; requests will try again")


def refuse_open_address_without_keys(ring: KeyRing, settings: Settings) -> None:
    """Without a key, anyone who can reach a public address could use the queue: refuse to start."""
    if is_loopback(settings.api_host):
        return
    ring.refresh()
    if not ring.any():
        raise RuntimeError(
            f"API_HOST={settings.api_host} is not a loopback address and no API keys exist: "
            "create one first with `nightrender keys add NAME`, or listen on 127.0.0.1"
        )


def _reconcile_loop(app: FastAPI, settings: Settings, stop: threading.Event) -> None:
    # Runs at start-up and then every interval, in the API process: it owns publishing already,
    # and a restarted stack resumes where it stopped without any extra service to deploy. Under
    # several uvicorn workers only the lease holder runs the pass.
    leadership = Leadership(
        settings.resolved_redis_url(),
        f"{settings.queue_name}:reconciler-leader",
        ttl_s=3 * settings.reconcile_interval_s,
    )
    while not stop.is_set():
        try:
            if leadership.hold():
                reconcile_once(
                    app.state.session_factory,
                    app.state.publisher,
                    stale_after_s=settings.heartbeat_stale_s,
                    republish_after_s=settings.republish_after_s,
                )
        except Exception:  # a database or broker outage must not kill the loop
            log.exception("reconciler pass failed")
        stop.wait(settings.reconcile_interval_s)
    leadership.release()
