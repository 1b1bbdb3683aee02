"""Batch webhooks: each time a batch finishes, a signed summary is POSTed to its `webhook_url`.

A pass records one `webhook_deliveries` row per finish (the unique (batch, sequence) pair makes that
idempotent across API processes), then sends the rows that are due, with retries and backoff.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import anyio
import httpx
from sqlalchemy import exists, func, select, union
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased, sessionmaker

from jobs.db import transaction
from jobs.settings import Settings
from jobs.states import ACTIVE, batch_status
from jobs.superseded import not_superseded
from jobs.tables import Batch, Job, WebhookDelivery, utcnow
from jobs.views import batch_counts
from jobs.webhook_sending import DeliveryStatus, due_deliveries, send_delivery
from jobs.webhook_targets import TargetRefused, checked_address

log = logging.getLogger(__name__)
# A batch with a webhook that has not finished yet (or whose first finish is not recorded yet).
WAITING: dict[str, Any] = {
    "status": "waiting",
    "sequence": None,
    "attempts": 0,
    "last_status_code": None,
    "last_error": None,
    "delivered_at": None,
    "next_attempt_at": None,
}


@dataclass(frozen=True)
class WebhookReport:
    """What one pass did."""

    recorded: int
    attempted: int
    delivered: int


def webhook_refusal(url: str | None, *, settings: Settings) -> str | None:
    """Why a batch may not carry this webhook URL (no secret to sign with, no public address), or None."""
    if url is None:
        return None
    if not settings.webhook_secret:
        return "webhooks are off on this server: its operator must set WEBHOOK_SECRET to sign them"
    try:
        checked_address(url, allow_private=settings.webhook_allow_private)
    except TargetRefused as error:
        return str(error)
    return None


async def webhook_refusal_off_loop(url: str | None, *, settings: Settings) -> str | None:
    """`webhook_refusal` in a worker thread (name resolution blocks); no thread hop without a URL."""
    if url is None:
        return None
    return await anyio.to_thread.run_sync(lambda: webhook_refusal(url, settings=settings))


def finished_batches(session: Session, *, limit: int) -> list[str]:
    """Batches with a webhook whose current finish has no delivery row yet.

    Two small sets, never a count over every batch's jobs: batches with no delivery yet (they stop
    matching once their first finish is recorded), and batches with retried jobs, found through the
    index on `retry_of`, whose current sequence is past their last delivery's.
    """
    active = exists().where(Job.batch_id == Batch.id, Job.status.in_(ACTIVE))
    never_recorded = select(Batch.id).where(
        Batch.webhook_url.is_not(None), ~exists().where(WebhookDelivery.batch_id == Batch.id), ~active
    )
    retry = aliased(Job)
    last_sequence = (
        select(func.coalesce(func.max(WebhookDelivery.sequence), 0))
        .where(WebhookDelivery.batch_id == Batch.id)
        .scalar_subquery()
    )
    refinished = (
        select(Batch.id)
        .join(retry, retry.batch_id == Batch.id)
        # A range rather than IS NOT NULL: SQLite, with no statistics, uses the index only for a range.
        .where(retry.retry_of > "", Batch.webhook_url.is_not(None))
        .group_by(Batch.id)
        .having(func.count() + 1 > last_sequence, ~active)
    )
    return list(session.scalars(union(never_recorded, refinished).limit(limit)))


def finish_sequence(session: Session, *, batch_id: str) -> int:
    """Which finish of the batch this is: 1, then 1 + its retried job rows (it only grows; gaps happen)."""
    retried = session.scalar(
        select(func.count()).select_from(Job).where(Job.batch_id == batch_id, Job.retry_of.is_not(None))
    )
    return 1 + int(retried or 0)


def finish_payload(session: Session, *, batch: Batch, sequence: int) -> dict[str, Any] | None:
    """The summary a receiver gets, or None while the batch still has work to do."""
    counts = batch_counts(session, batch.id)
    status = batch_status(counts)
    if status in ACTIVE:
        return None
    finished_at = session.scalar(
        select(func.max(Job.finished_at)).where(Job.batch_id == batch.id, not_superseded())
    )
    return {
        "event": "batch.finished",
        "batch_id": batch.id,
        "sequence": sequence,
        "status": status.value,
        "total": batch.total_jobs,
        "counts": counts,
        "finished_at": finished_at.isoformat() if finished_at else None,
        "archive_path": f"/v1/batches/{batch.id}/archive",
    }


def record_finish(factory: sessionmaker[Session], *, batch_id: str, now: datetime) -> bool:
    """Record a pending delivery for the batch's current finish; False if unfinished or already recorded."""
    try:
        with transaction(factory) as session:
            batch = session.get(Batch, batch_id)
            if batch is None or batch.webhook_url is None:
                return False
            # The sequence is read before the counts: a retry committed in between shows up as
            # active jobs (no row now), never as an old finish filed under the new sequence.
            sequence = finish_sequence(session, batch_id=batch_id)
            payload = finish_payload(session, batch=batch, sequence=sequence)
            if payload is None:
                return False
            session.add(_new_delivery(batch, sequence, payload, now))
    except IntegrityError:
        return False  # another API process recorded this finish first
    return True


def _new_delivery(batch: Batch, sequence: int, payload: dict[str, Any], now: datetime) -> WebhookDelivery:
    return WebhookDelivery(
        id=str(uuid.uuid4()),
        batch_id=batch.id,
        sequence=sequence,
        url=batch.webhook_url,
        payload=json.dumps(payload, separators=(",", ":")),
        status=DeliveryStatus.PENDING,
        attempts=0,
        next_attempt_at=now,
        created_at=now,
    )


def record_finished(factory: sessionmaker[Session], *, limit: int, now: datetime) -> int:
    """Record a delivery for each batch that finished since its last one; returns how many."""
    with factory() as session:
        batch_ids = finished_batches(session, limit=limit)
    return sum(record_finish(factory, batch_id=batch_id, now=now) for batch_id in batch_ids)


def webhook_pass(
    factory: sessionmaker[Session],
    client: httpx.Client,
    *,
    settings: Settings,
    clock: Callable[[], datetime] = utcnow,
) -> WebhookReport:
    """Record new finishes, then make at most WEBHOOK_PER_PASS due attempts, one request each."""
    recorded = record_finished(factory, limit=settings.webhook_per_pass, now=clock())
    if not settings.webhook_secret:
        return WebhookReport(recorded=recorded, attempted=0, delivered=0)
    with factory() as session:
        due = due_deliveries(session, now=clock(), limit=settings.webhook_per_pass)
    outcomes = [
        send_delivery(factory, client, delivery_id=d, attempts=n, settings=settings, clock=clock)
        for d, n in due
    ]
    sent = [outcome for outcome in outcomes if outcome is not None]
    report = WebhookReport(recorded, len(sent), sum(outcome.delivered for outcome in sent))
    if recorded or sent:
        log.info("webhooks: %s", report)
    return report


def webhook_client(settings: Settings) -> httpx.Client:
    """The HTTP client webhooks go out on: no redirects, no proxy from the environment, no kept-alive
    connections. Each would let a request reach an address, or a TLS session, other than the one checked.
    """
    return httpx.Client(
        timeout=settings.webhook_timeout_s,
        follow_redirects=False,
        trust_env=False,
        limits=httpx.Limits(max_keepalive_connections=0),
        headers={"User-Agent": "nightrender-webhooks/0.1"},
    )


def run_webhook_loop(factory: sessionmaker[Session], *, settings: Settings, stop: threading.Event) -> None:
    """Passes every WEBHOOK_INTERVAL_S until `stop` is set; an error is logged and the loop goes on."""
    with webhook_client(settings) as client:
        while not stop.is_set():
            try:
                webhook_pass(factory, client, settings=settings)
            except Exception:  # a database outage or a bad row must not end deliveries for good
                log.exception("webhook pass failed")
            stop.wait(settings.webhook_interval_s)


def start_webhook_loop(
    factory: sessionmaker[Session], *, settings: Settings, stop: threading.Event
) -> threading.Thread | None:
    """Start the loop in a daemon thread; without WEBHOOK_SECRET no batch can carry a webhook, so none."""
    if not settings.webhook_secret:
        return None
    thread = threading.Thread(
        target=run_webhook_loop,
        args=(factory,),
        kwargs={"settings": settings, "stop": stop},
        name="webhooks",
        daemon=True,
    )
    thread.start()
    return thread


def webhook_status(session: Session, *, batch: Batch) -> dict[str, Any] | None:
    """The batch's webhook as `GET /v1/batches/{id}` shows it: its last delivery, or waiting; None if none."""
    if batch.webhook_url is None:
        return None
    last = session.scalars(
        select(WebhookDelivery)
        .where(WebhookDelivery.batch_id == batch.id)
        .order_by(WebhookDelivery.sequence.desc())
        .limit(1)
    ).first()
    if last is None:
        return dict(WAITING)
    return {
        "status": last.status,
        "sequence": last.sequence,
        "attempts": last.attempts,
        "last_status_code": last.last_status_code,
        "last_error": last.last_error,
        "delivered_at": last.delivered_at.isoformat() if last.delivered_at else None,
        "next_attempt_at": last.next_attempt_at.isoformat() if last.next_attempt_at else None,
    }
