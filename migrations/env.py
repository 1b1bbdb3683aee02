"""Alembic environment: the only place the schema is created or changed."""

from __future__ import annotations

from alembic import context

from jobs.db import make_database
from jobs.settings import get_settings
from jobs.tables import Base

config = context.config
target_metadata = Base.metadata


def database_url() -> str:
    """The URL given by `nightrender migrate` or the environment."""
    return config.get_main_option("sqlalchemy.url") or get_settings().resolved_database_url()


def run_offline() -> None:
    """Emit SQL without a connection."""
    context.configure(url=database_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    """Apply migrations over a real connection; batch mode lets SQLite alter tables."""
    engine = make_database(database_url())
    with engine.connect() as connection:
        context.configure(
            connection=connection, target_metadata=target_metadata, render_as_batch=True
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
