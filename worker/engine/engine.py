"""The Engine: one loaded pipeline, placed per job by the planner, with an OOM ladder.

For each job it plans the fastest placement that fits the budget, renders, and on
`torch.cuda.OutOfMemoryError` frees memory (outside the except block, where the traceback no longer
pins tensors) and retries on the next rung. Every attempt is recorded with the job's stats.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import torch

from worker.engine.compiled import graphs_compiled
from worker.engine.costs import ActivationModel, Budget, SpeedModel
from worker.engine.fitted_costs import DEFAULT_SPEED, compiled_activations, with_scale
from worker.engine.loading import EngineError, LoadedPipeline
from worker.engine.memory import device_name, device_uuid, peak_bytes
from worker.engine.modes import OFFLOAD_MODES
from worker.engine.offload import apply_offload
from worker.engine.placement import PlannedPlacement, measure_sizes, set_vae_tiling
from worker.engine.plan import (
    DIFFUSERS_RUNGS,
    PLANNED_RUNGS,
    Plan,
    diffusers_plan,
    fit_to_size,
    placement_key,
    plan_ladder,
)
from worker.engine.records import (
    EXHAUSTED,
    OUT_OF_MEMORY,
    Attempt,
    LadderExhausted,
    PlacementView,
    RenderRecord,
    release_memory,
)
from worker.engine.render import Embeds, RenderRequest, RenderResult, StepCallback, render

log = logging.getLogger(__name__)
# Each out-of-memory error raises the activation estimates by this factor, up to the cap.
OOM_SCALE_STEP = 1.1
OOM_SCALE_CAP = 2.0


class Engine:
    """A pipeline and its placement, planned for the largest size ahead and kept across jobs.

    The placement is planned for the largest size the engine has met or been told to expect, so a
    mixed-size batch runs on one placement: a job that fits it never moves weights; only a job
    bigger than any before re-plans, and then only the blocks that change move.
    """

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
        compile: bool = False,
    ) -> None:
        if mode not in OFFLOAD_MODES:
            raise EngineError(f"offload mode must be one of {OFFLOAD_MODES}, got {mode!r}")
        if vae_tiling not in ("auto", "on", "off"):
            raise EngineError(f"vae tiling must be auto, on or off, got {vae_tiling!r}")
        self.loaded = loaded
        self.mode = mode
        self.budget = budget
        self.activations = compiled_activations(activations) if compile else activations
        self.speed = speed or DEFAULT_SPEED
        self.vae_tiling = vae_tiling
        self.compile = compile
        self.sizes = measure_sizes(loaded.pipeline)
        self._reload = reload
        self._planned: PlannedPlacement | None = None
        self._diffusers_mode: str | None = None
        self._planned_for: tuple[int, int] | None = None
        self.plan: Plan | None = None
        # Reloads done while re-placing (leaving a diffusers mode); the next job's stats carry them.
        self.unreported_load_s = 0.0

    @property
    def device(self) -> torch.device:
        """Where jobs compute."""
        return self.loaded.device

    @property
    def placement(self) -> PlacementView | None:
        """Where the weights are now; None before the first job."""
        plan = self.plan
        if plan is None:
            return None
        return PlacementView(
            rung=plan.rung,
            description=plan.describe(),
            resident_blocks=len(plan.transformer_resident),
            total_blocks=plan.transformer_blocks_total,
            streamed_bytes_per_step=plan.streamed_bytes_per_step,
            text_encoder_streamed=plan.text_encoder_streamed,
            planned_for=self._planned_for,
            compiled=self.compile and plan.rung in PLANNED_RUNGS,
        )

    def expect(self, sizes: Iterable[tuple[int, int]]) -> None:
        """Plan for these sizes too (the queued jobs the worker can see), so one placement serves all."""
        for size in sizes:
            if self._planned_for is None or pixels(size) > pixels(self._planned_for):
                self._planned_for = size

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

    def job_ladder(self, width: int, height: int) -> list[Plan]:
        """The plans to try for one job: the ladder of the largest size planned for, fitted to this job."""
        self.expect([(width, height)])
        assert self._planned_for is not None
        plans = self.ladder(*self._planned_for)
        # Only the first plan is fitted to this job's size (its VAE tiles only if it must); the rest are
        # fallbacks for a wrong prediction and keep their conservative form.
        return [self._fit(plans[0], width, height), *plans[1:]]

    def _fit(self, plan: Plan, width: int, height: int) -> Plan:
        tiling = {"auto": (False, True), "on": (True,), "off": (False,)}[self.vae_tiling]
        fitted = fit_to_size(plan, self.sizes, self.activations, self.budget, (width, height), tiling=tiling)
        return fitted or plan

    def place(self, plan: Plan) -> bool:
        """Put a plan into effect, moving only what changes; returns whether any weights moved."""
        moved = self.plan is None or placement_key(plan) != placement_key(self.plan)
        if plan.rung in DIFFUSERS_RUNGS:
            self._place_diffusers(plan.rung)
        else:
            if self._diffusers_mode is not None:
                self._back_to_host()
            if self._planned is None:
                self._planned = PlannedPlacement(self.loaded.pipeline, self.device, compile=self.compile)
            if moved:
                self._planned.apply(plan)
            else:
                set_vae_tiling(self.loaded.pipeline, plan.vae_tiled)  # the only per-job change
        self.plan = plan
        return moved

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
        self, request: RenderRequest, on_step: StepCallback | None = None, embeds: Embeds | None = None
    ) -> RenderResult:
        """Render on the fastest rung that fits, walking down the ladder on out-of-memory errors."""
        attempts: list[Attempt] = []
        for plan in self.job_ladder(request.width, request.height):
            started = time.perf_counter()
            outcome = self._attempt(plan, request, on_step, embeds)
            if isinstance(outcome, RenderResult):
                attempts.append(Attempt(plan, "ok", time.perf_counter() - started))
                self._annotate(outcome.stats, plan, attempts)
                return outcome
            attempts.append(Attempt(plan, f"{OUT_OF_MEMORY}: {outcome}", time.perf_counter() - started))
            log.warning("out of memory on %s; trying the next rung", plan.describe())
            self._estimate_higher()
            self.plan = None
            release_memory(self.device)
        raise LadderExhausted(self._exhausted(attempts))

    def _estimate_higher(self) -> None:
        """After an out-of-memory error, plan later jobs with larger activation estimates.

        The estimates were too low for this card; without this, every later job would fail on the same
        first rung before falling back. Capped at twice the fitted values, as calibration is.
        """
        scale = min(OOM_SCALE_CAP, self.activations.scale * OOM_SCALE_STEP)
        self.activations = with_scale(self.activations, scale)
        log.warning("activation estimates raised to %.2fx after an out-of-memory error", scale)

    def _attempt(
        self, plan: Plan, request: RenderRequest, on_step: StepCallback | None, embeds: Embeds | None
    ) -> RenderResult | str:
        try:
            started = time.perf_counter()
            moved = self.place(plan)
            place_s = time.perf_counter() - started
            graphs = graphs_compiled()
            result = render(
                self.loaded,
                request,
                on_step,
                embeds=embeds,
                after_denoise=self._planned.drop_prefetched if self._planned else None,
            )
        except torch.cuda.OutOfMemoryError as error:
            # Only the message leaves this block: the traceback would keep the failed step's tensors alive.
            return str(error).split("\n")[0][:300]
        result.stats.place_s, result.stats.placement_changed = place_s, moved
        result.stats.recompiles = graphs_compiled() - graphs
        if result.stats.recompiles:
            log.info("compiled %d graphs for %dx%d", result.stats.recompiles, request.width, request.height)
        return result

    def _annotate(self, record: RenderRecord, plan: Plan, attempts: list[Attempt]) -> None:
        """Complete a render's record with the plan it ran on, every attempt and the placement's context."""
        record.rung, record.plan, record.attempts = plan.rung, plan, attempts
        self._add_context(record)

    def _exhausted(self, attempts: list[Attempt]) -> RenderRecord:
        """The record of a job that ran out of memory on every rung: each attempt and the last one's peak."""
        record = RenderRecord(
            rung=EXHAUSTED,
            device_name=device_name(self.device),
            device_uuid=device_uuid(self.device),
            attempts=attempts,
        )
        record.peak_allocated_bytes, record.peak_reserved_bytes = peak_bytes(self.device)
        self._add_context(record)
        return record

    def _add_context(self, record: RenderRecord) -> None:
        # Reloads done while re-placing are charged to this job; the budget is a cap only on CUDA.
        record.load_s += self.unreported_load_s
        self.unreported_load_s = 0.0
        record.vram_budget_bytes = self.budget.device_bytes if self.device.type == "cuda" else None
        record.planned_for, record.compiled = self._planned_for, self.compile

    def encode(
        self, prompts: list[str], negative: list[str] | None, guidance_scale: float, width: int, height: int
    ) -> Embeds:
        """Encode several prompts in one pass of the text encoder (one stream of its weights)."""
        if self.plan is None:
            self.place(self.job_ladder(width, height)[0])
        with torch.inference_mode():
            return self.loaded.pipeline.encode_prompt(  # type: ignore[no-any-return]
                prompt=list(prompts),  # diffusers rewrites the list in place with the chat template
                device=self.device,
                do_classifier_free_guidance=guidance_scale > 0,
                negative_prompt=negative,
            )

    def encode_group(self, prompts: list[str], width: int, height: int) -> list[Embeds] | None:
        """Each prompt's embeddings from one shared encoder pass; None if it ran out of memory.

        Streaming the encoder's 7 GB once per group instead of once per job is most of the gap between
        single and queued jobs. Out of memory here only means each job encodes on its own.
        """
        try:
            positive, _negative = self.encode(prompts, None, 0.0, width, height)
        except torch.cuda.OutOfMemoryError:
            positive = None
        if positive is None:
            release_memory(self.device)
            return None
        return [([embedding], []) for embedding in positive]

    def warm_up(self, sizes: list[tuple[int, int]]) -> float:
        """Render a short job per size (two at least), so placement and compilation precede real jobs.

        Two prompt lengths and two sizes let the compiler generalise over shapes at once, so later
        sizes and prompts reuse the same graphs instead of recompiling.
        """
        started = time.perf_counter()
        self.expect(sizes)
        shapes = sizes if len(sizes) > 1 else sizes * 2
        for index, (width, height) in enumerate(shapes):
            prompt = WARM_UP_PROMPTS[index % len(WARM_UP_PROMPTS)]
            self.render(RenderRequest(prompt, width, height, steps=2, guidance_scale=0.0, seed=index))
        return time.perf_counter() - started


# A short and a long prompt: the text length is a shape the compiled blocks must cover.
WARM_UP_PROMPTS = (
    "a lighthouse at dusk",
    "a detailed oil painting of a lighthouse on a rocky cliff above a stormy sea at dusk, waves crashing "
    "below, gulls in the wind, warm light in the lantern room, dark clouds, dramatic rim light, "
    "impasto brush strokes, muted palette with a single warm accent, wide angle, high detail",
)


def pixels(size: tuple[int, int]) -> int:
    """A size's pixel count, which is what activations grow with."""
    return size[0] * size[1]
