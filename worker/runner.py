"""Running one claimed job: call the engine, write the image, store the result and stats."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
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
    groupmates,
    hand_back,
    heartbeat,
    record_progress,
)
from jobs.params import GenerationParams
from jobs.settings import Settings
from worker.engine import EngineError, RenderCancelled, RenderRequest, RenderStats
from worker.engine.engine import Engine, LadderExhausted, release_memory
from worker.engine.loading import pick_device
from worker.engine.memory import device_name
from worker.holder import EngineHolder
from worker.outputs import image_path, png_metadata, save_png_atomically

log = logging.getLogger(__name__)


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
        """Run a job if we can claim it, with queued groupmates that share its text-encoder pass."""
        claim = with_retries(self._factory, lambda session: self._claim(session, job_id))
        if isinstance(claim, str):
            return claim
        claims = [claim, *self._claim_groupmates(claim)]
        for each in claims:
            log.info("claimed job %s (attempt %d)", each.job_id, each.attempt)
        with self._heartbeating(claims):
            embeds = encode_group(self._holder, claims) if len(claims) > 1 else {}
            outcomes = [self._render_claimed(each, embeds.get(each.job_id)) for each in claims]
        return outcomes[0] if len(claims) == 1 else f"{outcomes[0]} (+{len(claims) - 1} grouped)"

    def _claim_groupmates(self, claim: Claim) -> list[Claim]:
        """Claim up to ENCODE_GROUP_SIZE - 1 compatible queued jobs; their own messages will be skipped."""

        def claim_some(session: Session) -> list[Claim]:
            ids = groupmates(session, claim=claim, limit=self._settings.encode_group_size - 1)
            claimed = (claim_job(session, job_id=job_id) for job_id in ids)
            return [c for c in claimed if c is not None]

        return with_retries(self._factory, claim_some)

    def _claim(self, session: Session, job_id: str) -> Claim | str:
        if is_paused(session):
            hand_back(session, job_id=job_id)  # resume republishes it; nothing is lost
            return "paused"
        claim = claim_job(session, job_id=job_id)
        if claim is None:
            return "exhausted" if fail_if_exhausted(session, job_id=job_id) else "skipped"
        return claim

    @contextmanager
    def _heartbeating(self, claims: list[Claim]) -> Iterator[None]:
        """Beat every HEARTBEAT_INTERVAL_S for each claimed job: a long load or step is not death."""
        stop = threading.Event()

        def beat_all(session: Session) -> None:
            for claim in claims:
                heartbeat(session, job_id=claim.job_id, lease_token=claim.lease_token)

        def beat() -> None:
            while not stop.wait(self._settings.heartbeat_interval_s):
                try:
                    with_retries(self._factory, beat_all, timeout_s=self._settings.heartbeat_interval_s)
                except Exception:  # a missed beat is survivable; the next one may land
                    log.warning("heartbeat for jobs %s failed", [c.job_id for c in claims], exc_info=True)

        thread = threading.Thread(target=beat, name=f"heartbeat-{claims[0].job_id[:8]}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)

    def _render_claimed(self, claim: Claim, shared: SharedEncoding | None = None) -> str:
        stats: RenderStats | None = None
        try:
            result, load_s = self._render(claim, shared)
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

    def _render(self, claim: Claim, shared: SharedEncoding | None = None) -> tuple[Any, float]:
        """Render on the job's dtype; fp16 output that is NaN or black is rendered again in bf16."""
        engine, load_s = self._holder.get(claim.params.model, claim.params.dtype)
        request = to_request(claim.params)
        embeds = shared.embeds if shared else None
        result = engine.render(request, on_step=self._step_writer(claim), embeds=embeds)
        if shared is not None:
            result.stats.encode_s = shared.seconds  # this job's share of the group's encoder pass
            result.stats.plan = note_retry(
                result.stats.plan, f"encoded with {shared.group} jobs", key="group"
            )
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


@dataclass(frozen=True)
class SharedEncoding:
    """One job's prompt embeddings from a group's single text-encoder pass, and its share of the time."""

    embeds: tuple[list[Any], list[Any]]
    seconds: float
    group: int


def encode_group(holder: EngineHolder, claims: list[Claim]) -> dict[str, SharedEncoding]:
    """Encode every claimed job's prompt in one pass of the (streamed) text encoder.

    Streaming the encoder's 7 GB once per group instead of once per job is most of the difference
    between single and queued jobs in bench/RESULTS.md. An out-of-memory error here just means each
    job encodes on its own.
    """
    first = claims[0].params
    engine, _ = holder.get(first.model, first.dtype)
    started = time.perf_counter()
    positive = _encode_or_none(engine, [c.params.prompt for c in claims], first.width, first.height)
    if positive is None:
        release_memory(engine.device)
        return {}
    share = (time.perf_counter() - started) / len(claims)
    return {
        claim.job_id: SharedEncoding(embeds=([positive[i]], []), seconds=share, group=len(claims))
        for i, claim in enumerate(claims)
    }


def _encode_or_none(engine: Engine, prompts: list[str], width: int, height: int) -> list[Any] | None:
    try:
        positive, _negative = engine.encode(prompts, None, 0.0, width, height)
    except torch.cuda.OutOfMemoryError:
        return None
    return list(positive)
