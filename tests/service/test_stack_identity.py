"""One stack per broker: each database's stack id is claimed in Redis, and another stack's process is refused.

Two stacks that shared a broker used to take each other's messages and skip them, so their jobs waited
minutes for the reconciler.
"""

from __future__ import annotations

import re

import pytest
import redis

from jobs.db import make_database, make_session_factory
from jobs.settings import Settings
from jobs.stack_identity import StackConflict, claim_broker, claim_broker_for, identity_key, stack_id
from tests.conftest import REDIS_URL, local_client

pytestmark = pytest.mark.parametrize("empty_database_url", ["sqlite"], indirect=True)


def own_stack_id(settings: Settings) -> str:
    """The id the migrations gave the test's database."""
    database = make_database(settings.resolved_database_url())
    try:
        with make_session_factory(database)() as session:
            return stack_id(session)
    finally:
        database.dispose()


def test_the_same_stack_claims_its_broker_again_and_another_is_refused(settings: Settings) -> None:
    client = redis.Redis.from_url(REDIS_URL)
    mine = own_stack_id(settings)
    for _ in range(2):  # every process of the stack claims it at start
        claim_broker(client, queue_name=settings.queue_name, stack=mine, database_url="sqlite:///a.db")
    with pytest.raises(StackConflict) as refused:
        claim_broker(
            client,
            queue_name=settings.queue_name,
            stack="another",
            database_url="postgresql+psycopg://u:secret@db/other",
        )
    message = str(refused.value)
    assert "another nightrender stack (database sqlite:///a.db)" in message
    assert "EMBEDDED_REDIS_PORT or REDIS_URL" in message and identity_key(settings.queue_name) in message
    claim_broker(client, queue_name=f"{settings.queue_name}-other", stack="another", database_url="x://")
    client.delete(identity_key(f"{settings.queue_name}-other"))


def test_the_api_of_another_stack_refuses_to_start_and_stores_nothing(settings: Settings) -> None:
    from api.app import create_app

    client = redis.Redis.from_url(REDIS_URL)
    claim_broker(client, queue_name=settings.queue_name, stack="another", database_url="sqlite:///b.db")
    with (
        pytest.raises(StackConflict, match=re.escape("(database sqlite:///b.db)")),
        local_client(create_app(settings, reconcile=False)),
    ):
        pass
    assert client.llen(settings.queue_name) == 0


def test_the_api_of_the_stack_itself_starts_and_records_its_claim(settings: Settings) -> None:
    from api.app import create_app

    with local_client(create_app(settings, reconcile=False)) as api:
        assert api.get("/healthz").status_code == 200
    recorded = redis.Redis.from_url(REDIS_URL).get(identity_key(settings.queue_name))
    assert recorded is not None and own_stack_id(settings).encode() in recorded


def test_an_unreachable_broker_is_left_for_later(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    away = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    database = make_database(away.resolved_database_url())
    try:
        claim_broker_for(away, make_session_factory(database))  # no raise: the process waits for Redis
    finally:
        database.dispose()
    assert "could not check which stack the broker serves" in caplog.text


def test_a_database_made_again_at_the_same_url_takes_its_queue_back(settings: Settings) -> None:
    """A deleted SQLite file (or a new volume) gets a new stack id; its own broker must not refuse it."""
    client = redis.Redis.from_url(REDIS_URL)
    url = settings.resolved_database_url()
    claim_broker(client, queue_name=settings.queue_name, stack="the-earlier-database", database_url=url)
    claim_broker(client, queue_name=settings.queue_name, stack=own_stack_id(settings), database_url=url)
    recorded = client.get(identity_key(settings.queue_name))
    assert recorded is not None and own_stack_id(settings).encode() in recorded
