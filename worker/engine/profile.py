"""The per-resolution VRAM test that VRAM guides tell people to write, done properly.

For each offload mode and size it renders through the Engine under a hard cap and measures peak
allocated and reserved memory and seconds per image, and whether the run fit the budget.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from worker.engine.budget import apply_device_cap, resolve_budget
from worker.engine.engine import Engine
from worker.engine.fitted_costs import DEFAULT_ACTIVATIONS
from worker.engine.loading import check_device_for, load_pipeline, pick_device
from worker.engine.records import LadderExhausted
from worker.engine.render import RenderRequest

PROMPT = "a lighthouse on a cliff above a stormy sea at dusk"


@dataclass(frozen=True)
class ProfileRow:
    """One (mode, size) measurement."""

    mode: str
    width: int
    height: int
    seconds_per_image: float | None
    peak_allocated_bytes: int | None
    peak_reserved_bytes: int | None
    predicted_peak_bytes: int | None
    budget_bytes: int | None
    fits: bool
    plan: str
    error: str | None = None

    def as_dict(self) -> dict[str, object]:
        """JSON-ready."""
        return asdict(self)


def profile(
    model: str,
    *,
    budget_gb: str,
    sizes: Iterable[tuple[int, int]],
    modes: Iterable[str],
    cache_dir: Path,
    steps: int = 9,
    images: int = 1,
    dtype: str = "bf16",
    on_row: Callable[[ProfileRow], None] | None = None,
) -> list[ProfileRow]:
    """Measure every mode at every size under the budget, one warm-up image each, then `images` timed."""
    device = pick_device()
    check_device_for(model, device)
    budget = resolve_budget(budget_gb, "auto", device)
    loaded = load_pipeline(model, dtype=dtype, cache_dir=cache_dir, device=device)
    apply_device_cap(budget, device)  # after loading: a synthetic model is built on the GPU once
    rows = []
    for mode in modes:
        engine = Engine(
            loaded,
            mode=mode,
            budget=budget,
            activations=DEFAULT_ACTIVATIONS,
            reload=lambda: load_pipeline(model, dtype=dtype, cache_dir=cache_dir, device=device),
        )
        for width, height in sizes:
            row = measure(engine, mode, width, height, steps, images)
            rows.append(row)
            if on_row:
                on_row(row)
        engine.place_on_host()
        loaded = engine.loaded
    return rows


def measure(engine: Engine, mode: str, width: int, height: int, steps: int, images: int) -> ProfileRow:
    """Render one warm-up and `images` timed images at one size; an exhausted ladder is a row too."""
    budget = engine.budget.device_bytes if engine.device.type == "cuda" else None
    requests = [RenderRequest(PROMPT, width, height, steps, 0.0, seed) for seed in range(images + 1)]
    try:
        engine.render(requests[0])
        started = time.perf_counter()
        results = [engine.render(r) for r in requests[1:]]
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
    except LadderExhausted as error:
        return ProfileRow(
            mode, width, height, None, None, None, None, budget, False, "out of memory", str(error)
        )
    stats = [r.stats for r in results]
    reserved = _max(s.peak_reserved_bytes for s in stats)
    fits = budget is None or (reserved is not None and reserved <= budget)
    return ProfileRow(
        mode=mode,
        width=width,
        height=height,
        seconds_per_image=(time.perf_counter() - started) / len(results),
        peak_allocated_bytes=_max(s.peak_allocated_bytes for s in stats),
        peak_reserved_bytes=reserved,
        predicted_peak_bytes=_max(s.predicted_peak_bytes for s in stats),
        budget_bytes=budget,
        fits=fits,
        plan=engine.plan.short() if engine.plan else "",
    )


def _max(values: Iterable[int | None]) -> int | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None
