"""Who is calling: an API key's owner, or the local user when no keys exist (loopback only).

Keys are read from SQL at most every `API_KEY_CACHE_S` seconds, so a request costs no query and a
revoked key stops working within that time.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from dataclasses import dataclass
from typing import Annotated

import anyio
from fastapi import Depends, HTTPException, Request
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from api.limits import RateLimiter
from jobs.keys import active_keys, hash_key
from jobs.tables import LOCAL_OWNER

log = logging.getLogger(__name__)
LOOPBACK_NAMES = frozenset({"localhost"})


@dataclass(frozen=True)
class Caller:
    """The owner a request acts for: a key's id, or LOCAL_OWNER for the loopback user without keys."""

    owner: str
    name: str
    admin: bool

    @property
    def local(self) -> bool:
        """Whether this is the keyless loopback user (who has no rate limit)."""
        return self.owner == LOCAL_OWNER


LOCAL_CALLER = Caller(owner=LOCAL_OWNER, name="local", admin=True)


class KeyRing:
    """The active keys by hash, refreshed from SQL at most every `max_age_s`."""

    def __init__(self, factory: sessionmaker[Session], max_age_s: float) -> None:
        self._factory = factory
        self._max_age_s = max_age_s
        self._callers: dict[str, Caller] = {}
        self._read_at = float("-inf")
        self._lock = threading.Lock()
        self.ready = False

    def stale(self) -> bool:
        """Whether the next lookup should read SQL first."""
        return time.monotonic() - self._read_at > self._max_age_s

    def refresh(self) -> None:
        """Read the active keys (one thread at a time; the others keep using the last read)."""
        # Until the first read succeeds everyone waits for it; after that, a stale list is fine.
        if not self._lock.acquire(blocking=not self.ready):
            return
        try:
            with self._factory() as session:
                keys = active_keys(session)
            self._callers = {k.key_hash: Caller(owner=k.id, name=k.name, admin=k.admin) for k in keys}
            self.ready = True
        except SQLAlchemyError:
            if not self.ready:
                raise
            # Keep serving the keys last read through a database blip; try again next window.
            log.warning("could not re-read API keys; using the list read before", exc_info=True)
        finally:
            self._read_at = time.monotonic()
            self._lock.release()

    def any(self) -> bool:
        """Whether any key is active: if not, only loopback clients are served."""
        return bool(self._callers)

    def find(self, key: str) -> Caller | None:
        """The caller a presented key belongs to."""
        return self._callers.get(hash_key(key))


def is_loopback(host: str | None) -> bool:
    """Whether an address or host name is this machine."""
    if not host:
        return False
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def unauthorized(reason: str) -> HTTPException:
    """A 401 that tells the client which scheme to use."""
    return HTTPException(status_code=401, detail=reason, headers={"WWW-Authenticate": "Bearer"})


async def get_caller(request: Request) -> Caller:
    """Authenticate the request, then apply its owner's rate limit."""
    ring: KeyRing = request.app.state.key_ring
    if ring.stale():
        try:
            await anyio.to_thread.run_sync(ring.refresh)
        except SQLAlchemyError:
            raise HTTPException(
                status_code=503, detail="the database did not answer", headers={"Retry-After": "1"}
            ) from None
    caller = _keyed_caller(ring, request) if ring.any() else _local_caller(request)
    limiter: RateLimiter = request.app.state.rate_limiter
    if not caller.local:
        await limiter.check(caller.owner)
    return caller


def _keyed_caller(ring: KeyRing, request: Request) -> Caller:
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise unauthorized("this API needs a key: send 'Authorization: Bearer <key>'")
    caller = ring.find(key.strip())
    if caller is None:
        raise unauthorized("unknown or revoked API key")
    return caller


def _local_caller(request: Request) -> Caller:
    # With no keys, the API trusts only this machine. The Host check stops DNS rebinding: a page on
    # another site that resolves its own name to 127.0.0.1 still sends its own name as Host.
    client = request.client.host if request.client else None
    host = request.url.hostname
    if not is_loopback(client) or not is_loopback(host):
        raise HTTPException(
            status_code=403,
            detail="no API keys exist, so only loopback clients are served; "
            "create one with `nightrender keys add NAME`",
        )
    return LOCAL_CALLER


async def get_admin(caller: Annotated[Caller, Depends(get_caller)]) -> Caller:
    """A caller allowed to control the queue."""
    if not caller.admin:
        raise HTTPException(
            status_code=403, detail="this needs an admin key (`nightrender keys add NAME --admin`)"
        )
    return caller


CallerDep = Annotated[Caller, Depends(get_caller)]
AdminDep = Annotated[Caller, Depends(get_admin)]
