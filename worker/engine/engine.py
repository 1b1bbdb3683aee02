"""The Engine: one loaded pipeline, placed per job by the planner, with an OOM ladder.

For each job it plans the fastest placement that fits the budget, renders, and on
`torch.cuda.OutOfMemoryError` frees memory (outside the except block, where the traceback no longer
pins tensors) and retries on the next rung. Every attempt is recorded with the job's stats.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch

from worker.engine.calibration import DEFAULT_SPEED
from worker.engine.loading import EngineError, LoadedPipeline
from worker.engine.offload import apply_offload
from worker.engine.placement import PlannedPlacement, measure_sizes
from worker.engine.plan import (
    DIFFUSERS_RUNGS,
    ActivationModel,
    Budget,
    Plan,
    SpeedModel,
    diffusers_plan,
    plan_ladder,
)
from worker.engine.render import RenderRequest, RenderResult, StepCallback, render

log = logging.getLogger(__name__)
EngineMode = Literal["auto", "stream", "none", "model", "sequential", "group"]
ENGINE_MODES: tuple[str, ...] = get_args(EngineMode)


class LadderExhausted(EngineError):
    """Every rung ran out of memory; the job fails as resource_exhausted and the worker lives on."""

    def __init__(self, attempts: list[dict[str, Any]]) -> None:
        super().__init__(f"resource_exhausted: out of memory on every rung ({len(attempts)} attempts)")
        self.attempts = attempts


@dataclass
class Attempt:
    """One try of a job on one rung."""

    plan: Plan
    outcome: str
    seconds: float

    def record(self) -> dict[str, Any]:
        """As stored in the job's stats."""
        return {
            "plan": self.plan.describe(),
            "rung": self.plan.rung,
            "outcome": self.outcome,
            "seconds": round(self.seconds, 3),
        }


class Engine:
    """A pipeline and its placement, re-planned per job within the budget."""

    def __init__(
        self,
        loaded: LoadedPipeline,
        *,
        mode: str,
        budget: Budget,
        activations: ActivationModel,
        reload: Callable[[], LoadedPipeline] | None = None,
        speed: SpeedModel | None = None,
        vae_tiling: str = "auto",
    ) -> None:
        if mode not in ENGINE_MODES:
            raise EngineError(f"offload mode must be one of {ENGINE_MODES}, got {mode!r}")
        self.loaded = loaded
        self.mode = mode
        self.budget = budget
        self.activations = activations
        self.speed = speed or DEFAULT_SPEED
        if vae_tiling not in ("auto", "on", "off"):
            raise EngineError(f"vae tiling must be auto, on or off, got {vae_tiling!r}")
        self.vae_tiling = vae_tiling
        self.sizes = measure_sizes(loaded.pipeline)
        self._reload = reload
        self._planned: PlannedPlacement | None = None
        self._diffusers_mode: str | None = None
        self.plan: Plan | None = None
        # Reloads done while re-placing (leaving a diffusers mode); the next job's stats carry them.
        self.unreported_load_s = 0.0

    @property
    def device(self) -> torch.device:
        """Where jobs compute."""
        return self.loaded.device

    def ladder(self, width: int, height: int) -> list[Plan]:
        """The plans to try for this size, fastest first."""
        if self.mode in DIFFUSERS_RUNGS:
            first = diffusers_plan(self.mode, self.sizes, self.activations, width, height)  # type: ignore[arg-type]
            rest = (
                []
                if self.mode == "sequential"
                else [diffusers_plan("sequential", self.sizes, self.activations, width, height)]
            )
            return [first, *rest]
        ladder = plan_ladder(self.sizes, self.activations, self.budget, width, height, speed=self.speed)
        if self.mode == "stream":
            ladder = [p for p in ladder if p.rung != "resident"]
        if self.vae_tiling != "auto":
            # A forced setting keeps the planned rungs that tile (on) or not (off); sequential ends both.
            wanted = self.vae_tiling == "on"
            ladder = [p for p in ladder if p.rung == "sequential" or p.vae_tiled == wanted]
        return ladder

    def place(self, plan: Plan) -> bool:
        """Put a plan into effect, moving as little as possible; returns whether anything changed."""
        if plan == self.plan:
            return False
        release_memory(self.device)
        if plan.rung in DIFFUSERS_RUNGS:
            self._place_diffusers(plan.rung)
        else:
            if self._diffusers_mode is not None:
                self._back_to_host()
            if self._planned is None:
                self._planned = PlannedPlacement(self.loaded.pipeline, self.device)
            self._planned.apply(plan)
        self.plan = plan
        return True

    def set_budget(self, budget: Budget) -> None:
        """Re-plan under a new budget from the next job on (the placement shrinks before it grows)."""
        self.budget = budget
        self.plan = None

    def place_on_host(self) -> None:
        """Put every weight back in host memory (before handing the pipeline to something else)."""
        self._back_to_host()
        self.plan = None

    def _place_diffusers(self, mode: str) -> None:
        if self._diffusers_mode == mode:
            return
        self._back_to_host()
        apply_offload(self.loaded.pipeline, mode, self.device)
        self._diffusers_mode = mode

    def _back_to_host(self) -> None:
        """Undo the current placement; diffusers' hooks are undone by reloading, which is always clean."""
        if self._planned is not None:
            self._planned.remove()
            self._planned = None
        if self._diffusers_mode not in (None, "none") and self._reload is not None:
            started = time.perf_counter()
            self.loaded = self._reload()
            self.unreported_load_s += time.perf_counter() - started
        elif self._diffusers_mode in ("model", "sequential"):
            # accelerate's hooks put the offloaded weights back on the module when they are removed.
            self.loaded.pipeline.remove_all_hooks()
            self.loaded.pipeline.to("cpu")
        elif self._diffusers_mode == "group":
            raise EngineError("leaving diffusers group offload needs a reload; build the Engine with reload=")
        elif self._diffusers_mode == "none":
            self.loaded.pipeline.to("cpu")
        self._diffusers_mode = None
        release_memory(self.device)

    def render(
        self,
        request: RenderRequest,
        on_step: StepCallback | None = None,
        embeds: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
    ) -> RenderResult:
        """Render on the fastest rung that fits, walking down the ladder on out-of-memory errors."""
        attempts: list[Attempt] = []
        for plan in self.ladder(request.width, request.height):
            started = time.perf_counter()
            outcome = self._attempt(plan, request, on_step, embeds)
            if isinstance(outcome, RenderResult):
                attempts.append(Attempt(plan, "ok", time.perf_counter() - started))
                self._annotate(outcome, plan, attempts)
                return outcome
            attempts.append(Attempt(plan, f"out of memory: {outcome}", time.perf_counter() - started))
            log.warning("out of memory on %s; trying the next rung", plan.describe())
            self.plan = None
            release_memory(self.device)
        raise LadderExhausted([a.record() for a in attempts])

    def _attempt(
        self,
        plan: Plan,
        request: RenderRequest,
        on_step: StepCallback | None,
        embeds: tuple[list[torch.Tensor], list[torch.Tensor]] | None,
    ) -> RenderResult | str:
        try:
            changed = self.place(plan)
            return render(
                self.loaded,
                request,
                on_step,
                embeds=embeds,
                release_cache=changed,
                after_denoise=self._planned.drop_prefetched if self._planned else None,
            )
        except torch.cuda.OutOfMemoryError as error:
            # Only the message leaves this block: the traceback would keep the failed step's tensors alive.
            return str(error).split("\n")[0][:300]

    def _annotate(self, result: RenderResult, plan: Plan, attempts: list[Attempt]) -> None:
        stats = result.stats
        stats.load_s += self.unreported_load_s
        self.unreported_load_s = 0.0
        stats.offload_mode = plan.rung
        stats.predicted_peak_bytes = plan.predicted_peak_bytes
        stats.vram_budget_bytes = self.budget.device_bytes if self.device.type == "cuda" else None
        stats.plan = json.dumps({**plan.record(), "attempts": [a.record() for a in attempts]})

    def encode(
        self, prompts: list[str], negative: list[str] | None, guidance_scale: float, width: int, height: int
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Encode several prompts in one pass of the text encoder (one stream of its weights)."""
        if self.plan is None:
            self.place(self.ladder(width, height)[0])
        with torch.inference_mode():
            return self.loaded.pipeline.encode_prompt(  # type: ignore[no-any-return]
                prompt=list(prompts),  # diffusers rewrites the list in place with the chat template
                device=self.device,
                do_classifier_free_guidance=guidance_scale > 0,
                negative_prompt=negative,
            )


def release_memory(device: torch.device) -> None:
    """Free what a failed attempt or an old placement left behind."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
