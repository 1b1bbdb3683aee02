"""Sending webhook deliveries: claim one attempt, POST it signed to a checked address, record the outcome."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import httpx
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from jobs.db import rowcount, transaction
from jobs.settings import Settings
from jobs.tables import WebhookDelivery
from jobs.webhook_targets import PrivateTarget, TargetRefused, checked_address, pinned_request, signed_headers

MAX_ERROR_CHARS = 500


class DeliveryStatus(StrEnum):
    """Where one webhook delivery is."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"  # every attempt was spent
    REFUSED = "refused"  # the URL pointed at a private address when it was time to send


def due_deliveries(session: Session, *, now: datetime, limit: int) -> list[tuple[str, int]]:
    """Pending deliveries whose time has come, oldest first, with their attempt counts."""
    rows = session.execute(
        select(WebhookDelivery.id, WebhookDelivery.attempts)
        .where(
            WebhookDelivery.status == DeliveryStatus.PENDING,
            or_(WebhookDelivery.next_attempt_at.is_(None), WebhookDelivery.next_attempt_at <= now),
        )
        .order_by(WebhookDelivery.next_attempt_at)
        .limit(limit)
    ).all()
    return [(row.id, row.attempts) for row in rows]


@dataclass(frozen=True)
class Attempt:
    """One claimed attempt at a delivery: what to send, and where."""

    delivery_id: str
    number: int
    url: str
    payload: str


def claim_delivery(
    session: Session, *, delivery_id: str, attempts: int, now: datetime, lease_s: float
) -> Attempt | None:
    """Take one attempt of a delivery with a conditional UPDATE, so two API processes never both send it.

    The attempt is due again after `lease_s` if this process dies while sending.
    """
    result = session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.status == DeliveryStatus.PENDING,
            WebhookDelivery.attempts == attempts,
        )
        .values(attempts=attempts + 1, next_attempt_at=now + timedelta(seconds=lease_s))
        .execution_options(synchronize_session=False)
    )
    if rowcount(result) != 1:
        return None
    row = session.execute(
        select(WebhookDelivery.url, WebhookDelivery.payload).where(WebhookDelivery.id == delivery_id)
    ).one()
    return Attempt(delivery_id=delivery_id, number=attempts + 1, url=row.url, payload=row.payload)


@dataclass(frozen=True)
class Outcome:
    """How one attempt went: the receiver's status code, or why there was none."""

    status_code: int | None = None
    error: str | None = None
    refused: bool = False

    @property
    def delivered(self) -> bool:
        """A 2xx answer."""
        return self.status_code is not None and 200 <= self.status_code < 300


def post_delivery(
    client: httpx.Client, *, attempt: Attempt, secret: str, allow_private: bool, timestamp: int
) -> Outcome:
    """POST the signed payload to the address the URL resolves to now (checked again: DNS can change)."""
    try:
        address = checked_address(attempt.url, allow_private=allow_private)
    except PrivateTarget as error:
        return Outcome(error=str(error), refused=True)
    except TargetRefused as error:
        return Outcome(error=str(error))
    body = attempt.payload.encode()
    headers = signed_headers(body, secret=secret, timestamp=timestamp, delivery_id=attempt.delivery_id)
    try:
        request = pinned_request(client, url=attempt.url, address=address, body=body, headers=headers)
        # Streamed and never read: a receiver's answer body can be as large or slow as it likes.
        response = client.send(request, stream=True)
        response.close()
    except Exception as error:  # any failure to reach a client's URL is that attempt's outcome
        return Outcome(error=f"{type(error).__name__}: {error}"[:MAX_ERROR_CHARS])
    code = response.status_code
    return Outcome(status_code=code, error=None if 200 <= code < 300 else f"HTTP {code}")


def retry_delay_s(
    attempt: int, *, base_s: float, max_s: float, rand: Callable[[], float] = random.random
) -> float:
    """Seconds before the next try: base x 2^(attempt-1), capped, the upper half random to spread senders."""
    ceiling = min(max_s, base_s * 2 ** min(attempt - 1, 32))
    return ceiling / 2 + rand() * ceiling / 2


def outcome_values(outcome: Outcome, *, attempt: int, now: datetime, settings: Settings) -> dict[str, Any]:
    """The columns an attempt's outcome sets: delivered, refused, failed for good, or pending again later."""
    values: dict[str, Any] = {"last_status_code": outcome.status_code, "last_error": outcome.error}
    if outcome.delivered:
        return {**values, "status": DeliveryStatus.DELIVERED, "delivered_at": now, "next_attempt_at": None}
    if outcome.refused:
        return {**values, "status": DeliveryStatus.REFUSED, "next_attempt_at": None}
    if attempt >= settings.webhook_max_attempts:
        return {**values, "status": DeliveryStatus.FAILED, "next_attempt_at": None}
    delay = retry_delay_s(attempt, base_s=settings.webhook_backoff_s, max_s=settings.webhook_backoff_max_s)
    return {**values, "next_attempt_at": now + timedelta(seconds=delay)}


def record_outcome(session: Session, *, delivery_id: str, attempt: int, values: dict[str, Any]) -> None:
    """Store an attempt's outcome, only while that attempt is still the delivery's latest claim."""
    session.execute(
        update(WebhookDelivery)
        .where(
            WebhookDelivery.id == delivery_id,
            WebhookDelivery.attempts == attempt,
            WebhookDelivery.status == DeliveryStatus.PENDING,
        )
        .values(**values)
        .execution_options(synchronize_session=False)
    )


def send_delivery(
    factory: sessionmaker[Session],
    client: httpx.Client,
    *,
    delivery_id: str,
    attempts: int,
    settings: Settings,
    clock: Callable[[], datetime],
) -> Outcome | None:
    """Claim, send and record one attempt; None if another process claimed it first."""
    lease_s = 4 * settings.webhook_timeout_s + 30  # connect, write and read timeouts, plus DNS
    with transaction(factory) as session:
        attempt = claim_delivery(
            session, delivery_id=delivery_id, attempts=attempts, now=clock(), lease_s=lease_s
        )
    if attempt is None:
        return None
    outcome = post_delivery(
        client,
        attempt=attempt,
        secret=settings.webhook_secret or "",
        allow_private=settings.webhook_allow_private,
        timestamp=int(clock().timestamp()),
    )
    values = outcome_values(outcome, attempt=attempt.number, now=clock(), settings=settings)
    with transaction(factory) as session:
        record_outcome(session, delivery_id=delivery_id, attempt=attempt.number, values=values)
    return outcome
