"""The reconciler: SQL is the truth, so anything Redis or a dead worker lost is found here and redone."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from jobs.controls import is_paused
from jobs.db import transaction
from jobs.lifecycle import cancel_stale, fail_stale, mark_lost, requeue_stale
from jobs.queue import Publication, Publisher
from jobs.states import JobStatus
from jobs.submit import publish_jobs
from jobs.tables import Job, utcnow

log = logging.getLogger(__name__)
REPUBLISH_CHUNK = 1000


@dataclass(frozen=True)
class ReconcileReport:
    """What one pass did."""

    requeued: int
    failed: int
    republished: int
    rerouted: int = 0  # of the republished: jobs whose message waited in the old single queue


def recover_stale_running(session: Session, *, stale_after_s: float) -> tuple[int, int]:
    """Running jobs whose heartbeat stopped go back to the queue, or fail once their attempts are spent."""
    silent_since = utcnow() - timedelta(seconds=stale_after_s)
    # Cancelled first: a lost job whose cancel was requested could never be claimed again.
    cancel_stale(session, silent_since=silent_since)
    failed = fail_stale(session, silent_since=silent_since)
    requeued = requeue_stale(session, silent_since=silent_since)
    return requeued, failed


def mark_lost_messages(session: Session, *, live: set[str], older_than_s: float) -> int:
    """Queued jobs published long ago whose message is gone (Redis lost it): mark them unpublished."""
    cutoff = utcnow() - timedelta(seconds=older_than_s)
    candidates = session.scalars(
        select(Job.id).where(Job.status == JobStatus.QUEUED, Job.published_at < cutoff)
    ).all()
    lost = [job_id for job_id in candidates if job_id not in live]
    mark_lost(session, job_ids=lost)
    return len(lost)


def reroute_legacy_messages(factory: sessionmaker[Session], publisher: Publisher) -> int:
    """Jobs whose message waits in the single queue of versions before one queue per model: marked
    unpublished, so this pass publishes them to their model's queue (nobody consumes the old one).

    The old queue's lists are deleted first: a crash before the mark only delays those jobs until the
    lost-message check finds them. A job that already has a message in its model's queue, or one a
    worker holds unacknowledged, is left alone, so it never gets a second one.
    """
    try:
        drained = publisher.drain_legacy_queue()
    except Exception as error:  # the broker is down: nothing can be published this pass either
        log.warning("reconciler: the old single queue could not be read: %s", error)
        return 0
    if not drained:
        return 0
    with factory() as session:
        live = publisher.live_job_ids(queued_models(session))
    with transaction(factory) as session:
        # mark_lost changes queued jobs only: a finished or cancelled job's stale message is just dropped.
        rerouted = mark_lost(session, job_ids=[job_id for job_id in drained if job_id not in live])
    log.info("reconciler: %d messages left in the old single queue; %d jobs rerouted", len(drained), rerouted)
    return rerouted


def queued_models(session: Session) -> set[str]:
    """The models of the queued jobs: the queues their messages wait in."""
    return set(session.scalars(select(Job.model).where(Job.status == JobStatus.QUEUED).distinct()))


def unpublished_jobs(session: Session, *, limit: int) -> list[Publication]:
    """Queued jobs with no message sent yet (publishing failed, or they were requeued)."""
    rows = session.execute(
        select(Job.id, Job.priority, Job.model)
        .where(Job.status == JobStatus.QUEUED, Job.published_at.is_(None))
        .order_by(Job.priority.desc(), Job.created_at, Job.batch_index)
        .limit(limit)
    ).all()
    return [Publication(job_id=row.id, priority=row.priority, model=row.model) for row in rows]


def reconcile_once(
    factory: sessionmaker[Session],
    publisher: Publisher,
    *,
    stale_after_s: float,
    republish_after_s: float | None = None,
) -> ReconcileReport:
    """One pass: recover stale jobs, reroute the old single queue, find lost messages, then publish whatever
    has no message.

    Nothing is published while the queue is paused; resuming runs a pass at once.
    """
    with transaction(factory) as session:
        requeued, failed = recover_stale_running(session, stale_after_s=stale_after_s)
        paused = is_paused(session)
    if paused:
        return ReconcileReport(requeued=requeued, failed=failed, republished=0)
    rerouted = reroute_legacy_messages(factory, publisher)
    if republish_after_s is not None:
        # Every queued job's model queue is read, served or not: a message waiting for a worker that
        # has not started yet is live, and republishing it would add a duplicate every pass.
        with factory() as session:
            models = queued_models(session)
        live = publisher.live_job_ids(models)
        with transaction(factory) as session:
            mark_lost_messages(session, live=live, older_than_s=republish_after_s)
    republished = 0
    while True:
        with factory() as session:
            batch = unpublished_jobs(session, limit=REPUBLISH_CHUNK)
        sent = publish_jobs(factory, publisher, batch) if batch else 0
        republished += sent
        if sent < REPUBLISH_CHUNK:
            break
    report = ReconcileReport(requeued=requeued, failed=failed, republished=republished, rerouted=rerouted)
    if requeued or failed or republished:
        log.info("reconciler: %s", report)
    return report
