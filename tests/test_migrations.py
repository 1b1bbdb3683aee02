"""Alembic owns the schema: upgrade and downgrade work on PostgreSQL and SQLite."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, inspect

from jobs import migrate
from jobs.tables import Base
from tests.conftest import BACKENDS

TABLES = {"batches", "jobs", "job_stats", "queue_controls", "api_keys", "webhook_deliveries"}


def table_names(url: str) -> set[str]:
    """The tables a database holds, Alembic's own version table aside."""
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


@pytest.mark.parametrize("empty_database_url", BACKENDS, indirect=True)
def test_upgrade_downgrade_upgrade(empty_database_url: str) -> None:
    """head creates every table, base removes them all, and head works again after that."""
    migrate.upgrade(empty_database_url)
    assert table_names(empty_database_url) == TABLES
    migrate.downgrade(empty_database_url)
    assert table_names(empty_database_url) == set()
    migrate.upgrade(empty_database_url)
    assert table_names(empty_database_url) == TABLES


@pytest.mark.parametrize("empty_database_url", BACKENDS, indirect=True)
def test_migrations_match_the_models(empty_database_url: str) -> None:
    """The migrated schema has every column the SQLAlchemy models declare."""
    migrate.upgrade(empty_database_url)
    engine = create_engine(empty_database_url)
    try:
        inspector = inspect(engine)
        for table in Base.metadata.sorted_tables:
            migrated = {column["name"] for column in inspector.get_columns(table.name)}
            assert migrated == {column.name for column in table.columns}, table.name
    finally:
        engine.dispose()
