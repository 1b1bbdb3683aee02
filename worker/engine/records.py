"""What the engine reports: the record of a render, a ladder that ran out, and where the weights are.

A `RenderRecord` is built by the engine and annotated by the worker (notes); it is serialised once, where the
worker stores a job's stats: its measurements become job_stats columns, and `stored_plan()` is the JSON `plan`
column (the plan's fields, `planned_for`, `compiled`, `attempts`, and `notes` when something was noted).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from typing import Any

import diffusers
import torch

from worker.engine.loading import EngineError
from worker.engine.plan import Plan

# The rung recorded for a job that ran out of memory on every rung (it rendered on none).
EXHAUSTED = "exhausted"
# How an attempt's outcome starts when it ran out of memory; the rest is the error's first line.
OUT_OF_MEMORY = "out of memory"


@dataclass(frozen=True)
class Attempt:
    """One try of a job on one rung."""

    plan: Plan
    outcome: str
    seconds: float

    @property
    def ran_out_of_memory(self) -> bool:
        """Whether this try ended in an out-of-memory error (and the ladder moved on)."""
        return self.outcome.startswith(OUT_OF_MEMORY)

    def stored(self) -> dict[str, Any]:
        """As the job's stored plan lists it."""
        return {
            "plan": self.plan.describe(),
            "rung": self.plan.rung,
            "outcome": self.outcome,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class RenderNotes:
    """What else happened to a render: a retry, the group that shared its encoder pass, and warnings."""

    retry: str | None = None
    group: int | None = None
    warnings: list[str] = field(default_factory=list)

    def stored(self) -> dict[str, Any]:
        """Only what was noted (an empty dict when nothing was)."""
        noted: dict[str, Any] = {"retry": self.retry, "group": self.group, "warnings": self.warnings}
        return {key: value for key, value in noted.items() if value}


@dataclass
class RenderRecord:
    """The record of one render: rung, plan, attempts, notes, phase times and memory.

    The scalar fields and properties are named after the job_stats columns; `plan`, `attempts`, `notes`,
    `planned_for` and `compiled` are stored together in its JSON `plan` column (`stored_plan`).
    """

    rung: str
    device_name: str
    # The card's UUID (GPU-...), which tells two cards of one name apart; None on the CPU.
    device_uuid: str | None = None
    plan: Plan | None = None
    attempts: list[Attempt] = field(default_factory=list)
    notes: RenderNotes = field(default_factory=RenderNotes)
    # The size the placement was planned for (the largest seen or queued), and whether blocks were compiled.
    planned_for: tuple[int, int] | None = None
    compiled: bool = False
    torch_version: str = torch.__version__
    diffusers_version: str = diffusers.__version__
    peak_allocated_bytes: int | None = None
    peak_reserved_bytes: int | None = None
    device_total_bytes: int | None = None
    device_used_start_bytes: int | None = None
    device_free_start_bytes: int | None = None
    device_used_end_bytes: int | None = None
    device_free_end_bytes: int | None = None
    host_rss_bytes: int | None = None
    vram_budget_bytes: int | None = None
    load_s: float = 0.0
    encode_s: float = 0.0
    denoise_s: float = 0.0
    decode_s: float = 0.0
    save_s: float = 0.0
    # Seconds spent moving weights before this job, and whether any moved (a re-placement).
    place_s: float = 0.0
    placement_changed: bool = False
    # Graphs compiled during this job (a new shape family); 0 once the compiled blocks are warm.
    recompiles: int = 0

    @property
    def predicted_peak_bytes(self) -> int | None:
        """The plan's predicted peak; None without a plan."""
        return self.plan.predicted_peak_bytes if self.plan else None

    @property
    def oom_attempts(self) -> int:
        """How many attempts ran out of memory (each but an exhausted job's last was retried a rung lower)."""
        return sum(attempt.ran_out_of_memory for attempt in self.attempts)

    def stored_plan(self) -> dict[str, Any]:
        """The value of the job's JSON `plan` column."""
        stored: dict[str, Any] = self.plan.record() if self.plan else {}
        stored.update(
            rung=self.rung,
            planned_for=list(self.planned_for) if self.planned_for else None,
            compiled=self.compiled,
            attempts=[attempt.stored() for attempt in self.attempts],
        )
        if notes := self.notes.stored():
            stored["notes"] = notes
        return stored


class LadderExhausted(EngineError):
    """Every rung ran out of memory; the job fails as resource_exhausted and the worker lives on."""

    def __init__(self, record: RenderRecord) -> None:
        super().__init__(f"resource_exhausted: out of memory on every rung ({len(record.attempts)} attempts)")
        self.record = record

    @property
    def attempts(self) -> list[Attempt]:
        """Every rung tried, in order."""
        return self.record.attempts


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
