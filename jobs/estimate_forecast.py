"""A worker's stored forecast (worker/engine/forecast.py) read back, and priced for any size.

The worker forecasts common sizes only. Another size takes the two nearest forecast sizes by pixel count
and goes along the line through them: peak memory is the weights plus activations that grow with the
pixels, so scaling a whole peak by the pixel ratio would scale the weights too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ForecastPoint:
    """The planner's prediction for one size: peak bytes, and seconds as base + per denoising step."""

    width: int
    height: int
    peak_bytes: int
    seconds_base: float
    seconds_per_step: float

    def seconds(self, steps: int) -> float:
        """Seconds per image at this many steps."""
        return self.seconds_base + self.seconds_per_step * steps

    @property
    def pixels(self) -> int:
        """Width times height."""
        return self.width * self.height


def forecast_points(forecast: list[dict[str, Any]] | None) -> list[ForecastPoint]:
    """The forecast's sizes as points; entries that are not well formed are left out."""
    points = []
    for entry in forecast or []:
        try:
            points.append(
                ForecastPoint(
                    width=int(entry["width"]),
                    height=int(entry["height"]),
                    peak_bytes=int(entry["predicted_peak_bytes"]),
                    seconds_base=float(entry["seconds_base"]),
                    seconds_per_step=float(entry["seconds_per_step"]),
                )
            )
        except (KeyError, TypeError, ValueError):
            continue
    return [p for p in points if p.pixels > 0]


def nearest_forecast(points: list[ForecastPoint], width: int, height: int) -> ForecastPoint | None:
    """The forecast for this size: its own, else along the line through the two nearest by pixel count."""
    exact = next((p for p in points if (p.width, p.height) == (width, height)), None)
    if exact is not None or not points:
        return exact
    pixels = width * height
    by_distance = sorted(points, key=lambda p: abs(p.pixels - pixels))
    near = by_distance[0]
    other = next((p for p in by_distance[1:] if p.pixels != near.pixels), None)
    if other is None:
        return _scaled(near, width, height, pixels / near.pixels)
    return _along(near, other, width, height)


def _along(near: ForecastPoint, other: ForecastPoint, width: int, height: int) -> ForecastPoint:
    pixels = width * height
    t = (pixels - near.pixels) / (other.pixels - near.pixels)
    # Below both sizes the line could fall under zero: the nearest scaled by the pixel ratio is the floor.
    below = pixels < min(near.pixels, other.pixels)
    floor = _scaled(near, width, height, pixels / near.pixels if below else 0.0)

    def value(a: float, b: float, least: float) -> float:
        return max(a + t * (b - a), least)

    return ForecastPoint(
        width=width,
        height=height,
        peak_bytes=round(value(near.peak_bytes, other.peak_bytes, floor.peak_bytes)),
        seconds_base=value(near.seconds_base, other.seconds_base, floor.seconds_base),
        seconds_per_step=value(near.seconds_per_step, other.seconds_per_step, floor.seconds_per_step),
    )


def _scaled(point: ForecastPoint, width: int, height: int, ratio: float) -> ForecastPoint:
    return ForecastPoint(
        width=width,
        height=height,
        peak_bytes=round(point.peak_bytes * ratio),
        seconds_base=point.seconds_base * ratio,
        seconds_per_step=point.seconds_per_step * ratio,
    )
