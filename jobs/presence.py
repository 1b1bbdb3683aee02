"""Workers' presence in SQL: each worker process says it is starting, ready (with what) or failed.

Readiness used to be a " ready." line in an appended log, which a line from an earlier run satisfied;
a row per process start, found by host and pid, cannot be confused with another run's.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from jobs.tables import WorkerPresence, utcnow

STARTING, READY, FAILED, STOPPED = "starting", "ready", "failed", "stopped"
# The card a worker serves, as the host numbers it (nvidia-smi's index): `nightrender worker --gpu N` and
# `up --gpus` set it; compose sets it beside the device it reserves. It names the worker and enters its stats.
WORKER_GPU = "WORKER_GPU"


def this_host() -> str:
    """The host name workers record and the healthcheck looks for."""
    return socket.gethostname()


def pinned_gpu(environ: Mapping[str, str]) -> int | None:
    """The GPU index WORKER_GPU names (None when unset or empty); ValueError if it is not one."""
    text = environ.get(WORKER_GPU, "").strip()
    if not text:
        return None
    if not text.isdigit():
        raise ValueError(f"{WORKER_GPU} must be a GPU index (0, 1, ...), not {text!r}")
    return int(text)


def announce_worker(
    session: Session, *, node: str, model: str, dtype: str, offload_mode: str, gpu_index: int | None = None
) -> str:
    """Record a worker process that is starting (before its model loads); returns its presence id.

    `gpu_index` is the card it is pinned to, as the host numbers it (None when not pinned).
    """
    presence = WorkerPresence(
        id=str(uuid.uuid4()),
        node=node,
        host=this_host(),
        pid=os.getpid(),
        state=STARTING,
        model=model,
        dtype=dtype,
        offload_mode=offload_mode,
        gpu_index=gpu_index,
    )
    session.add(presence)
    session.commit()
    return presence.id


def mark_ready(
    session: Session,
    *,
    worker_id: str,
    device_name: str,
    vram_budget_bytes: int | None,
    forecast: list[dict[str, Any]] | None = None,
    device_uuid: str | None = None,
) -> None:
    """The model is loaded and placed: the worker takes jobs from now on (on the card `device_uuid`)."""
    now = utcnow()
    _update(session, worker_id, state=READY, device_name=device_name, device_uuid=device_uuid,
            vram_budget_bytes=vram_budget_bytes, forecast=forecast, ready_at=now, beat_at=now)  # fmt: skip


def mark_failed(session: Session, *, worker_id: str, error: str) -> None:
    """The worker could not start; the reason is what `up` and `run` print."""
    _update(session, worker_id, state=FAILED, error=error[:2000], stopped_at=utcnow())


def mark_stopped(session: Session, *, worker_id: str) -> None:
    """A warm shutdown finished."""
    _update(session, worker_id, state=STOPPED, stopped_at=utcnow())


def record_beat(session: Session, *, worker_id: str) -> None:
    """The worker is alive (written from a thread, so it beats during a render too)."""
    _update(session, worker_id, beat_at=utcnow())


def _update(session: Session, worker_id: str, **values: object) -> None:
    session.execute(update(WorkerPresence).where(WorkerPresence.id == worker_id).values(**values))
    session.commit()


def worker_process(session: Session, *, host: str, pid: int, since: datetime) -> WorkerPresence | None:
    """The presence of the process `pid` on `host` started after `since` (None until it announces itself)."""
    query = (
        select(WorkerPresence)
        .where(WorkerPresence.host == host, WorkerPresence.pid == pid, WorkerPresence.started_at >= since)
        .order_by(WorkerPresence.started_at.desc())
        .limit(1)
    )
    return session.scalars(query).first()


def recent_workers(session: Session, *, host: str | None = None, limit: int = 20) -> list[WorkerPresence]:
    """The newest worker starts, on one host or on all."""
    query = select(WorkerPresence).order_by(WorkerPresence.started_at.desc()).limit(limit)
    if host is not None:
        query = query.where(WorkerPresence.host == host)
    return list(session.scalars(query))


def is_live(presence: WorkerPresence, *, now: datetime, silent_after_s: float) -> bool:
    """Ready and heard from within `silent_after_s` seconds."""
    return presence.state == READY and now - presence.beat_at <= timedelta(seconds=silent_after_s)
