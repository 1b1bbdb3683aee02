"""Keeping the leases of a worker's in-flight jobs: progress, heartbeats and cancel flags, off the GPU path.

A denoising step only records its number in memory and reads a flag; one thread per worker writes the
latest step of each job to SQL, beats for jobs still waiting (grouped jobs, images being written), and
learns from each write whether the job was cancelled or its lease lost. So a step never waits on the
database, and a cancel is seen within a step or two.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from jobs.db import with_retries
from jobs.lifecycle import Claim, heartbeat, record_progress

log = logging.getLogger(__name__)

# How often the latest step of a rendering job reaches SQL; a step is ~0.1 s on a GPU.
PROGRESS_INTERVAL_S = 0.25


class LeaseKeeper:
    """One thread that writes progress and heartbeats for every job this worker holds."""

    def __init__(self, factory: sessionmaker[Session], heartbeat_interval_s: float) -> None:
        self._factory = factory
        self._heartbeat_interval_s = heartbeat_interval_s
        self._lock = threading.Lock()
        self._held: dict[str, Claim] = {}
        self._steps: dict[str, int] = {}
        self._beaten_at: dict[str, float] = {}
        self._stopped: set[str] = set()
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None

    def hold(self, claim: Claim) -> None:
        """Start keeping a claimed job's lease alive."""
        with self._lock:
            self._held[claim.job_id] = claim
            self._beaten_at[claim.job_id] = time.monotonic()
            self._stopped.discard(claim.job_id)  # a flag left by an earlier attempt is not this one's
        self._ensure_running()

    def release(self, job_id: str) -> None:
        """Stop keeping a job's lease (it was finalised, or handed back)."""
        with self._lock:
            self._held.pop(job_id, None)
            self._steps.pop(job_id, None)
            self._beaten_at.pop(job_id, None)
            self._stopped.discard(job_id)

    def step(self, job_id: str, step: int) -> bool:
        """Note a finished step; False means stop (cancel requested, or the lease was lost)."""
        with self._lock:
            self._steps[job_id] = step
            stopped = job_id in self._stopped
        self._wake.set()
        return not stopped

    def flush(self) -> None:
        """Write what is due now (the thread calls this; tests may too)."""
        with self._lock:
            due = self._due(time.monotonic())
        for claim, step in due:
            alive = self._write(claim, step)
            if not alive:
                with self._lock:
                    # The write ran outside the lock: by now the job may be released and claimed
                    # again (a frozen worker re-claiming its own job); only this claim is stopped.
                    if self._held.get(claim.job_id) is claim:
                        self._stopped.add(claim.job_id)

    def _due(self, now: float) -> list[tuple[Claim, int | None]]:
        due: list[tuple[Claim, int | None]] = []
        for job_id, claim in self._held.items():
            step = self._steps.pop(job_id, None)
            if step is not None or now - self._beaten_at[job_id] >= self._heartbeat_interval_s:
                self._beaten_at[job_id] = now
                due.append((claim, step))
        return due

    def _write(self, claim: Claim, step: int | None) -> bool:
        write: Callable[[Session], bool]
        if step is None:
            write = lambda s: heartbeat(s, job_id=claim.job_id, lease_token=claim.lease_token)  # noqa: E731
        else:
            write = lambda s: record_progress(  # noqa: E731
                s, job_id=claim.job_id, lease_token=claim.lease_token, step=step
            )
        try:
            return with_retries(self._factory, write, timeout_s=self._heartbeat_interval_s)
        except Exception:  # a missed write is survivable; the next one may land
            log.warning("progress or heartbeat for job %s failed", claim.job_id, exc_info=True)
            return True

    def _ensure_running(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._closing.clear()
            self._thread = threading.Thread(target=self._loop, name="lease-keeper", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._closing.is_set():
            self._wake.wait(timeout=min(1.0, self._heartbeat_interval_s))
            self._wake.clear()
            self.flush()
            self._closing.wait(PROGRESS_INTERVAL_S)  # batch the steps of the next quarter second

    def close(self) -> None:
        """Write what is pending and stop the thread."""
        self._closing.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.flush()
