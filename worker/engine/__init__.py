"""The render engine: plain torch and diffusers. It imports no queue or database code."""

from worker.engine.loading import EngineError, LoadedPipeline, load_pipeline
from worker.engine.render import RenderCancelled, RenderRequest, RenderResult, RenderStats, render

__all__ = [
    "EngineError",
    "LoadedPipeline",
    "RenderCancelled",
    "RenderRequest",
    "RenderResult",
    "RenderStats",
    "load_pipeline",
    "render",
]
