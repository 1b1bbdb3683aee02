"""The FastAPI app: build it with `create_app()`; uvicorn runs it with `--factory`."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI

from api.overload import add_load_shedding
from api.routes import batches, jobs, system
from jobs.db import make_engine, make_session_factory
from jobs.queue import Publisher
from jobs.reconcile import reconcile_once
from jobs.settings import Settings, get_settings

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, *, reconcile: bool = True) -> FastAPI:
    """An app wired to the configured database and broker."""
    settings = settings or get_settings()
    # Every thread that serves a blocking route can hold a connection; the reconciler holds one more.
    engine = make_engine(
        settings.resolved_database_url(),
        pool_size=settings.api_threads + 2,
        pool_timeout_s=settings.db_pool_timeout_s,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
        stop = threading.Event()
        if reconcile:
            threading.Thread(target=_reconcile_loop, args=(app, settings, stop), daemon=True).start()
        yield
        stop.set()
        engine.dispose()

    app = FastAPI(title="nightrender", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.session_factory = make_session_factory(engine)
    app.state.publisher = Publisher(settings)
    for module in (jobs, batches, system):
        app.include_router(module.router)
    add_load_shedding(app, settings.api_max_inflight)
    return app


def _reconcile_loop(app: FastAPI, settings: Settings, stop: threading.Event) -> None:
    # Runs at start-up and then every interval, in the API process: it owns publishing already,
    # and a restarted stack resumes where it stopped without any extra service to deploy.
    while not stop.is_set():
        try:
            reconcile_once(
                app.state.session_factory,
                app.state.publisher,
                stale_after_s=settings.heartbeat_stale_s,
                republish_after_s=settings.republish_after_s,
            )
        except Exception:  # a database or broker outage must not kill the loop
            log.exception("reconciler pass failed")
        stop.wait(settings.reconcile_interval_s)
