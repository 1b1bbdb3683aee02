"""Keeping one engine loaded in a worker process, under the budget the settings give."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from jobs.settings import Settings
from worker.engine.budget import apply_device_cap, resolve_budget
from worker.engine.costs import ActivationModel, Budget
from worker.engine.engine import Engine
from worker.engine.fitted_costs import DEFAULT_ACTIVATIONS, calibrated_scale, with_scale
from worker.engine.loading import (
    EngineError,
    LoadedPipeline,
    load_pipeline,
    model_source,
    pick_device,
    set_attention_backend,
    set_vae_slicing,
)
from worker.engine.memory import device_name
from worker.engine.modes import OFFLOAD_MODES
from worker.engine.records import release_memory

log = logging.getLogger(__name__)


DEFAULT_WARM_UP_SIZE = (1024, 1024)


def should_compile(setting: str, model: str, device: Any) -> bool:
    """COMPILE=auto compiles on CUDA for real and full-size models, never for the tiny CPU model."""
    if setting != "auto":
        return setting == "on"
    return bool(device.type == "cuda" and model != "synthetic:tiny")


class EngineHolder:
    """Keeps one engine loaded across jobs; loads another only when a job names another model or dtype.

    The VRAM budget becomes the allocator cap once, before the first weights load, so `auto` measures
    the card's free memory as the user left it.
    """

    def __init__(self, settings: Settings, history: Callable[[str, str], list[Any]] | None = None) -> None:
        if settings.offload_mode not in OFFLOAD_MODES:  # refused now, not after minutes of loading
            raise EngineError(f"OFFLOAD_MODE must be one of {OFFLOAD_MODES}, got {settings.offload_mode!r}")
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
        # A synthetic model is built on the GPU the first time (seconds, not CPU minutes); that must
        # happen before the budget becomes the allocator cap, or a 12 GB cap refuses the 20 GB build.
        model_source(model, self._settings.resolved_model_cache_dir(), device)
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
            compile=should_compile(self._settings.compile, model, device),
        )
        self.loads += 1
        log.info("loaded %s (%s) in %.1fs [load #%d]", model, dtype, loaded.load_seconds, self.loads)
        return self.engine, loaded.load_seconds

    def warm_up(self, model: str, dtype: str, sizes: list[tuple[int, int]]) -> float:
        """Load, place and compile before the first job, for the sizes the worker expects; seconds spent."""
        engine, _ = self.get(model, dtype)
        if not engine.compile:
            return 0.0  # eager placement is quick; the first job does it
        seconds = engine.warm_up(sizes or [DEFAULT_WARM_UP_SIZE])
        log.info("warmed up %s for %s in %.1fs", model, sizes or [DEFAULT_WARM_UP_SIZE], seconds)
        return seconds

    def _load(self, model: str, dtype: str, device: Any) -> LoadedPipeline:
        cache = self._settings.resolved_model_cache_dir()
        loaded = load_pipeline(model, dtype=dtype, cache_dir=cache, device=device)
        set_attention_backend(loaded, self._settings.attention_backend)
        set_vae_slicing(loaded, self._settings.vae_slicing)
        return loaded

    def _activations(self, model: str, device: Any) -> ActivationModel:
        records = self._history(model, device_name(device)) if self._history else []
        scale = calibrated_scale(records)
        if records:
            log.info("activation estimates scaled by %.3f from %d recorded jobs", scale, len(records))
        return with_scale(DEFAULT_ACTIVATIONS, scale)
