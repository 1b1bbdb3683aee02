"""Running one claimed job: call the engine, write the image, store the result and stats."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from jobs.controls import is_paused
from jobs.db import with_retries
from jobs.lifecycle import (
    Claim,
    can_share_encoding,
    cancel_running_job,
    claim_job,
    fail_if_exhausted,
    fail_job,
    groupmates,
    hand_back,
    queued_sizes,
)
from jobs.ordering import PassedOver, Preference, claimable_count, fair_groupmates, next_job_ids
from jobs.params import GenerationParams
from jobs.serving import serving_workers
from jobs.settings import Settings
from jobs.tables import utcnow
from jobs.worker_views import silent_after_s
from worker.engine import EngineError, RenderCancelled, RenderRecord, RenderRequest
from worker.engine.records import LadderExhausted
from worker.holder import EngineHolder
from worker.leases import LeaseKeeper
from worker.writer import ImageWriter, RenderedImage, commit_fenced

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


# RenderRecord fields kept together in the JSON `plan` column rather than in columns of their own.
IN_PLAN_COLUMN = frozenset({"plan", "attempts", "notes", "planned_for", "compiled"})


def stats_columns(record: RenderRecord | None) -> dict[str, Any] | None:
    """A render's record as job_stats column values: the one place it is serialised for storage."""
    if record is None:
        return None
    fields = (f.name for f in dataclasses.fields(record) if f.name not in IN_PLAN_COLUMN)
    values = {name: getattr(record, name) for name in fields}
    derived = {"predicted_peak_bytes": record.predicted_peak_bytes, "oom_attempts": record.oom_attempts}
    return {**values, **derived, "plan": record.stored_plan()}


class JobRunner:
    """Claims and renders jobs for one worker process; an ImageWriter stores what it renders.

    `identity` (the worker's name, its GPU) goes into every stats row it stores, so each job's
    evidence says which worker and device rendered it.
    """

    def __init__(
        self,
        settings: Settings,
        factory: sessionmaker[Session],
        holder: EngineHolder,
        identity: Mapping[str, object] | None = None,
    ) -> None:
        self._settings = settings
        self._model = settings.resolved_worker_model()
        self._identity = dict(identity or {})
        self._factory = factory
        self._holder = holder
        self.leases = LeaseKeeper(factory, settings.heartbeat_interval_s)
        self.writer = ImageWriter(
            factory,
            self.leases,
            settings.resolved_outputs_dir(),
            capacity=settings.image_writer_queue,
            exit_before_write=settings.fault_exit_before_write,
        )
        self._preference: Preference | None = None
        self._passed_over = PassedOver()
        self._sizes_ahead = QueuedSizes(factory)

    def run(self, job_id: str) -> str:
        """Claim the best queued job this message wakes us for, with groupmates that share its encoding.

        A message only wakes the worker (SQL is the truth): the job claimed is the best one queued, by
        priority, then the size the worker just rendered, then age, so it may not be `job_id` itself.
        """
        claim = with_retries(self._factory, lambda session: self._claim(session, job_id))
        if isinstance(claim, str):
            return claim
        log.info("claimed job %s (attempt %d)", claim.job_id, claim.attempt)  # before the groupmates' claims
        groupmates = self._claim_groupmates(claim)
        for each in groupmates:
            log.info("claimed job %s (attempt %d)", each.job_id, each.attempt)
        claims = [claim, *groupmates]
        for each in claims:
            self.leases.hold(each)
        embeds = self._encode_group(claims) if len(claims) > 1 else {}
        outcomes = [self._render_claimed(each, embeds.get(each.job_id)) for each in claims]
        return outcomes[0] if len(claims) == 1 else f"{outcomes[0]} (+{len(claims) - 1} grouped)"

    def drain(self) -> None:
        """Wait until every rendered image is written and committed."""
        self.writer.drain()

    def close(self) -> None:
        """Warm shutdown: write what is rendered, then stop the writer and lease threads."""
        self.writer.close()
        self.leases.close()

    def warm_up(self) -> float:
        """Load, place and compile the worker's model for the sizes queued for it (seconds spent)."""
        model, dtype = self._settings.resolved_worker_model(), self._settings.worker_dtype
        return self._holder.warm_up(model, dtype, self._sizes_ahead.get(model, dtype)[:2])

    def _claim(self, session: Session, job_id: str) -> Claim | str:
        if is_paused(session):
            hand_back(session, job_id=job_id)  # resume republishes it; nothing is lost
            return "paused"
        candidates = next_job_ids(
            session,
            model=self._model,  # jobs of other models wait for their own workers
            preference=self._preference,
            passed_over=self._passed_over,
            max_wait_s=self._settings.max_reorder_wait_s,
            now=time.monotonic(),
        )
        for candidate in candidates:
            claim = claim_job(session, job_id=candidate)
            if claim is not None:
                return claim
        return "exhausted" if fail_if_exhausted(session, job_id=job_id) else "skipped"

    def _claim_groupmates(self, claim: Claim) -> list[Claim]:
        """Claim compatible queued jobs, as many as is fair; their own messages will be skipped."""
        if self._settings.encode_group_size <= 1 or not can_share_encoding(claim):
            return []  # without reading how many workers share the queue

        def claim_some(session: Session) -> list[Claim]:
            ids = groupmates(session, claim=claim, limit=self._fair_groupmates(session))
            claimed = (claim_job(session, job_id=job_id) for job_id in ids)
            return [c for c in claimed if c is not None]

        return with_retries(self._factory, claim_some)

    def _fair_groupmates(self, session: Session) -> int:
        """Up to ENCODE_GROUP_SIZE - 1, leaving the other workers of the model their share (see ordering)."""
        silence = silent_after_s(self._settings.heartbeat_interval_s)
        workers = serving_workers(session, model=self._model, now=utcnow(), silent_after_s=silence)
        most = self._settings.encode_group_size - 1
        queued = claimable_count(session, model=self._model, at_most=max(workers, 1) * most)
        return fair_groupmates(queued=queued, workers=workers, max_groupmates=most)

    def _stats_row(self, record: RenderRecord | None) -> dict[str, Any] | None:
        """A render's job_stats columns with this worker's identity; None without a record."""
        columns = stats_columns(record)
        return None if columns is None else {**columns, **self._identity}

    def _encode_group(self, claims: list[Claim]) -> dict[str, SharedEncoding]:
        """Encode every claimed job's prompt in one pass of the (streamed) text encoder."""
        first = claims[0].params
        try:
            engine, _ = self._holder.get(first.model, first.dtype)
        except Exception:  # the model cannot load: each job then fails on its own, with the reason
            log.warning("group of %d: %s did not load; jobs render one by one", len(claims), first.model)
            return {}  # raising here left the whole group `running` until the reconciler requeued it
        engine.expect(self._sizes_ahead.get(first.model, first.dtype))
        started = time.perf_counter()
        embeds = engine.encode_group([c.params.prompt for c in claims], first.width, first.height)
        if embeds is None:
            return {}
        share = (time.perf_counter() - started) / len(claims)
        return {
            claim.job_id: SharedEncoding(embeds=each, seconds=share, group=len(claims))
            for claim, each in zip(claims, embeds, strict=True)
        }

    def _render_claimed(self, claim: Claim, shared: SharedEncoding | None = None) -> str:
        stats: RenderRecord | None = None
        try:
            result, load_s = self._render(claim, shared)
            result.stats.load_s += load_s
            self._preference = Preference.of(claim.params)
            self.writer.submit(
                RenderedImage(claim, result.image, result.stats, self._stats_row(result.stats) or {})
            )
            return "rendered"
        except RenderCancelled:
            outcome = self._store(cancel_running_job, claim, stats=self._stats_row(stats)) or "cancelled"
        except LadderExhausted as error:
            stats = error.record
            outcome = self._store(fail_job, claim, error=str(error), stats=self._stats_row(stats)) or "failed"
        except EngineError as error:
            outcome = self._store(fail_job, claim, error=str(error), stats=None) or "failed"
        except Exception as error:
            log.exception("job %s failed", claim.job_id)
            message = f"{type(error).__name__}: {error}"
            outcome = self._store(fail_job, claim, error=message, stats=self._stats_row(stats)) or "failed"
        self.leases.release(claim.job_id)
        return outcome

    def _render(self, claim: Claim, shared: SharedEncoding | None = None) -> tuple[Any, float]:
        """Render on the job's dtype; fp16 output that is NaN or black is rendered again in bf16."""
        engine, load_s = self._holder.get(claim.params.model, claim.params.dtype)
        engine.expect(self._sizes_ahead.get(claim.params.model, claim.params.dtype))
        request = to_request(claim.params)
        embeds = shared.embeds if shared else None
        result = engine.render(request, on_step=self._step_writer(claim), embeds=embeds)
        if shared is not None:
            result.stats.encode_s = shared.seconds  # this job's share of the group's encoder pass
            result.stats.notes.group = shared.group
        if result.output_bad and claim.params.dtype == "fp16":
            log.warning("job %s: fp16 output was NaN or black; rendering again in bf16", claim.job_id)
            engine, reload_s = self._holder.get(claim.params.model, "bf16")
            result = engine.render(request, on_step=self._step_writer(claim))
            load_s += reload_s
            result.stats.notes.retry = "fp16 output NaN or black; retried in bf16"
        if result.output_bad:
            # Kept (the job did render), but said plainly in its stats rather than passed off as fine.
            result.stats.notes.warnings.append("output is NaN or black")
        return result, load_s

    def _step_writer(self, claim: Claim) -> Any:
        marker = self._settings.fault_exit_on_prompt
        poisoned = bool(marker) and marker in claim.params.prompt  # type: ignore[operator]

        def write_step(step: int, _total: int) -> bool:
            if poisoned:
                os._exit(1)  # testing only (FAULT_EXIT_ON_PROMPT): die mid-job like a crashed worker
            return self.leases.step(claim.job_id, step)

        return write_step

    def _store(self, write: Any, claim: Claim, **values: Any) -> str | None:
        return None if commit_fenced(self._factory, write, claim, **values) else "lease lost"


class QueuedSizes:
    """The sizes queued for a model, read at most every few seconds (the engine plans for the largest)."""

    def __init__(self, factory: sessionmaker[Session], max_age_s: float = 10.0) -> None:
        self._factory = factory
        self._max_age_s = max_age_s
        self._cache: dict[tuple[str, str], tuple[float, list[tuple[int, int]]]] = {}

    def get(self, model: str, dtype: str) -> list[tuple[int, int]]:
        """Distinct queued sizes for this model and dtype, largest first."""
        read_at, sizes = self._cache.get((model, dtype), (-1e9, []))
        if time.monotonic() - read_at > self._max_age_s:
            sizes = with_retries(self._factory, lambda s: queued_sizes(s, model=model, dtype=dtype))
            self._cache[(model, dtype)] = (time.monotonic(), sizes)
        return sizes


@dataclass(frozen=True)
class SharedEncoding:
    """One job's prompt embeddings from a group's single text-encoder pass, and its share of the time."""

    embeds: tuple[list[Any], list[Any]]
    seconds: float
    group: int
