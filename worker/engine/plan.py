"""The planner: for one job, the fastest placement of the pipeline that fits the VRAM budget.

It works from component sizes (bytes actually loaded), activation estimates per resolution (calibrated
from recorded peaks) and the budget. It returns a ladder: the plan to try first, then the fallbacks the
OOM ladder walks down. Pure arithmetic: no torch, so it is tested exhaustively on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal

from worker.engine.costs import ActivationModel, Budget, ModelSizes, SpeedModel
from worker.engine.modes import DIFFUSERS_MODES, DiffusersMode
from worker.engine.spread import spread_resident

# The planner's own placements, then diffusers' whole-pipeline modes (which end every ladder).
Rung = Literal["resident", "te_streamed", "stream", "stream_tiled", DiffusersMode]
PLANNED_RUNGS: tuple[Rung, ...] = ("resident", "te_streamed", "stream", "stream_tiled")
DIFFUSERS_RUNGS: tuple[Rung, ...] = DIFFUSERS_MODES
# The caching allocator fragments; keep this share of the cap free so a plan that "fits" really does.
FRAGMENTATION_HEADROOM = 0.06
# Blocks prefetched ahead of the one computing (BlockStreamer.lookahead); encoding is copy-bound, so
# the text encoder keeps more copies in flight than the compute-bound transformer needs.
TRANSFORMER_LOOKAHEAD = 2
TEXT_ENCODER_LOOKAHEAD = 3


@dataclass(frozen=True)
class Plan:
    """Where every part of the pipeline lives for one job, and what that is predicted to cost."""

    rung: Rung
    transformer_resident: frozenset[int]
    text_encoder_streamed: bool
    vae_tiled: bool
    predicted_peak_bytes: int
    pinned_host_bytes: int
    pin_host: bool = True
    resident_weight_bytes: int = 0
    # Transformer weight bytes copied in per denoising step (what the bandwidth bound is made of).
    streamed_bytes_per_step: int = 0

    def describe(self) -> str:
        """One line for logs, stats and the profile table."""
        total = self.transformer_blocks_total
        resident = len(self.transformer_resident)
        parts = [self.rung, f"transformer {resident}/{total} resident"]
        parts.append("text encoder streamed" if self.text_encoder_streamed else "text encoder resident")
        parts.append("vae tiled" if self.vae_tiled else "vae full")
        if not self.pin_host and self.rung in PLANNED_RUNGS:
            parts.append("pageable host memory")
        return ", ".join(parts)

    def short(self) -> str:
        """A few characters for tables: rung, resident blocks, tiled decode."""
        tiled = " tiled" if self.vae_tiled and self.rung in PLANNED_RUNGS else ""
        return f"{self.rung} {len(self.transformer_resident)}/{self.transformer_blocks_total}{tiled}"

    transformer_blocks_total: int = 0

    def record(self) -> dict[str, object]:
        """The plan's fields in the job's stored record (jobs/peak_history.py reads the byte counts back)."""
        return {
            "rung": self.rung,
            "description": self.describe(),
            "transformer_resident": len(self.transformer_resident),
            "transformer_blocks": self.transformer_blocks_total,
            "text_encoder_streamed": self.text_encoder_streamed,
            "vae_tiled": self.vae_tiled,
            "predicted_peak_bytes": self.predicted_peak_bytes,
            "resident_weight_bytes": self.resident_weight_bytes,
            "pinned_host_bytes": self.pinned_host_bytes,
            "streamed_bytes_per_step": self.streamed_bytes_per_step,
        }


def usable(budget: Budget) -> int:
    """The part of the cap a plan may fill."""
    return int(budget.device_bytes * (1 - FRAGMENTATION_HEADROOM))


def _peak(sizes: ModelSizes, acts: ActivationModel, width: int, height: int, **placement: Any) -> int:
    """Predicted allocated peak: resident weights plus the largest phase's transient needs."""
    weights, transient = _peak_parts(sizes, acts, width, height, **placement)
    return weights + transient


def _peak_parts(
    sizes: ModelSizes,
    acts: ActivationModel,
    width: int,
    height: int,
    *,
    resident_blocks: int,
    te_streamed: bool,
    vae_tiled: bool,
) -> tuple[int, int]:
    """(resident weight bytes, transient bytes of the largest phase)."""
    blocks = sizes.transformer_blocks
    streamed_blocks = len(blocks) - resident_blocks
    resident_weights = (
        sizes.transformer_rest + sum(sorted(blocks, reverse=True)[:resident_blocks]) + sizes.vae
    )
    if te_streamed:
        resident_weights += sizes.text_encoder_rest
        encode = acts.encode() + stream_buffers(sizes.text_encoder_blocks, TEXT_ENCODER_LOOKAHEAD)
    else:
        resident_weights += sizes.text_encoder
        encode = acts.encode()
    buffers = stream_buffers(blocks, TRANSFORMER_LOOKAHEAD) if streamed_blocks else 0
    denoise = acts.denoise(width, height) + buffers
    decode = acts.decode(width, height, tiled=vae_tiled)
    return resident_weights, max(encode, denoise, decode)


def stream_buffers(blocks: tuple[int, ...], lookahead: int) -> int:
    """Device bytes a streamer holds at once: the computing block plus `lookahead` copies in flight."""
    return sum(sorted(blocks, reverse=True)[: lookahead + 1])


def _pinned_bytes(sizes: ModelSizes, resident: frozenset[int], te_streamed: bool) -> int:
    streamed = sum(b for i, b in enumerate(sizes.transformer_blocks) if i not in resident)
    return streamed + (sum(sizes.text_encoder_blocks) if te_streamed else 0)


def _stream_plan(
    sizes: ModelSizes, acts: ActivationModel, budget: Budget, width: int, height: int, *, tiled: bool
) -> Plan | None:
    """The most resident transformer blocks that fit, with the text encoder streamed."""
    total = len(sizes.transformer_blocks)
    for resident in range(total, -1, -1):
        peak = _peak(sizes, acts, width, height, resident_blocks=resident, te_streamed=True, vae_tiled=tiled)
        if peak <= usable(budget):
            chosen = spread_resident(total, resident)
            rung: Rung = "stream_tiled" if tiled else "stream"
            return _plan(rung, chosen, sizes, budget, peak, te_streamed=True, tiled=tiled)
    return None


def _plan(
    rung: Rung,
    resident: frozenset[int],
    sizes: ModelSizes,
    budget: Budget,
    peak: int,
    *,
    te_streamed: bool,
    tiled: bool,
) -> Plan:
    pinned = _pinned_bytes(sizes, resident, te_streamed)
    weights, _ = _peak_parts(
        sizes,
        ActivationModel(0, 0, 0, 0, 0),
        16,
        16,
        resident_blocks=len(resident),
        te_streamed=te_streamed,
        vae_tiled=tiled,
    )
    return Plan(
        rung=rung,
        resident_weight_bytes=weights,
        streamed_bytes_per_step=sum(b for i, b in enumerate(sizes.transformer_blocks) if i not in resident),
        transformer_resident=resident,
        text_encoder_streamed=te_streamed,
        vae_tiled=tiled,
        predicted_peak_bytes=peak,
        pinned_host_bytes=pinned,
        pin_host=pinned <= budget.host_pinned_bytes,
        transformer_blocks_total=len(sizes.transformer_blocks),
    )


def same_placement(a: Plan, b: Plan) -> bool:
    """Whether two plans put every weight in the same place."""
    return (a.transformer_resident, a.text_encoder_streamed, a.vae_tiled) == (
        b.transformer_resident,
        b.text_encoder_streamed,
        b.vae_tiled,
    )


def placement_key(plan: Plan) -> tuple[Rung, frozenset[int], bool]:
    """What moves weights: the rung family, the resident blocks and where the text encoder lives."""
    family: Rung = "stream" if plan.rung == "stream_tiled" else plan.rung
    return family, plan.transformer_resident, plan.text_encoder_streamed


def fit_to_size(
    plan: Plan,
    sizes: ModelSizes,
    acts: ActivationModel,
    budget: Budget,
    size: tuple[int, int],
    *,
    tiling: tuple[bool, ...] = (False, True),
) -> Plan | None:
    """The same placement for a job of another size: the VAE tiles only when a full decode won't fit.

    None means the placement does not fit this size at all (a bigger size: plan again).
    """
    if plan.rung not in PLANNED_RUNGS:
        return plan
    for tiled in tiling:
        peak = _peak(
            sizes,
            acts,
            *size,
            resident_blocks=len(plan.transformer_resident),
            te_streamed=plan.text_encoder_streamed,
            vae_tiled=tiled,
        )
        if peak <= usable(budget):
            rung = plan.rung
            if rung in ("stream", "stream_tiled"):
                rung = "stream_tiled" if tiled else "stream"
            return replace(plan, rung=rung, vae_tiled=tiled, predicted_peak_bytes=peak)
    return None


def predicted_seconds(
    plan: Plan, speed: SpeedModel, sizes: ModelSizes, width: int, height: int, steps: int
) -> float:
    """Predicted seconds for one image under `plan`: each step is as slow as its compute or its copies."""
    pixels = width * height
    bandwidth = speed.pinned_bytes_per_s if plan.pin_host else speed.pageable_bytes_per_s
    streamed = sum(b for i, b in enumerate(sizes.transformer_blocks) if i not in plan.transformer_resident)
    step = max(speed.step_seconds_base + speed.step_seconds_per_pixel * pixels, streamed / bandwidth)
    encode = sum(sizes.text_encoder_blocks) / bandwidth if plan.text_encoder_streamed else 0.0
    decode = speed.decode_seconds_per_pixel * pixels * (speed.tiled_decode_factor if plan.vae_tiled else 1)
    return steps * step + encode + decode


def plan_ladder(
    sizes: ModelSizes,
    acts: ActivationModel,
    budget: Budget,
    width: int,
    height: int,
    *,
    speed: SpeedModel | None = None,
    steps: int = 9,
) -> list[Plan]:
    """Every rung that is predicted to fit, fastest first; sequential offload always ends the ladder.

    Streaming with a full decode and streaming with a tiled decode are ranked by predicted seconds:
    tiling is slower per decode but can keep enough blocks resident to save more in copies.
    """
    total = len(sizes.transformer_blocks)
    everything = frozenset(range(total))
    ladder: list[Plan] = []
    for te_streamed in (False, True):
        peak = _peak(
            sizes, acts, width, height, resident_blocks=total, te_streamed=te_streamed, vae_tiled=False
        )
        if peak <= usable(budget):
            rung: Rung = "te_streamed" if te_streamed else "resident"
            ladder.append(_plan(rung, everything, sizes, budget, peak, te_streamed=te_streamed, tiled=False))
    stream = _stream_plan(sizes, acts, budget, width, height, tiled=False)
    tiled = _stream_plan(sizes, acts, budget, width, height, tiled=True)
    candidates = [
        p for p in (stream, tiled) if p is not None and not any(same_placement(p, q) for q in ladder)
    ]
    if speed is not None:
        candidates.sort(key=lambda p: predicted_seconds(p, speed, sizes, width, height, steps))
    ladder += candidates
    if tiled is not None and tiled.transformer_resident:
        # One rung with every block streamed: what to fall back on when activations were underestimated.
        floor_peak = _peak(sizes, acts, width, height, resident_blocks=0, te_streamed=True, vae_tiled=True)
        ladder.append(
            _plan("stream_tiled", frozenset(), sizes, budget, floor_peak, te_streamed=True, tiled=True)
        )
    ladder.append(_sequential_plan(sizes, acts, width, height, total))
    return ladder


def _sequential_plan(sizes: ModelSizes, acts: ActivationModel, width: int, height: int, total: int) -> Plan:
    # diffusers' sequential offload keeps one leaf module at a time on the device.
    biggest = max([*sizes.transformer_blocks, *sizes.text_encoder_blocks, sizes.vae], default=0)
    peak = biggest + acts.decode(width, height, tiled=True) + acts.denoise(width, height)
    return Plan(
        rung="sequential",
        transformer_resident=frozenset(),
        text_encoder_streamed=True,
        vae_tiled=True,
        predicted_peak_bytes=peak,
        pinned_host_bytes=0,
        pin_host=False,
        transformer_blocks_total=total,
    )


def diffusers_plan(mode: Rung, sizes: ModelSizes, acts: ActivationModel, width: int, height: int) -> Plan:
    """A plan for one of diffusers' own offload modes, as the worker's OFFLOAD_MODE asks."""
    total = len(sizes.transformer_blocks)
    if mode == "sequential":
        return _sequential_plan(sizes, acts, width, height, total)
    transient = max(acts.encode(), acts.denoise(width, height), acts.decode(width, height))
    weights = {
        "none": sizes.transformer + sizes.text_encoder + sizes.vae,
        "model": max(sizes.transformer, sizes.text_encoder),
        "group": sizes.transformer_rest
        + sizes.text_encoder_rest
        + sizes.vae
        + stream_buffers(sizes.transformer_blocks, 1),
    }[mode]
    return Plan(
        rung=mode,
        transformer_resident=frozenset(range(total)) if mode == "none" else frozenset(),
        text_encoder_streamed=mode != "none",
        vae_tiled=False,
        predicted_peak_bytes=weights + transient,
        pinned_host_bytes=0,
        pin_host=False,
        resident_weight_bytes=weights,
        transformer_blocks_total=total,
    )
