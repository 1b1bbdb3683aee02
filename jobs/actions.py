"""What a client may do to its work after submitting it: retry or cancel a job, or a whole batch.

Each action opens its own transaction, checks that the owner's key made the item, makes the change
through jobs/lifecycle.py and publishes what must be published. Refusals are domain errors; the API
turns them into HTTP answers.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from jobs.db import transaction
from jobs.lifecycle import request_cancel, retry_jobs
from jobs.queue import Publication, Publisher
from jobs.states import RETRYABLE
from jobs.submit import publish_jobs
from jobs.tables import Batch, Job


class NotFound(LookupError):
    """No such job or batch for this owner: another owner's items are not found either."""

    def __init__(self, kind: str, item_id: str) -> None:
        super().__init__(f"{kind} {item_id} not found")
        self.kind = kind
        self.item_id = item_id


class Refused(ValueError):
    """The action does not apply to the item as it is now."""


class NotRetryable(Refused):
    """Only failed or cancelled jobs can be retried."""


class AlreadyRetried(Refused):
    """The job (or the batch) was retried already, or is being retried by a concurrent request."""


def owned_job(session: Session, *, job_id: str, owner: str) -> Job:
    """The owner's job with this id, or NotFound."""
    job = session.get(Job, job_id)
    if job is None or job.owner != owner:
        raise NotFound("job", job_id)
    return job


def owned_batch(session: Session, *, batch_id: str, owner: str) -> Batch:
    """The owner's batch with this id, or NotFound."""
    batch = session.get(Batch, batch_id)
    if batch is None or batch.owner != owner:
        raise NotFound("batch", batch_id)
    return batch


def retry_job(factory: sessionmaker[Session], publisher: Publisher, *, job_id: str, owner: str) -> str:
    """Queue and publish a fresh copy of a failed or cancelled job; returns the new job's id."""
    try:
        with transaction(factory) as session:
            job = owned_job(session, job_id=job_id, owner=owner)
            if job.status not in RETRYABLE:
                raise NotRetryable(
                    f"job {job_id} is {job.status}; only failed or cancelled jobs can be retried"
                )
            created, priority, model = retry_jobs(session, job_ids=[job_id]), job.priority, job.model
    except IntegrityError:
        created = []  # a concurrent retry of the same job committed its copy first
    if not created:
        raise AlreadyRetried(f"job {job_id} was already retried")
    publish_jobs(factory, publisher, [Publication(job_id=created[0], priority=priority, model=model)])
    return created[0]


def retry_batch(
    factory: sessionmaker[Session], publisher: Publisher, *, batch_id: str, owner: str
) -> list[str]:
    """Queue and publish a fresh copy of each failed or cancelled job of a batch; returns the new ids."""
    try:
        with transaction(factory) as session:
            priority = owned_batch(session, batch_id=batch_id, owner=owner).priority
            created = retry_jobs(session, job_ids=_batch_job_ids(session, batch_id))
            models = _batch_job_models(session, batch_id)
    except IntegrityError:
        raise AlreadyRetried(f"batch {batch_id} is being retried already") from None
    publications = [Publication(job_id=job_id, priority=priority, model=models[job_id]) for job_id in created]
    publish_jobs(factory, publisher, publications)
    return created


def cancel_job(factory: sessionmaker[Session], *, job_id: str, owner: str) -> None:
    """Cancel the owner's job at once if queued, or flag it to stop at its next step if running."""
    with transaction(factory) as session:
        owned_job(session, job_id=job_id, owner=owner)
        request_cancel(session, job_ids=[job_id])


def cancel_batch(factory: sessionmaker[Session], *, batch_id: str, owner: str) -> None:
    """Cancel the batch's queued jobs at once and flag its running ones to stop at their next step."""
    with transaction(factory) as session:
        owned_batch(session, batch_id=batch_id, owner=owner)
        request_cancel(session, job_ids=_batch_job_ids(session, batch_id))


def _batch_job_models(session: Session, batch_id: str) -> dict[str, str]:
    """Each of the batch's jobs' model (the queue its message goes to), new copies included."""
    session.flush()
    return dict(session.execute(select(Job.id, Job.model).where(Job.batch_id == batch_id)).tuples().all())


def _batch_job_ids(session: Session, batch_id: str) -> list[str]:
    return list(session.scalars(select(Job.id).where(Job.batch_id == batch_id)))
