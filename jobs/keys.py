"""API keys: issued once in clear, stored as SHA-256 hashes, revoked by name."""

from __future__ import annotations

import hashlib
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from jobs.db import rowcount
from jobs.tables import ApiKey, utcnow

KEY_PREFIX = "nr_"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,99}$")


class KeyCommandError(ValueError):
    """A key command that cannot be done (a bad or taken name, an unknown key)."""


@dataclass(frozen=True)
class KeyInfo:
    """A key as listed: never the key itself, which exists only in the client's hands."""

    id: str
    name: str
    admin: bool
    created_at: datetime
    revoked_at: datetime | None


def hash_key(key: str) -> str:
    """The stored form of a key. Keys are 256 random bits, so a fast hash is enough: nothing to guess."""
    return hashlib.sha256(key.encode()).hexdigest()


def add_key(session: Session, *, name: str, admin: bool = False) -> str:
    """Create a key named `name` and return it in clear, the only time it is ever seen."""
    if not NAME_PATTERN.match(name):
        raise KeyCommandError(f"invalid key name {name!r}: use letters, digits and . _ @ - (at most 100)")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(id=str(uuid.uuid4()), name=name, key_hash=hash_key(key), admin=admin))
    try:
        session.flush()
    except IntegrityError:
        raise KeyCommandError(f"a key named {name!r} exists already (revoked names stay taken)") from None
    return key


def list_keys(session: Session) -> list[KeyInfo]:
    """Every key, active and revoked, oldest first."""
    rows = session.scalars(select(ApiKey).order_by(ApiKey.created_at, ApiKey.name)).all()
    return [KeyInfo(r.id, r.name, r.admin, r.created_at, r.revoked_at) for r in rows]


def revoke_key(session: Session, *, name: str) -> None:
    """Revoke the key named `name`; its batches stay, readable by no other key."""
    revoked = session.execute(
        update(ApiKey).where(ApiKey.name == name, ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow())
    )
    if rowcount(revoked) != 1:
        raise KeyCommandError(f"no active key named {name!r}")


def active_keys(session: Session) -> list[ApiKey]:
    """The keys that authenticate requests now."""
    return list(session.scalars(select(ApiKey).where(ApiKey.revoked_at.is_(None))).all())
