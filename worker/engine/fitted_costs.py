"""The cost model's fitted constants: activation and speed estimates from bench/run_bench.py on an H200.

Bytes = base + per_pixel x width x height, per phase, for Z-Image at bf16 with one image per call;
each base is shifted up so every measured point is covered (see bench/results/h200.json,
meta.calibration_points). Recorded job stats refine these at run time (`calibrated_scale`, fed by
jobs/peak_history.py), so a new card or driver corrects the estimate after a few jobs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from worker.engine.costs import ActivationModel, SpeedModel

DEFAULT_ACTIVATIONS = ActivationModel(
    encode_base=205_529_600,
    denoise_base=8_079_497,
    denoise_per_pixel=477.0,
    decode_base=1_518_199,
    decode_per_pixel=2433.0,
)

# 0.1435 s per denoising step at 1024x1024, a full decode in 0.099 s and a 512-pixel-tiled one in
# 0.187 s, pinned host-to-device copies at 51.6 GB/s (pageable: about 8 GB/s, DESIGN.md).
DEFAULT_SPEED = SpeedModel(
    step_seconds_per_pixel=1.368e-7,
    step_seconds_base=0.0,
    pinned_bytes_per_s=51.6e9,
    pageable_bytes_per_s=8.0e9,
    decode_seconds_per_pixel=9.4e-8,
    tiled_decode_factor=1.9,
)

# With the transformer's blocks compiled, fused kernels keep fewer intermediates alive while
# denoising: about 307 bytes per pixel instead of 477. Measured on an H100 (synthetic:full, 4 and 6 GB
# plans with a tiled decode, where denoising is the peak phase): the eager slope over-predicted those
# peaks by up to 10.5%, this one is within 2%. Phases where the decode is the peak are unchanged.
COMPILED_DENOISE_FACTOR = 307.0 / 477.0


def compiled_activations(activations: ActivationModel) -> ActivationModel:
    """The activation estimates for compiled transformer blocks."""
    return replace(activations, denoise_per_pixel=activations.denoise_per_pixel * COMPILED_DENOISE_FACTOR)


def with_scale(acts: ActivationModel, scale: float) -> ActivationModel:
    """The same model with activations scaled (calibration from measured peaks)."""
    return replace(acts, scale=scale)


def calibrated_scale(records: Iterable[tuple[int, int, int]]) -> float:
    """How far measured transients ran over predicted ones: max ratio over past jobs, kept in [0.8, 2].

    Each record is a past job's (resident weight bytes, predicted peak bytes, measured peak allocated bytes).
    """
    ratios = []
    for weights, predicted, measured in records:
        if predicted > weights and measured > weights:
            ratios.append((measured - weights) / (predicted - weights))
    return min(2.0, max(0.8, max(ratios))) if ratios else 1.0
