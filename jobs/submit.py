"""Submitting work: rows are committed first, then published; the reconciler covers failed publishes."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from jobs.db import transaction
from jobs.params import GenerationParams
from jobs.queue import Publication, Publisher
from jobs.tables import Batch, Job, utcnow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Submission:
    """What a client gets back: the batch (if any) and its job ids, in submission order."""

    batch_id: str | None
    job_ids: list[str]
    created: bool
    priority: int = 0

    def publications(self) -> list[Publication]:
        """The wake-up messages this submission needs."""
        return [Publication(job_id=job_id, priority=self.priority) for job_id in self.job_ids]


def job_row(params: GenerationParams, *, priority: int, max_attempts: int, batch_index: int = 0) -> dict:
    """The column values of a new queued job."""
    return {
        **params.model_dump(),
        "id": str(uuid.uuid4()),
        "batch_index": batch_index,
        "priority": priority,
        "max_attempts": max_attempts,
        "status": "queued",
        "attempts": 0,
        "cancel_requested": False,
        "progress_step": 0,
        "created_at": utcnow(),
    }


def insert_batch(
    session: Session,
    *,
    params: Sequence[GenerationParams],
    priority: int,
    max_attempts: int,
    idempotency_key: str | None = None,
) -> Submission:
    """Insert a batch and all its jobs in the caller's transaction."""
    batch_id = str(uuid.uuid4())
    session.add(
        Batch(id=batch_id, total_jobs=len(params), priority=priority, idempotency_key=idempotency_key)
    )
    session.flush()
    rows = [
        {**job_row(p, priority=priority, max_attempts=max_attempts, batch_index=i), "batch_id": batch_id}
        for i, p in enumerate(params)
    ]
    session.execute(insert(Job), rows)
    return Submission(batch_id=batch_id, job_ids=[row["id"] for row in rows], created=True, priority=priority)


def insert_job(
    session: Session,
    *,
    params: GenerationParams,
    priority: int,
    max_attempts: int,
    idempotency_key: str | None = None,
) -> Submission:
    """Insert one job outside any batch in the caller's transaction."""
    row = {
        **job_row(params, priority=priority, max_attempts=max_attempts),
        "idempotency_key": idempotency_key,
    }
    session.execute(insert(Job), [row])
    return Submission(batch_id=None, job_ids=[row["id"]], created=True, priority=priority)


def existing_batch(session: Session, idempotency_key: str) -> Submission | None:
    """The batch an earlier request with this key created, if any."""
    batch = session.scalar(select(Batch).where(Batch.idempotency_key == idempotency_key))
    if batch is None:
        return None
    ids = session.scalars(select(Job.id).where(Job.batch_id == batch.id).order_by(Job.batch_index)).all()
    return Submission(batch_id=batch.id, job_ids=list(ids), created=False)


def existing_job(session: Session, idempotency_key: str) -> Submission | None:
    """The job an earlier request with this key created, if any."""
    job_id = session.scalar(select(Job.id).where(Job.idempotency_key == idempotency_key))
    return Submission(batch_id=None, job_ids=[job_id], created=False) if job_id else None


def publish_jobs(
    factory: sessionmaker[Session], publisher: Publisher, publications: Sequence[Publication]
) -> int:
    """Publish committed jobs and stamp them; a broker error leaves them for the reconciler."""
    try:
        sent = publisher.publish(publications)
    except Exception:  # the broker is down: rows stay queued and unpublished, nothing is lost
        log.exception("publishing %d jobs failed; the reconciler will retry", len(publications))
        return 0
    mark_published(factory, sent)
    return len(sent)


def mark_published(factory: sessionmaker[Session], job_ids: Sequence[str]) -> None:
    """Record when jobs were last published, in chunks that fit any driver's parameter limit."""
    now = utcnow()
    with transaction(factory) as session:
        for start in range(0, len(job_ids), 500):
            chunk = list(job_ids[start : start + 500])
            session.execute(update(Job).where(Job.id.in_(chunk)).values(published_at=now))


def submit_batch(
    factory: sessionmaker[Session],
    publisher: Publisher,
    *,
    params: Sequence[GenerationParams],
    priority: int,
    max_attempts: int,
    idempotency_key: str | None = None,
) -> Submission:
    """Commit a batch (or find the one this key already made), then publish its jobs."""
    return _submit(
        factory,
        publisher,
        find=lambda s: existing_batch(s, idempotency_key) if idempotency_key else None,
        insert=lambda s: insert_batch(
            s, params=params, priority=priority, max_attempts=max_attempts, idempotency_key=idempotency_key
        ),
    )


def submit_job(
    factory: sessionmaker[Session],
    publisher: Publisher,
    *,
    params: GenerationParams,
    priority: int,
    max_attempts: int,
    idempotency_key: str | None = None,
) -> Submission:
    """Commit one job (or find the one this key already made), then publish it."""
    return _submit(
        factory,
        publisher,
        find=lambda s: existing_job(s, idempotency_key) if idempotency_key else None,
        insert=lambda s: insert_job(
            s, params=params, priority=priority, max_attempts=max_attempts, idempotency_key=idempotency_key
        ),
    )


def _submit(
    factory: sessionmaker[Session],
    publisher: Publisher,
    *,
    find: Callable[[Session], Submission | None],
    insert: Callable[[Session], Submission],
) -> Submission:
    try:
        with transaction(factory) as session:
            submission = find(session) or insert(session)
    except IntegrityError:
        # A concurrent request with the same Idempotency-Key won the insert: return its rows.
        with factory() as session:
            found = find(session)
        if found is None:
            raise
        return found
    if submission.created:
        publish_jobs(factory, publisher, submission.publications())
    return submission
