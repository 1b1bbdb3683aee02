"""Limits a client cannot talk its way past: body size while reading, per-key request rates, and
which requests may change state (JSON or multipart, from no foreign web page).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import redis
import redis.asyncio
from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)
RATE_KEY_PREFIX = "nightrender:rate:"
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
ACCEPTED_BODIES = ("application/json", "multipart/form-data")


class BodyTooLarge(HTTPException):
    """A 413 raised from inside `receive`, so it reaches the client whichever code was reading."""

    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=f"request body over the limit of {limit} bytes")


class BodyLimit:
    """ASGI middleware: refuse a body past its route's limit, by Content-Length or while streaming.

    Counting in `receive` covers chunked bodies too: nothing past the limit is ever buffered.
    """

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on with a counting `receive`, or answer 413 at once."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _reject(BodyTooLarge(limit), scope, receive, send)
            return
        await self.app(scope, _counting(receive, limit), send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _counting(receive: Receive, limit: int) -> Receive:
    seen = 0

    async def receive_within_limit() -> Message:
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise BodyTooLarge(limit)
        return message

    return receive_within_limit


async def _reject(error: HTTPException, scope: Scope, receive: Receive, send: Send) -> None:
    response = JSONResponse({"detail": error.detail}, status_code=error.status_code, headers=error.headers)
    await response(scope, receive, send)


class StateChangeGuard:
    """ASGI middleware: a request that changes state must be JSON or multipart, and from no foreign page.

    Browsers send a text/plain or bodiless POST from any page without asking first (no CORS
    preflight); refusing other content types and foreign `Origin`s closes that door, on loopback too.
    """

    def __init__(self, app: ASGIApp, allowed_origins: frozenset[str], routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.allowed_origins = allowed_origins
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse a foreign origin with 403 and any other body type with 415."""
        if scope["type"] != "http" or scope["method"] not in STATE_CHANGING or not self._routed(scope):
            await self.app(scope, receive, send)
            return
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        origin = headers.get("origin")
        if origin is not None and not self._same_or_allowed(origin, headers.get("host", ""), scope):
            await _reject(
                HTTPException(403, f"requests from origin {origin[:100]!r} are refused"), scope, receive, send
            )
            return
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in ACCEPTED_BODIES:
            shown = content_type[:100] or "none"
            detail = f"send application/json or multipart/form-data (Content-Type was {shown})"
            await _reject(HTTPException(415, detail), scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _routed(self, scope: Scope) -> bool:
        # Only a request that reaches a route is judged; others get the router's own 404 or 405.
        return any(route.matches(scope)[0] == Match.FULL for route in self.routes)

    def _same_or_allowed(self, origin: str, host: str, scope: Scope) -> bool:
        own = f"{scope.get('scheme', 'http')}://{host}"
        return origin == own or origin in self.allowed_origins


class RateLimiter:
    """Requests per minute per owner, counted in Redis so every API process shares the count.

    A fixed one-minute window: simple and cheap (one pipelined INCR), at worst twice the rate across a
    window's edge. If Redis is down the limit is not applied: an outage must not lock clients out.
    """

    def __init__(self, redis_url: str, per_minute: int) -> None:
        self.per_minute = per_minute
        self._redis_url = redis_url
        self._redis: redis.asyncio.Redis | None = None  # made on the event loop that uses it

    async def check(self, owner: str) -> None:
        """Raise 429 with Retry-After once `owner` has used this minute's requests."""
        if self.per_minute <= 0:
            return
        window = int(time.time() // 60)
        try:
            used = await self._count(f"{RATE_KEY_PREFIX}{owner}:{window}")
        except redis.RedisError as error:
            log.warning("rate limit not applied, Redis did not answer: %s", error)
            return
        if used > self.per_minute:
            retry_after = max(1, 60 - int(time.time()) % 60)
            raise HTTPException(
                status_code=429,
                detail=f"over {self.per_minute} requests a minute for this key; retry in {retry_after} s",
                headers={"Retry-After": str(retry_after)},
            )

    async def _count(self, key: str) -> int:
        if self._redis is None:
            self._redis = redis.asyncio.Redis.from_url(
                self._redis_url, socket_timeout=0.5, socket_connect_timeout=0.5
            )
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.incr(key)
            pipe.expire(key, 120)
            used, _ = await pipe.execute()
        return int(used)

    async def close(self) -> None:
        """Release the Redis connections."""
        if self._redis is not None:
            await self._redis.aclose()
