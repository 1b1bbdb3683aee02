"""Cursor pagination: a batch's jobs in submission order, and batches newest first.

A cursor is opaque to clients: the keyset of the last row a page returned, tagged with the list it
belongs to, in URL-safe base64. Each page is one indexed query (plus one grouped count for batches).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, func, or_, select
from sqlalchemy.orm import Session

from jobs.states import JobStatus, batch_status
from jobs.superseded import not_superseded
from jobs.tables import Batch, Job

JOBS_LIST = "j"
MAX_INDEX = 2**31  # batch_index is a 32-bit integer column
BATCHES_LIST = "b"


class BadCursor(ValueError):
    """A cursor this API did not issue, or one issued for another list."""


@dataclass(frozen=True)
class Page:
    """One page of a list, and the cursor of the next page (None on the last one)."""

    items: list[dict[str, Any]]
    next_cursor: str | None


def encode_cursor(tag: str, *keys: str | int) -> str:
    """An opaque cursor for the page after the row with these keys."""
    raw = json.dumps([tag, *keys], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(token: str, tag: str, types: tuple[type, ...]) -> list[Any]:
    """The keys a cursor holds, checked against the list's tag and key types."""
    try:
        parts = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError):
        raise BadCursor("not a cursor this API issued") from None
    if not isinstance(parts, list) or len(parts) != len(types) + 1 or parts[0] != tag:
        raise BadCursor("not a cursor of this list")
    keys = parts[1:]
    # bool is an int subclass: a crafted `true` is refused too.
    if any(type(key) is not kind for key, kind in zip(keys, types, strict=True)):
        raise BadCursor("not a cursor of this list")
    return keys


def batch_jobs_page(session: Session, *, batch_id: str, limit: int, cursor: str | None) -> Page:
    """The batch's jobs after the cursor, in submission order, each with its failure reason."""
    after = decode_cursor(cursor, JOBS_LIST, (int,))[0] if cursor else -1
    if not -1 <= after < MAX_INDEX:
        raise BadCursor("not a cursor this API issued")  # a crafted index must not reach the driver
    columns = (Job.id, Job.batch_index, Job.status, Job.prompt, Job.seed, Job.width, Job.height, Job.error)
    rows = session.execute(
        select(*columns)
        .where(Job.batch_id == batch_id, Job.batch_index > after, not_superseded())
        .order_by(Job.batch_index)
        .limit(limit + 1)
    ).all()
    items = [row._asdict() for row in rows[:limit]]
    more = len(rows) > limit
    return Page(items, encode_cursor(JOBS_LIST, items[-1]["batch_index"]) if more else None)


def batches_page(
    session: Session, *, limit: int, cursor: str | None, scope: Sequence[ColumnElement[bool]] = ()
) -> Page:
    """Batches newest first after the cursor, with counts per state; `scope` narrows them (the owner)."""
    query = select(Batch).where(*scope).order_by(Batch.created_at.desc(), Batch.id.desc())
    if cursor:
        created, batch_id = decode_cursor(cursor, BATCHES_LIST, (str, str))
        query = query.where(_older_than(_timestamp(created), batch_id))
    batches = session.scalars(query.limit(limit + 1)).all()
    page = batches[:limit]
    counts = _counts_by_batch(session, [batch.id for batch in page])
    items = [_batch_row(batch, counts[batch.id]) for batch in page]
    if len(batches) <= limit:
        return Page(items, None)
    return Page(items, encode_cursor(BATCHES_LIST, page[-1].created_at.isoformat(), page[-1].id))


def _timestamp(text: str) -> datetime:
    """A cursor's creation time, in UTC as stored (cursors always carry an offset)."""
    try:
        moment = datetime.fromisoformat(text)
        if moment.tzinfo is None:
            raise ValueError("no offset")
        return moment.astimezone(UTC)
    except (ValueError, OverflowError):  # OverflowError: year 1 moved west of UTC
        raise BadCursor("not a cursor this API issued") from None


def _older_than(created: datetime, batch_id: str) -> ColumnElement[bool]:
    """Rows after (created, batch_id) in newest-first order."""
    return or_(Batch.created_at < created, and_(Batch.created_at == created, Batch.id < batch_id))


def _counts_by_batch(session: Session, batch_ids: list[str]) -> dict[str, dict[str, int]]:
    """Jobs per state of each batch, every state listed, in one grouped query."""
    counts = {batch_id: {status.value: 0 for status in JobStatus} for batch_id in batch_ids}
    if not batch_ids:
        return counts
    rows = session.execute(
        select(Job.batch_id, Job.status, func.count())
        .where(Job.batch_id.in_(batch_ids), not_superseded())
        .group_by(Job.batch_id, Job.status)
    ).all()
    for batch_id, status, n in rows:
        counts[str(batch_id)][status] = int(n)
    return counts


def _batch_row(batch: Batch, counts: dict[str, int]) -> dict[str, Any]:
    return {
        "id": batch.id,
        "created_at": batch.created_at.isoformat(),
        "total": batch.total_jobs,
        "priority": batch.priority,
        "status": batch_status(counts).value,
        "counts": counts,
    }
