"""Running one claimed job: call the engine, write the image, store the result and stats."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from jobs.controls import is_paused
from jobs.db import with_retries
from jobs.lifecycle import (
    Claim,
    cancel_running_job,
    claim_job,
    fail_if_exhausted,
    fail_job,
    finish_job,
    hand_back,
    heartbeat,
    record_progress,
)
from jobs.params import GenerationParams
from jobs.settings import Settings
from worker.engine import EngineError, LoadedPipeline, RenderCancelled, RenderRequest, RenderStats
from worker.engine.budget import apply_device_cap, resolve_budget
from worker.engine.calibration import DEFAULT_ACTIVATIONS
from worker.engine.engine import Engine, LadderExhausted, release_memory
from worker.engine.loading import configure_attention, load_pipeline, pick_device
from worker.engine.memory import device_name
from worker.engine.plan import ActivationModel, Budget, calibrated_scale, with_scale
from worker.outputs import image_path, png_metadata, save_png_atomically

log = logging.getLogger(__name__)


class EngineHolder:
    """Keeps one engine loaded across jobs; loads another only when a job names another model or dtype.

    The VRAM budget becomes the allocator cap once, before the first weights load, so `auto` measures
    the card's free memory as the user left it.
    """

    def __init__(self, settings: Settings, history: Callable[[str, str], list[Any]] | None = None) -> None:
        self._settings = settings
        self._history = history
        self.engine: Engine | None = None
        self.loads = 0
        self.budget: Budget | None = None

    def get(self, model: str, dtype: str) -> tuple[Engine, float]:
        """The engine for (model, dtype) and the seconds spent loading it for this call (0 if reused)."""
        if self.engine and (self.engine.loaded.model, self.engine.loaded.dtype) == (model, dtype):
            return self.engine, 0.0
        self.engine = None  # drop the old pipeline before loading the new one, to free its memory
        release_memory(pick_device())
        device = pick_device()
        if self.budget is None:
            self.budget = resolve_budget(
                self._settings.vram_budget_gb, self._settings.host_ram_budget_gb, device
            )
            apply_device_cap(self.budget, device)
        loaded = self._load(model, dtype, device)
        self.engine = Engine(
            loaded,
            mode=self._settings.offload_mode,
            budget=self.budget,
            activations=self._activations(model, device),
            reload=lambda: self._load(model, dtype, device),
            vae_tiling=self._settings.vae_tiling,
        )
        self.loads += 1
        log.info("loaded %s (%s) in %.1fs [load #%d]", model, dtype, loaded.load_seconds, self.loads)
        return self.engine, loaded.load_seconds

    def _load(self, model: str, dtype: str, device: Any) -> LoadedPipeline:
        loaded = load_pipeline(model, dtype=dtype, cache_dir=self._settings.model_cache_dir, device=device)
        configure_attention(loaded, self._settings.attention_backend, vae_slicing=self._settings.vae_slicing)
        return loaded

    def _activations(self, model: str, device: Any) -> ActivationModel:
        records = self._history(model, device_name(device)) if self._history else []
        scale = calibrated_scale(records)
        if records:
            log.info("activation estimates scaled by %.3f from %d recorded jobs", scale, len(records))
        return with_scale(DEFAULT_ACTIVATIONS, scale)


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

    def __init__(self, settings: Settings, factory: sessionmaker[Session], holder: EngineHolder) -> None:
        self._settings = settings
        self._factory = factory
        self._holder = holder

    def run(self, job_id: str) -> str:
        """Run a job if we can claim it; returns what happened, for the log."""
        claim = with_retries(self._factory, lambda session: self._claim(session, job_id))
        if isinstance(claim, str):
            return claim
        log.info("claimed job %s (attempt %d)", job_id, claim.attempt)
        with self._heartbeating(claim):
            return self._render_claimed(claim)

    def _claim(self, session: Session, job_id: str) -> Claim | str:
        if is_paused(session):
            hand_back(session, job_id=job_id)  # resume republishes it; nothing is lost
            return "paused"
        claim = claim_job(session, job_id=job_id)
        if claim is None:
            return "exhausted" if fail_if_exhausted(session, job_id=job_id) else "skipped"
        return claim

    @contextmanager
    def _heartbeating(self, claim: Claim) -> Iterator[None]:
        """Beat every HEARTBEAT_INTERVAL_S while the job runs, so a long load or step is not taken as dead."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self._settings.heartbeat_interval_s):
                try:
                    with_retries(
                        self._factory,
                        lambda s: heartbeat(s, job_id=claim.job_id, lease_token=claim.lease_token),
                        timeout_s=self._settings.heartbeat_interval_s,
                    )
                except Exception:  # a missed beat is survivable; the next one may land
                    log.warning("heartbeat for job %s failed", claim.job_id, exc_info=True)

        thread = threading.Thread(target=beat, name=f"heartbeat-{claim.job_id[:8]}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)

    def _render_claimed(self, claim: Claim) -> str:
        stats: RenderStats | None = None
        try:
            result, load_s = self._render(claim)
            stats = result.stats
            stats.load_s += load_s
            return self._store_success(claim, result.image, stats)
        except RenderCancelled:
            return self._store(cancel_running_job, claim, stats=stats_columns(stats)) or "cancelled"
        except LadderExhausted as error:
            stats = exhausted_stats(error)
            return self._store(fail_job, claim, error=str(error), stats=stats_columns(stats)) or "failed"
        except EngineError as error:
            return self._store(fail_job, claim, error=str(error), stats=None) or "failed"
        except Exception as error:
            log.exception("job %s failed", claim.job_id)
            message = f"{type(error).__name__}: {error}"
            return self._store(fail_job, claim, error=message, stats=stats_columns(stats)) or "failed"

    def _render(self, claim: Claim) -> tuple[Any, float]:
        """Render on the job's dtype; fp16 output that is NaN or black is rendered again in bf16."""
        engine, load_s = self._holder.get(claim.params.model, claim.params.dtype)
        request = to_request(claim.params)
        result = engine.render(request, on_step=self._step_writer(claim))
        if result.output_bad and claim.params.dtype == "fp16":
            log.warning("job %s: fp16 output was NaN or black; rendering again in bf16", claim.job_id)
            engine, reload_s = self._holder.get(claim.params.model, "bf16")
            result = engine.render(request, on_step=self._step_writer(claim))
            load_s += reload_s
            result.stats.plan = note_retry(result.stats.plan, "fp16 output NaN or black; retried in bf16")
        if result.output_bad:
            # Kept (the job did render), but said plainly in its stats rather than passed off as fine.
            result.stats.plan = note_retry(result.stats.plan, "output is NaN or black", key="warning")
        return result, load_s

    def _step_writer(self, claim: Claim) -> Any:
        marker = self._settings.fault_exit_on_prompt
        poisoned = bool(marker) and marker in claim.params.prompt  # type: ignore[operator]

        def write_step(step: int, _total: int) -> bool:
            if poisoned:
                os._exit(1)  # testing only (FAULT_EXIT_ON_PROMPT): die mid-job like a crashed worker
            return with_retries(
                self._factory,
                lambda s: record_progress(s, job_id=claim.job_id, lease_token=claim.lease_token, step=step),
            )

        return write_step

    def _store_success(self, claim: Claim, image: Any, stats: RenderStats) -> str:
        path = image_path(
            self._settings.resolved_outputs_dir(), claim.job_id, claim.batch_id, claim.lease_token
        )
        started = time.perf_counter()
        save_png_atomically(image, path, png_metadata(claim.job_id, claim.params))
        stats.save_s = time.perf_counter() - started
        values = stats_columns(stats) or {}
        stored = with_retries(
            self._factory,
            lambda s: finish_job(
                s, job_id=claim.job_id, lease_token=claim.lease_token, result_path=str(path), stats=values
            ),
        )
        if not stored:
            path.unlink(missing_ok=True)  # our lease was taken back: this attempt's image is nobody's
            return "lease lost"
        return "succeeded"

    def _store(self, write: Any, claim: Claim, **values: Any) -> str | None:
        stored = with_retries(
            self._factory, lambda s: write(s, job_id=claim.job_id, lease_token=claim.lease_token, **values)
        )
        return None if stored else "lease lost"


def exhausted_stats(error: LadderExhausted) -> RenderStats:
    """Stats for a job that ran out of memory on every rung: which rungs were tried, and how."""
    device = pick_device()
    return RenderStats(
        offload_mode="exhausted",
        device_name=device_name(device),
        plan=json.dumps({"rung": "exhausted", "attempts": error.attempts}),
    )


def note_retry(plan: str | None, note: str, key: str = "retry") -> str:
    """Add a note (a retry, a warning) to a stored plan."""
    record = json.loads(plan) if plan else {}
    record[key] = note
    return json.dumps(record)
