"""The database (a SQLAlchemy Engine: a pool of connections) and its sessions: PostgreSQL in production,
SQLite embedded.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Generic, TypeVar

from sqlalchemy import Connection, CursorResult, Engine, create_engine, event
from sqlalchemy import Result as QueryResult
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)
Result = TypeVar("Result")
Kept = TypeVar("Kept")


def make_database(url: str, *, pool_size: int = 5, pool_timeout_s: float = 30.0) -> Engine:
    """The database at `url`, tuned for the backend: WAL and a busy timeout on SQLite, pre-ping elsewhere.

    A server passes a pool as large as the threads that may hold a connection at once, so a thread
    never waits for a connection that only another waiting request could give back.
    """
    pool = {"pool_size": pool_size, "max_overflow": pool_size, "pool_timeout": pool_timeout_s}
    if url.startswith("sqlite"):
        _ensure_sqlite_folder(url)
        database = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, **pool)
        event.listen(database, "connect", _sqlite_pragmas)
        return database
    return create_engine(url, pool_pre_ping=True, **pool)


def _ensure_sqlite_folder(url: str) -> None:
    path = url.split("///", 1)[-1]
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the API read while the worker writes; the busy timeout absorbs short write locks.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_session_factory(database: Engine) -> sessionmaker[Session]:
    """A session factory whose objects stay readable after commit."""
    return sessionmaker(database, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    with factory() as session, session.begin():
        yield session


def with_retries(
    factory: sessionmaker[Session],
    write: Callable[[Session], Result],
    *,
    timeout_s: float = 180.0,
    first_delay_s: float = 0.25,
) -> Result:
    """Run `write` in its own transaction, retrying while the database is unreachable (a restart).

    Callers make `write` safe to replay: every write after a claim is fenced by the lease, and a
    finalisation that already committed reads back as done.
    """
    deadline = time.monotonic() + timeout_s
    delay = first_delay_s
    while True:
        try:
            with transaction(factory) as session:
                return write(session)
        except (OperationalError, InterfaceError) as error:
            if not is_transient(error) or time.monotonic() + delay > deadline:
                raise
            log.warning("database unavailable (%s); retrying in %.1fs", type(error).__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


TRANSIENT_HINTS = ("connect", "connection", "terminat", "shut down", "locked", "server closed", "timeout")


def is_transient(error: OperationalError | InterfaceError) -> bool:
    """A lost connection or a busy database, worth waiting for; not a schema or SQL mistake."""
    if error.connection_invalidated:
        return True
    return any(hint in str(error.orig).lower() for hint in TRANSIENT_HINTS)


def rowcount(result: QueryResult[Any]) -> int:
    """How many rows an UPDATE matched: the one place that reads the cursor's count."""
    assert isinstance(result, CursorResult)  # what every UPDATE returns
    return result.rowcount


class PerDatabase(Generic[Kept]):
    """One object per process and database, made on first use: a cache the API's threads share.

    Keyed weakly by the Engine, so a disposed database (a test's) takes its object with it.
    """

    def __init__(self, make: Callable[[], Kept]) -> None:
        self._make = make
        self._kept: weakref.WeakKeyDictionary[Engine, Kept] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def of(self, session: Session) -> Kept:
        """The object of the database this session reads."""
        bind = session.get_bind()
        database = bind.engine if isinstance(bind, Connection) else bind
        with self._lock:
            kept = self._kept.get(database)
            if kept is None:
                kept = self._kept[database] = self._make()
            return kept
