"""The render engine: plain torch and diffusers. It imports no queue or database code."""

import os

# Changing shapes (mixed resolutions) fragment the caching allocator; expandable segments keep the
# reserved memory close to the allocated memory. It must be set before CUDA initialises.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

from worker.engine.engine import Engine
from worker.engine.loading import EngineError, LoadedPipeline, load_pipeline
from worker.engine.records import LadderExhausted, RenderRecord
from worker.engine.render import (
    RenderCancelled,
    RenderRequest,
    RenderResult,
    render,
)

__all__ = [
    "Engine",
    "EngineError",
    "LadderExhausted",
    "LoadedPipeline",
    "RenderCancelled",
    "RenderRecord",
    "RenderRequest",
    "RenderResult",
    "load_pipeline",
    "render",
]
