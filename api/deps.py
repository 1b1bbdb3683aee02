"""Typed dependencies: each route gets its session, publisher and settings through these aliases."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, TypeVar

from fastapi import Body, Depends, Header, Path, Request
from sqlalchemy.orm import Session, sessionmaker

from api.status_cache import StatusCache
from jobs.queue import Publisher
from jobs.settings import Settings

Result = TypeVar("Result")


# Plain getters are `async def`: FastAPI would run a sync dependency in a worker thread, one more hop
# for nothing under load.
async def get_factory(request: Request) -> sessionmaker[Session]:
    """The app's session factory."""
    return request.app.state.session_factory  # type: ignore[no-any-return]


async def get_session(request: Request) -> AsyncIterator[Session]:
    """A session for one request; routes close it themselves (`closes_session`), this is the backstop.

    Closed on the event loop: a sync generator's cleanup would need a free worker thread.
    """
    session = (await get_factory(request))()
    try:
        yield session
    finally:
        session.close()


def closes_session(route: Callable[..., Result]) -> Callable[..., Result]:
    """Close the route's `session` in the route's own thread, as soon as it returns.

    FastAPI validates a sync route's return value in a second worker-thread hop, and a dependency's
    cleanup runs only after that. A session still open then holds its connection while it waits for a
    thread, and under a burst every thread can be waiting for a connection (fastapi/fastapi#3205):
    the pool deadlocks until its timeout. Routes build plain dicts, so nothing needs the session after.
    """

    @functools.wraps(route)
    def run_and_close(*args: Any, **kwargs: Any) -> Result:
        try:
            return route(*args, **kwargs)
        finally:
            kwargs["session"].close()

    return run_and_close


async def get_publisher(request: Request) -> Publisher:
    """The app's broker publisher."""
    return request.app.state.publisher  # type: ignore[no-any-return]


async def get_app_settings(request: Request) -> Settings:
    """The settings the app was built with."""
    return request.app.state.settings  # type: ignore[no-any-return]


async def get_status_cache(request: Request) -> StatusCache:
    """The app's cache of recent status answers."""
    return request.app.state.status_cache  # type: ignore[no-any-return]


StatusCacheDep = Annotated[StatusCache, Depends(get_status_cache)]
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
FactoryDep = Annotated[sessionmaker[Session], Depends(get_factory)]
PublisherDep = Annotated[Publisher, Depends(get_publisher)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]

# Ids are UUIDs: anything else is a 422 before any query (a NUL in a path used to reach PostgreSQL).
UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
JobId = Annotated[str, Path(pattern=UUID_PATTERN, description="a job id (UUID)")]
BatchId = Annotated[str, Path(pattern=UUID_PATTERN, description="a batch id (UUID)")]


async def idempotency_key(
    key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)] = None,
) -> str | None:
    """The Idempotency-Key header; empty or blank means no key (it used to be stored as one)."""
    return key.strip() or None if key is not None else None


IdempotencyKeyDep = Annotated[str | None, Depends(idempotency_key)]


# Actions (cancel, retry, pause, resume) take no input, but are sent as JSON like every state change: a
# browser cannot send JSON to another site without a preflight. The object's content is ignored.
ActionBody = Annotated[
    dict[str, Any], Body(description="an empty JSON object (its content is ignored)", examples=[{}])
]
