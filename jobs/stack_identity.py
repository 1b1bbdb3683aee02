"""One stack per broker: the database's stack id, recorded in Redis by the first process that uses it.

Two embedded stacks whose Redis ports collided used to share one broker silently: one stack's worker took
the other's messages, found no such job in its database, skipped them, and those jobs waited minutes for
the reconciler. Every process of a stack now claims the broker for its database's id at start, and a
process of another stack is refused with the reason.
"""

from __future__ import annotations

import json
import logging

import redis
from sqlalchemy import make_url, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from jobs.settings import Settings
from jobs.tables import StackIdentity

log = logging.getLogger(__name__)


class StackConflict(RuntimeError):
    """The broker already serves another stack (another database) on this queue."""


def stack_id(session: Session) -> str:
    """This database's stack id (made by the migrations)."""
    found = session.scalars(select(StackIdentity.id).limit(1)).first()
    if found is None:
        raise RuntimeError("the database has no stack id: run `nightrender migrate`")
    return found


def identity_key(queue_name: str) -> str:
    """The Redis key that names the stack a queue belongs to (deleted with the queue's other keys)."""
    return f"{queue_name}:stack"


def claim_broker(client: redis.Redis, *, queue_name: str, stack: str, database_url: str) -> None:
    """Record this stack as the queue's owner, or raise StackConflict if another stack owns it."""
    key = identity_key(queue_name)
    mine = {"id": stack, "database": make_url(database_url).render_as_string(hide_password=True)}
    if client.set(key, json.dumps(mine), nx=True):
        return
    raw = client.get(key)
    owner = json.loads(raw) if raw else mine
    if owner.get("id") == stack:
        return
    if owner.get("database") == mine["database"]:
        # The same database, made again (a deleted SQLite file, a new volume): the queue is still ours.
        log.warning("queue %r was claimed by an earlier database at this URL; taking it over", queue_name)
        client.set(key, json.dumps(mine))
        return
    raise StackConflict(_conflict_message(client, queue_name, owner.get("database", "?")))


def claim_broker_for(settings: Settings, factory: sessionmaker[Session]) -> None:
    """Claim the configured broker for this database's stack (StackConflict if it serves another).

    A Redis or database that cannot be reached is left for later: the process starts, and waits for
    them as it always has; only a broker known to serve another stack is refused.
    """
    client = redis.Redis.from_url(settings.resolved_redis_url(), socket_timeout=3, socket_connect_timeout=3)
    try:
        with factory() as session:
            stack = stack_id(session)
        url = settings.resolved_database_url()
        claim_broker(client, queue_name=settings.queue_name, stack=stack, database_url=url)
    except (redis.RedisError, SQLAlchemyError) as error:
        log.warning("could not check which stack the broker serves (%s); going on", error)
    finally:
        client.close()


def _conflict_message(client: redis.Redis, queue_name: str, database: str) -> str:
    where = client.connection_pool.connection_kwargs
    return (
        f"the Redis at {where.get('host', '?')}:{where.get('port', '?')} already carries queue "
        f"{queue_name!r} for another nightrender stack (database {database}). Give this stack its own "
        "broker (EMBEDDED_REDIS_PORT or REDIS_URL) or queue (QUEUE_NAME); if that stack is gone for good, "
        f"delete the key {identity_key(queue_name)!r} in that Redis."
    )
