"""Rendering one image and measuring it, phase by phase."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from PIL import Image

from worker.engine.loading import LoadedPipeline
from worker.engine.memory import (
    device_memory,
    device_name,
    device_uuid,
    host_rss_bytes,
    peak_bytes,
    reset_for_job,
)
from worker.engine.records import RenderRecord

# Called after each denoising step with (steps done, total); returning False stops the render.
StepCallback = Callable[[int, int], bool]


class RenderCancelled(Exception):
    """The step callback asked to stop (cancel requested, or the job's lease was lost)."""


@dataclass(frozen=True)
class RenderRequest:
    """One image's parameters, as the engine sees them (no queue or database types)."""

    prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    negative_prompt: str | None = None


@dataclass
class RenderResult:
    """The image and the record of its render (what it cost)."""

    image: Image.Image
    stats: RenderRecord
    # NaN latents or an all-black image: what fp16 overflow produces.
    output_bad: bool = False


@contextmanager
def timed(stats: RenderRecord, phase: str, device: torch.device) -> Iterator[None]:
    """Time a phase into `stats.<phase>_s`, synchronising so queued GPU work is counted."""
    started = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    setattr(stats, f"{phase}_s", time.perf_counter() - started)


Embeds = tuple[list[torch.Tensor], list[torch.Tensor]]


def render(
    loaded: LoadedPipeline,
    request: RenderRequest,
    on_step: StepCallback | None = None,
    *,
    embeds: Embeds | None = None,
    after_denoise: Callable[[], None] | None = None,
) -> RenderResult:
    """Render one image with a seeded CPU generator, so the same request gives the same image.

    `embeds` are prompt embeddings computed earlier for a group of jobs; without them this encodes.
    The allocator's cache is kept: freeing blocks the next job needs again costs time and frees
    nothing that stays free (the engine releases memory only after an out-of-memory error).
    """
    device = loaded.device
    reset_for_job(device)
    stats = RenderRecord(rung="none", device_name=device_name(device), device_uuid=device_uuid(device))
    _record_start(stats, device)
    with torch.inference_mode():
        with timed(stats, "encode", device):
            positive, negative = embeds if embeds is not None else _encode(loaded, request)
        with timed(stats, "denoise", device):
            latents = _denoise(loaded, request, positive, negative, on_step)
        if after_denoise is not None:
            after_denoise()
        bad = not bool(torch.isfinite(latents).all())
        with timed(stats, "decode", device):
            image = decode_latents(loaded, latents)
    _record_end(stats, device)
    return RenderResult(image=image, stats=stats, output_bad=bad or is_black(image))


def is_black(image: Image.Image) -> bool:
    """Whether every pixel is (near) black, the other face of an fp16 overflow."""
    _low, high = image.convert("L").getextrema()
    return bool(high <= 2)  # type: ignore[operator]


def _record_start(stats: RenderRecord, device: torch.device) -> None:
    memory = device_memory(device)
    if memory is not None:
        stats.device_total_bytes = memory.total
        stats.device_used_start_bytes = memory.used
        stats.device_free_start_bytes = memory.free


def _record_end(stats: RenderRecord, device: torch.device) -> None:
    stats.peak_allocated_bytes, stats.peak_reserved_bytes = peak_bytes(device)
    memory = device_memory(device)
    if memory is not None:
        stats.device_used_end_bytes = memory.used
        stats.device_free_end_bytes = memory.free
    stats.host_rss_bytes = host_rss_bytes()


def _encode(loaded: LoadedPipeline, request: RenderRequest) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return loaded.pipeline.encode_prompt(
        prompt=request.prompt,
        device=loaded.device,
        do_classifier_free_guidance=request.guidance_scale > 0,
        negative_prompt=request.negative_prompt,
    )


def _denoise(
    loaded: LoadedPipeline,
    request: RenderRequest,
    embeds: list[torch.Tensor],
    negative: list[torch.Tensor],
    on_step: StepCallback | None,
) -> torch.Tensor:
    def after_step(_pipe: object, index: int, _timestep: object, _tensors: dict) -> dict:
        if on_step is not None and not on_step(index + 1, request.steps):
            raise RenderCancelled(f"stopped after step {index + 1} of {request.steps}")
        return {}

    output = loaded.pipeline(
        prompt_embeds=embeds,
        negative_prompt_embeds=negative if request.guidance_scale > 0 else None,
        width=request.width,
        height=request.height,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(request.seed),
        output_type="latent",
        callback_on_step_end=after_step,
    )
    return output.images


def decode_latents(loaded: LoadedPipeline, latents: torch.Tensor) -> Image.Image:
    """Undo the VAE's scaling and shift, decode, and post-process into a PIL image."""
    pipeline = loaded.pipeline
    vae = pipeline.vae
    latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    decoded = vae.decode(latents, return_dict=False)[0]
    return pipeline.image_processor.postprocess(decoded, output_type="pil")[0]
