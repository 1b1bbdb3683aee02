"""diffusers' own offload modes, applied whole to a pipeline.

The planner's budgeted placements (plan.py, placement.py) need none of them; the engine uses these
when OFFLOAD_MODE names one, and `sequential` ends every ladder.
"""

from __future__ import annotations

import torch
from diffusers import ZImagePipeline

from worker.engine.modes import DIFFUSERS_MODES


def apply_offload(pipeline: ZImagePipeline, mode: str, device: torch.device) -> str:
    """Place the pipeline for `mode`; returns the mode in effect (always "none" on the CPU)."""
    if mode not in DIFFUSERS_MODES:
        raise ValueError(f"offload mode must be one of {DIFFUSERS_MODES}, got {mode!r}")
    if device.type == "cpu" or mode == "none":
        pipeline.to(device)
        return "none"
    if mode == "model":
        pipeline.enable_model_cpu_offload(device=device)
    elif mode == "sequential":
        pipeline.enable_sequential_cpu_offload(device=device)
    else:
        # Block-level groups with a side stream, so the next block's copy overlaps this one's compute.
        pipeline.enable_group_offload(
            onload_device=device,
            offload_device=torch.device("cpu"),
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=True,
        )
    return mode
