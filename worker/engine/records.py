"""What the engine reports: each attempt on a rung, a ladder that ran out, and where the weights are."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Any

import torch

from worker.engine.loading import EngineError
from worker.engine.plan import Plan


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


@dataclass(frozen=True)
class PlacementView:
    """A read-only look at where the engine keeps the pipeline now (for stats, benchmarks, profile)."""

    rung: str
    description: str
    resident_blocks: int
    total_blocks: int
    streamed_bytes_per_step: int
    text_encoder_streamed: bool
    planned_for: tuple[int, int] | None
    compiled: bool


def release_memory(device: torch.device) -> None:
    """Free what a failed attempt or an old placement left behind."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
