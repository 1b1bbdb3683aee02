"""One leader among the API's processes for periodic passes (the reconciler), held as a Redis lease.

With several uvicorn workers every process runs the loop, but only the lease holder does the pass:
two reconcilers would publish the same unpublished job twice. A holder that dies loses the lease
when it expires, and another process takes over at its next tick.
"""

from __future__ import annotations

import logging
import uuid

import redis

log = logging.getLogger(__name__)


class Leadership:
    """A named lease in Redis; `hold()` takes it when free and renews it when ours."""

    def __init__(self, redis_url: str, name: str, ttl_s: float) -> None:
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self._name = name
        self._ttl_ms = int(ttl_s * 1000)
        self._me = uuid.uuid4().hex

    def hold(self) -> bool:
        """Whether this process leads now. A Redis outage counts as leading: passes are idempotent,
        and a reconciler that stops during an outage would leave jobs unpublished after it."""
        try:
            if self._redis.set(self._name, self._me, nx=True, px=self._ttl_ms):
                return True
            if self._redis.get(self._name) == self._me.encode():
                self._redis.pexpire(self._name, self._ttl_ms)
                return True
            return False
        except redis.RedisError as error:
            log.warning("leader lease not checked (%s); running the pass", error)
            return True

    def release(self) -> None:
        """Give the lease up at shutdown, if ours, so another process takes over at once."""
        try:
            if self._redis.get(self._name) == self._me.encode():
                self._redis.delete(self._name)
        except redis.RedisError:
            pass
        self._redis.close()
