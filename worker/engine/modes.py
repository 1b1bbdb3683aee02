"""The offload modes a worker can run in (its OFFLOAD_MODE setting), defined once.

The planner, the engine and diffusers' placement read them here. No torch: the planner's tests and the
worker's start-up check import this module without loading a model.
"""

from __future__ import annotations

from typing import Literal, get_args

# diffusers' own placements, applied whole to the pipeline (offload.py); the planner's last rungs too.
DiffusersMode = Literal["none", "model", "sequential", "group"]
DIFFUSERS_MODES: tuple[DiffusersMode, ...] = get_args(DiffusersMode)
# auto: the planner picks a placement per job; stream: the same, never all-resident; else a fixed mode.
OffloadMode = Literal["auto", "stream", DiffusersMode]
OFFLOAD_MODES: tuple[OffloadMode, ...] = get_args(OffloadMode)
