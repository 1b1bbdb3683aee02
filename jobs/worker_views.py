"""Workers as clients see them: the newest starts, each marked live or not, and the newest live one."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from jobs.presence import is_live, recent_workers
from jobs.tables import WorkerPresence

LIVE_WITHIN_BEATS = 3  # a worker silent for this many heartbeats is no longer live
MIN_SILENCE_S = 30.0  # ... but never sooner: a busy machine writes a beat late (as `worker-health` reads it)
LISTED_WORKERS = 20


def silent_after_s(heartbeat_interval_s: float) -> float:
    """Seconds without a beat after which a ready worker no longer counts as live."""
    return max(LIVE_WITHIN_BEATS * heartbeat_interval_s, MIN_SILENCE_S)


def worker_views(session: Session, *, now: datetime, silent_after_s: float) -> list[dict[str, Any]]:
    """What `GET /v1/workers` answers: the newest worker starts, newest first, each with `live`."""
    return [
        worker_view(w, live=is_live(w, now=now, silent_after_s=silent_after_s))
        for w in recent_workers(session, limit=LISTED_WORKERS)
    ]


def worker_view(worker: WorkerPresence, *, live: bool) -> dict[str, Any]:
    """One worker start as listed."""
    return {
        "node": worker.node,
        "host": worker.host,
        "state": worker.state,
        "model": worker.model,
        "dtype": worker.dtype,
        "device_name": worker.device_name,
        "gpu_index": worker.gpu_index,
        "device_uuid": worker.device_uuid,
        "vram_budget_bytes": worker.vram_budget_bytes,
        "error": worker.error,
        "ready_at": worker.ready_at.isoformat() if worker.ready_at else None,
        "beat_at": worker.beat_at.isoformat(),
        "live": live,
    }


def newest_live_worker(session: Session, *, now: datetime, silent_after_s: float) -> WorkerPresence | None:
    """The most recently started worker that is ready and beating, or None."""
    live = (
        w
        for w in recent_workers(session, limit=LISTED_WORKERS)
        if is_live(w, now=now, silent_after_s=silent_after_s)
    )
    return next(live, None)
