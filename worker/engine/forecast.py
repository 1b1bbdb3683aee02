"""The planner's forecast for common sizes: which rung, what peak and how many seconds, before any job runs.

The worker stores it with its presence, so the API can answer "does this size fit, and how long will the
batch take?" without importing torch; measured stats replace it once jobs of that size have run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from worker.engine.engine import Engine
from worker.engine.plan import predicted_seconds

# Square sizes and the common portrait and landscape ones of SDXL-class models, up to the largest allowed.
COMMON_SIZES = (
    (512, 512), (768, 768), (1024, 1024), (1536, 1536), (2048, 2048),
    (832, 1216), (1216, 832), (768, 1344), (1344, 768), (1024, 1536), (1536, 1024),
)  # fmt: skip


@dataclass(frozen=True)
class SizeForecast:
    """One size under the worker's budget: its first rung, predicted peak, and seconds as base + per step."""

    width: int
    height: int
    rung: str
    predicted_peak_bytes: int
    fits: bool
    seconds_base: float
    seconds_per_step: float


def forecast_sizes(engine: Engine, sizes: tuple[tuple[int, int], ...] = COMMON_SIZES) -> list[dict[str, Any]]:
    """The first plan of each size's ladder, priced by the engine's speed model."""
    return [asdict(forecast) for size in sizes if (forecast := _forecast(engine, *size)) is not None]


def _forecast(engine: Engine, width: int, height: int) -> SizeForecast | None:
    ladder = engine.ladder(width, height)
    if not ladder:
        return None
    plan = ladder[0]
    one, ten = (predicted_seconds(plan, engine.speed, engine.sizes, width, height, n) for n in (1, 10))
    per_step = (ten - one) / 9
    return SizeForecast(
        width=width,
        height=height,
        rung=plan.rung,
        predicted_peak_bytes=plan.predicted_peak_bytes,
        fits=plan.predicted_peak_bytes <= engine.budget.device_bytes,
        seconds_base=round(one - per_step, 4),
        seconds_per_step=round(per_step, 4),
    )
