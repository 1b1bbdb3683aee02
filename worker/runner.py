"""Running one claimed job: call the engine, write the image, store the result and stats."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from jobs.db import transaction
from jobs.lifecycle import (
    Claim,
    cancel_running_job,
    claim_job,
    fail_if_exhausted,
    fail_job,
    finish_job,
    record_progress,
)
from jobs.params import GenerationParams
from jobs.settings import Settings
from worker.engine import EngineError, LoadedPipeline, RenderCancelled, RenderRequest, RenderStats, render
from worker.engine.loading import load_pipeline
from worker.outputs import image_path, png_metadata, save_png_atomically

log = logging.getLogger(__name__)


class PipelineHolder:
    """Keeps one pipeline loaded across jobs; loads another only when a job names another model or dtype."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.loaded: LoadedPipeline | None = None
        self.loads = 0

    def get(self, model: str, dtype: str) -> tuple[LoadedPipeline, float]:
        """The pipeline for (model, dtype) and the seconds spent loading it for this call (0 if reused)."""
        if self.loaded and (self.loaded.model, self.loaded.dtype) == (model, dtype):
            return self.loaded, 0.0
        self.loaded = None  # drop the old pipeline before loading the new one, to free its memory
        self.loaded = load_pipeline(
            model,
            dtype=dtype,
            offload_mode=self._settings.offload_mode,
            cache_dir=self._settings.model_cache_dir,
        )
        self.loads += 1
        log.info("loaded %s (%s) in %.1fs [load #%d]", model, dtype, self.loaded.load_seconds, self.loads)
        return self.loaded, self.loaded.load_seconds


def to_request(params: GenerationParams) -> RenderRequest:
    """The engine's view of a job's parameters."""
    return RenderRequest(
        prompt=params.prompt,
        negative_prompt=params.negative_prompt,
        width=params.width,
        height=params.height,
        steps=params.steps,
        guidance_scale=params.guidance_scale,
        seed=params.seed,
    )


def stats_columns(stats: RenderStats | None) -> dict[str, Any] | None:
    """RenderStats as job_stats column values."""
    if stats is None:
        return None
    values = dataclasses.asdict(stats)
    values.pop("phases", None)
    return values


class JobRunner:
    """Claims, renders and records jobs for one worker process."""

    def __init__(self, settings: Settings, factory: sessionmaker[Session], holder: PipelineHolder) -> None:
        self._settings = settings
        self._factory = factory
        self._holder = holder

    def run(self, job_id: str) -> str:
        """Run a job if we can claim it; returns what happened, for the log."""
        with transaction(self._factory) as session:
            claim = claim_job(session, job_id=job_id)
            if claim is None:
                exhausted = fail_if_exhausted(session, job_id=job_id)
                return "exhausted" if exhausted else "skipped"
        log.info("claimed job %s (attempt %d)", job_id, claim.attempt)
        return self._render_claimed(claim)

    def _render_claimed(self, claim: Claim) -> str:
        stats: RenderStats | None = None
        try:
            loaded, load_s = self._holder.get(claim.params.model, claim.params.dtype)
            result = render(loaded, to_request(claim.params), on_step=self._step_writer(claim))
            stats = result.stats
            stats.load_s = load_s
            return self._store_success(claim, result.image, stats)
        except RenderCancelled:
            return self._store(cancel_running_job, claim, stats=stats_columns(stats)) or "cancelled"
        except EngineError as error:
            return self._store(fail_job, claim, error=str(error), stats=None) or "failed"
        except Exception as error:
            log.exception("job %s failed", claim.job_id)
            message = f"{type(error).__name__}: {error}"
            return self._store(fail_job, claim, error=message, stats=stats_columns(stats)) or "failed"

    def _step_writer(self, claim: Claim) -> Any:
        def write_step(step: int, _total: int) -> bool:
            with transaction(self._factory) as session:
                return record_progress(session, job_id=claim.job_id, lease_token=claim.lease_token, step=step)

        return write_step

    def _store_success(self, claim: Claim, image: Any, stats: RenderStats) -> str:
        path = image_path(self._settings.resolved_outputs_dir(), claim.job_id, claim.batch_id)
        started = time.perf_counter()
        save_png_atomically(image, path, png_metadata(claim.job_id, claim.params))
        stats.save_s = time.perf_counter() - started
        with transaction(self._factory) as session:
            stored = finish_job(
                session,
                job_id=claim.job_id,
                lease_token=claim.lease_token,
                result_path=str(path),
                stats=stats_columns(stats) or {},
            )
        return "succeeded" if stored else "lease lost"

    def _store(self, write: Any, claim: Claim, **values: Any) -> str | None:
        with transaction(self._factory) as session:
            stored = write(session, job_id=claim.job_id, lease_token=claim.lease_token, **values)
        return None if stored else "lease lost"
