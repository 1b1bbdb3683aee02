"""Shared fixtures: real PostgreSQL and Redis from the machine, SQLite as the embedded default."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session, sessionmaker

from cli.stack import Stack
from jobs import migrate
from jobs.db import make_database, make_session_factory
from jobs.queue import Publisher
from jobs.settings import Settings

POSTGRES_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
BACKENDS = ["postgres", "sqlite"]


@pytest.fixture(scope="session", autouse=True)
def user_data_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The user's data folder (DATA_DIR's default) in a temporary folder: no test touches the real one."""
    folder = tmp_path_factory.mktemp("xdg-data")
    previous = os.environ.get("XDG_DATA_HOME")
    os.environ["XDG_DATA_HOME"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("XDG_DATA_HOME", None)
    else:
        os.environ["XDG_DATA_HOME"] = previous


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model cache for the session, so the tiny synthetic pipeline is built once."""
    return tmp_path_factory.mktemp("models")


def _create_postgres_database() -> str:
    name = f"nr_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def _drop_postgres_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def empty_database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database: PostgreSQL or SQLite, by the test's `backend` parameter."""
    backend = getattr(request, "param", "postgres")
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'nightrender.db'}"
        return
    url = _create_postgres_database()
    try:
        yield url
    finally:
        _drop_postgres_database(url)


@pytest.fixture
def database_url(empty_database_url: str) -> str:
    """A fresh database with the migrations applied (never create_all)."""
    migrate.upgrade(empty_database_url)
    return empty_database_url


@pytest.fixture
def settings(database_url: str, tmp_path: Path, model_cache: Path) -> Iterator[Settings]:
    """Settings for one test: its own database, its own queue on the real Redis, its own folders."""
    queue = f"nr-test-{uuid.uuid4().hex[:10]}"
    yield Settings(
        database_url=database_url,
        redis_url=REDIS_URL,
        queue_name=queue,
        data_dir=tmp_path / "data",
        outputs_dir=tmp_path / "outputs",
        model_cache_dir=model_cache,
        worker_model="synthetic:tiny",
        worker_dtype="bf16",
        default_model="synthetic:tiny",
        api_port=_free_port(),
    )
    _delete_queue_keys(queue)


@pytest.fixture
def factory(settings: Settings) -> Iterator[sessionmaker[Session]]:
    """Sessions on the test's migrated database (its engine is disposed after the test)."""
    engine = make_database(settings.resolved_database_url())
    yield make_session_factory(engine)
    engine.dispose()


def _delete_queue_keys(queue: str) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=f"{queue}*"))
    if keys:
        client.delete(*keys)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def publisher(settings: Settings) -> Publisher:
    """A publisher on the test's queue."""
    return Publisher(settings)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip GPU tests cleanly on machines without CUDA (CI never has one)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def api_client(settings: Settings) -> Iterator[object]:
    """The real app in-process over ASGI, on a real database and the real Redis (no reconciler thread)."""

    from api.app import create_app

    with local_client(create_app(settings, reconcile=False)) as client:
        yield client


def local_client(app: object, **options: Any) -> Any:
    """A TestClient that calls from and to 127.0.0.1, as the keyless local user does."""
    from fastapi.testclient import TestClient

    return TestClient(app, base_url="http://127.0.0.1", client=("127.0.0.1", 50000), **options)  # type: ignore[arg-type]


@pytest.fixture
def api_only(settings: Settings) -> Iterator[Stack]:
    """The API alone as a real uvicorn process (no worker), stopped even when the test fails."""
    running = Stack(settings)
    try:
        running.start(worker=False)
        yield running
    finally:
        running.stop()
