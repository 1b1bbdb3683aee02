"""Writing finished images off the GPU path: PNG encoding, the atomic rename and the final commit.

The renderer hands each image to a bounded queue and starts the next job; this thread encodes the
PNG, writes it to a temporary file, renames it, and only then commits `succeeded` with the stats, in
one transaction fenced by the lease. If the process dies with images still queued, their jobs are
still `running` with a lease that stops beating, so the reconciler requeues them: nothing is lost,
and nothing is marked done without its file.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from jobs.db import with_retries
from jobs.lifecycle import Claim, fail_job, finish_job
from jobs.results import stored_result_path
from worker.engine import RenderRecord
from worker.leases import LeaseKeeper
from worker.outputs import (
    image_path,
    png_metadata,
    remove_dead_attempts_files,
    save_png_atomically,
    temporary_prefix,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RenderedImage:
    """A rendered job waiting for its file and its commit."""

    claim: Claim
    image: Image.Image
    stats: RenderRecord
    columns: dict[str, Any]


class ImageWriter:
    """A thread that stores rendered images in order; `submit` blocks only when the queue is full."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        leases: LeaseKeeper,
        outputs_dir: Path,
        *,
        capacity: int = 2,
        exit_before_write: str | None = None,
    ) -> None:
        self._factory = factory
        self._exit_before_write = exit_before_write
        self._leases = leases
        self._outputs_dir = outputs_dir
        self._queue: queue.Queue[RenderedImage | None] = queue.Queue(maxsize=capacity)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, rendered: RenderedImage) -> None:
        """Queue an image for writing (waits while `capacity` images are already waiting)."""
        self._ensure_running()
        self._queue.put(rendered)

    def drain(self) -> None:
        """Wait until every submitted image is written and committed."""
        self._queue.join()

    def close(self) -> None:
        """Write everything queued, then stop the thread (warm shutdown)."""
        if self._thread is None or not self._thread.is_alive():
            return
        self._queue.put(None)
        self._thread.join()

    def _ensure_running(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="image-writer", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while True:
            rendered = self._queue.get()
            try:
                if rendered is None:
                    return
                outcome = self._store(rendered)
                log.info("job %s: %s", rendered.claim.job_id, outcome)
            except Exception:
                log.exception("writing job %s failed", rendered.claim.job_id if rendered else "?")
            finally:
                if rendered is not None:
                    self._leases.release(rendered.claim.job_id)
                self._queue.task_done()

    def _store(self, rendered: RenderedImage) -> str:
        claim = rendered.claim
        marker = self._exit_before_write
        if marker and marker in claim.params.prompt and claim.attempt == 1:
            os._exit(1)  # testing only (FAULT_EXIT_BEFORE_WRITE): die between the render and the write
        path = image_path(self._outputs_dir, claim)
        started = time.perf_counter()
        try:
            metadata = png_metadata(claim.job_id, claim.params)
            save_png_atomically(rendered.image, path, metadata, prefix=temporary_prefix(claim.job_id))
        except OSError as error:  # a full disk or a vanished folder fails this job, not the worker
            commit_fenced(
                self._factory, fail_job, claim, error=f"could not write the image: {error}", stats=None
            )
            return "failed"
        columns = {**rendered.columns, "save_s": time.perf_counter() - started}
        # Relative to OUTPUTS_DIR: the API may mount the same shared folder at another path.
        result_path = stored_result_path(self._outputs_dir, path)
        stored = commit_fenced(self._factory, finish_job, claim, result_path=result_path, stats=columns)
        if not stored:
            path.unlink(missing_ok=True)  # our lease was taken back: this attempt's image is nobody's
            return "lease lost"
        remove_dead_attempts_files(path, claim.job_id)
        return "succeeded"


def commit_fenced(factory: sessionmaker[Session], write: Any, claim: Claim, **values: Any) -> bool:
    """Run a lease-fenced lifecycle write (finish, fail, cancel) with retries; False if the lease was lost."""
    return bool(
        with_retries(
            factory, lambda s: write(s, job_id=claim.job_id, lease_token=claim.lease_token, **values)
        )
    )
