"""Activation estimates, fitted to peaks measured on the GPU (bench/calibrate in bench/run_bench.py).

Bytes = base + per_pixel x width x height, per phase, for Z-Image at bf16 with one image per call.
Recorded job stats refine these at run time (plan.calibrated_scale), so a new card or driver corrects
the estimate after a few jobs.
"""

from __future__ import annotations

from worker.engine.plan import GB, ActivationModel, SpeedModel

# Z-Image-Turbo's layout: 30 main blocks, 2 noise refiners and 2 context refiners, all 3840 wide.
DEFAULT_ACTIVATIONS = ActivationModel(
    encode_base=int(0.35 * GB),
    denoise_base=int(0.25 * GB),
    denoise_per_pixel=200.0,
    decode_base=int(0.15 * GB),
    decode_per_pixel=1800.0,
)

# Measured on an NVIDIA H200 (bench/results): 0.142 s per denoising step at 1024x1024, the streamed
# text encoder's 7.3 GB in 0.156 s, a full decode in 0.159 s at 1024x1024.
DEFAULT_SPEED = SpeedModel(
    step_seconds_per_pixel=1.35e-7,
    step_seconds_base=0.0,
    pinned_bytes_per_s=45e9,
    pageable_bytes_per_s=8e9,
    decode_seconds_per_pixel=1.5e-7,
    tiled_decode_factor=1.6,
)
