"""What the planner reasons with: component sizes, activation and speed estimates, and the budget.

Pure data and arithmetic, no torch: the planner (plan.py) and its tests use these on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1024**3


@dataclass(frozen=True)
class ModelSizes:
    """Weight bytes of each streamable unit, in execution order, plus what always stays resident."""

    transformer_blocks: tuple[int, ...]
    transformer_rest: int
    text_encoder_blocks: tuple[int, ...]
    text_encoder_rest: int
    vae: int
    # The token-embedding table: on the device with a resident encoder, else looked up on the host.
    text_encoder_embedding: int = 0

    @property
    def transformer(self) -> int:
        """All transformer weights."""
        return sum(self.transformer_blocks) + self.transformer_rest

    @property
    def text_encoder(self) -> int:
        """All text-encoder weights."""
        return sum(self.text_encoder_blocks) + self.text_encoder_rest + self.text_encoder_embedding


@dataclass(frozen=True)
class ActivationModel:
    """Bytes of activations per phase: base + per-pixel, fitted to measured peaks (see fitted_costs.py)."""

    encode_base: int
    denoise_base: int
    denoise_per_pixel: float
    decode_base: int
    decode_per_pixel: float
    tile_pixels: int = 512 * 512
    scale: float = 1.0

    def encode(self) -> int:
        """Text encoding at the pipeline's fixed 512-token length."""
        return int(self.encode_base * self.scale)

    def denoise(self, width: int, height: int) -> int:
        """One transformer forward at this size."""
        return int((self.denoise_base + self.denoise_per_pixel * width * height) * self.scale)

    def decode(self, width: int, height: int, *, tiled: bool = False) -> int:
        """One VAE decode at this size, or of one tile when tiled."""
        pixels = min(width * height, self.tile_pixels) if tiled else width * height
        return int((self.decode_base + self.decode_per_pixel * pixels) * self.scale)


@dataclass(frozen=True)
class SpeedModel:
    """What a plan's seconds are made of: compute per step, copies that compute cannot hide, encode and
    decode (`plan.predicted_seconds` adds them up for one plan).

    Constants come from calibration on a real card (fitted_costs.py); they only rank plans, so a
    card twice as fast ranks them the same way.
    """

    step_seconds_per_pixel: float
    step_seconds_base: float
    pinned_bytes_per_s: float
    pageable_bytes_per_s: float
    decode_seconds_per_pixel: float
    tiled_decode_factor: float


@dataclass(frozen=True)
class Budget:
    """What a job may use: the allocator cap on the device and the pinned host memory."""

    device_bytes: int
    host_pinned_bytes: int
