"""Typed dependencies: each route gets its session, publisher and settings through these aliases."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from jobs.queue import Publisher
from jobs.settings import Settings


def get_factory(request: Request) -> sessionmaker[Session]:
    """The app's session factory."""
    return request.app.state.session_factory  # type: ignore[no-any-return]


def get_session(request: Request) -> Iterator[Session]:
    """A session for one request, closed afterwards."""
    with get_factory(request)() as session:
        yield session


def get_publisher(request: Request) -> Publisher:
    """The app's broker publisher."""
    return request.app.state.publisher  # type: ignore[no-any-return]


def get_app_settings(request: Request) -> Settings:
    """The settings the app was built with."""
    return request.app.state.settings  # type: ignore[no-any-return]


SessionDep = Annotated[Session, Depends(get_session)]
FactoryDep = Annotated[sessionmaker[Session], Depends(get_factory)]
PublisherDep = Annotated[Publisher, Depends(get_publisher)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]
