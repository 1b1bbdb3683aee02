"""Loading a pipeline once: a hub id, a local folder, or a synthetic model saved and loaded back."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import ZImagePipeline

from worker.engine.synthetic import ensure_saved, is_synthetic

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CPU_MODELS = frozenset({"synthetic:tiny"})


class EngineError(RuntimeError):
    """A problem the user must fix (wrong device, unknown model); retrying will not help."""


@dataclass
class LoadedPipeline:
    """A pipeline ready to render, with what it was loaded as."""

    pipeline: ZImagePipeline
    model: str
    dtype: str
    device: torch.device
    load_seconds: float


def pick_device() -> torch.device:
    """The first CUDA device if there is one, else the CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def check_device_for(model: str, device: torch.device) -> None:
    """Refuse, with a reason, a model that would crawl for hours on the CPU."""
    if device.type == "cpu" and model not in CPU_MODELS:
        raise EngineError(
            f"no CUDA device found, and {model!r} needs one (it would take hours per image on the CPU). "
            f"Install the CUDA build of torch on a machine with an NVIDIA GPU, or use one of "
            f"{sorted(CPU_MODELS)} to try nightrender on the CPU."
        )


def model_source(model: str, cache_dir: Path, device: torch.device) -> str:
    """What to hand `from_pretrained`: a hub id, a local folder, or a synthetic model's saved folder."""
    if is_synthetic(model):
        # Initialising 10B random weights is minutes on a CPU and seconds on a GPU.
        return str(ensure_saved(model, cache_dir, build_device=device.type))
    return model


def load_pipeline(
    model: str, *, dtype: str, cache_dir: Path, device: torch.device | None = None
) -> LoadedPipeline:
    """Load `model` into host memory through `ZImagePipeline.from_pretrained`; the Engine places it."""
    device = device or pick_device()
    check_device_for(model, device)
    if dtype not in DTYPES:
        raise EngineError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    started = time.perf_counter()
    source = model_source(model, cache_dir, device)
    pipeline = ZImagePipeline.from_pretrained(source, torch_dtype=DTYPES[dtype], cache_dir=cache_dir / "hub")
    pipeline.set_progress_bar_config(disable=True)
    return LoadedPipeline(
        pipeline=pipeline, model=model, dtype=dtype, device=device, load_seconds=time.perf_counter() - started
    )


def set_attention_backend(loaded: LoadedPipeline, backend: str) -> None:
    """Run the transformer's attention on diffusers' `backend` kernel; "native" keeps PyTorch's SDPA."""
    if backend == "native":
        return
    try:
        loaded.pipeline.transformer.set_attention_backend(backend)
    except Exception as error:  # e.g. xformers not installed: say so, not crash mid-batch
        raise EngineError(f"attention backend {backend!r} is not available: {error}") from None


def set_vae_slicing(loaded: LoadedPipeline, enabled: bool) -> None:
    """Decode a batch one image at a time when enabled (the VRAM guide's other knob besides placement)."""
    if enabled:
        loaded.pipeline.vae.enable_slicing()
