"""Activation estimates, fitted to peaks measured on the GPU (bench/calibrate in bench/run_bench.py).

Bytes = base + per_pixel x width x height, per phase, for Z-Image at bf16 with one image per call.
Recorded job stats refine these at run time (plan.calibrated_scale), so a new card or driver corrects
the estimate after a few jobs.
"""

from __future__ import annotations

from worker.engine.plan import GB, ActivationModel

# Z-Image-Turbo's layout: 30 main blocks, 2 noise refiners and 2 context refiners, all 3840 wide.
DEFAULT_ACTIVATIONS = ActivationModel(
    encode_base=int(0.35 * GB),
    denoise_base=int(0.25 * GB),
    denoise_per_pixel=200.0,
    decode_base=int(0.15 * GB),
    decode_per_pixel=1800.0,
)
