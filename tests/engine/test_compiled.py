"""Compiled transformer blocks with block streaming, on the CPU with the tiny model.

The compiler backend here is `aot_eager` (dynamo's graph capture and AOT autograd without code
generation), so the test checks what matters for correctness on any device: the streaming hooks stay
outside the compiled region (fullgraph would raise on a graph break), streamed blocks whose weights
change storage between calls reuse the same graphs, and the pixels match eager rendering.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from worker.engine import RenderRequest, load_pipeline, render
from worker.engine.compiled import compile_blocks, graphs_compiled, is_compiled
from worker.engine.placement import PlannedPlacement, transformer_blocks
from worker.engine.plan import Plan
from worker.engine.spread import spread_resident

TINY = "synthetic:tiny"
CPU = torch.device("cpu")


def request(width: int, height: int, prompt: str = "a cat on a red sofa") -> RenderRequest:
    """A two-step job."""
    return RenderRequest(prompt=prompt, width=width, height=height, steps=2, guidance_scale=0.0, seed=3)


def streaming_plan(total: int, resident: int) -> Plan:
    """A plan that keeps `resident` transformer blocks and streams the rest and the text encoder."""
    return Plan(
        rung="stream",
        transformer_resident=spread_resident(total, resident),
        text_encoder_streamed=True,
        vae_tiled=False,
        predicted_peak_bytes=0,
        pinned_host_bytes=0,
        transformer_blocks_total=total,
    )


@pytest.fixture(autouse=True)
def fresh_dynamo() -> None:
    """Each test counts its own compiled graphs."""
    torch._dynamo.reset()


def test_compiled_streaming_matches_eager_and_does_not_recompile_per_block(model_cache: Path) -> None:
    """Streamed + compiled pixels equal eager pixels; more jobs at a known shape compile nothing new."""
    eager = load_pipeline(TINY, dtype="fp32", cache_dir=model_cache, device=CPU)
    expected = [
        np.asarray(render(eager, request(64, 64)).image),
        np.asarray(render(eager, request(64, 96)).image),
    ]

    loaded = load_pipeline(TINY, dtype="fp32", cache_dir=model_cache, device=CPU)
    placement = PlannedPlacement(loaded.pipeline, CPU)
    blocks = transformer_blocks(loaded.pipeline.transformer)
    placement.apply(streaming_plan(len(blocks), resident=len(blocks) // 2))
    assert compile_blocks(blocks, backend="aot_eager") == len(blocks)
    assert all(is_compiled(block) for block in blocks)
    assert compile_blocks(blocks, backend="aot_eager") == 0  # idempotent

    first = np.asarray(render(loaded, request(64, 64)).image)
    second = np.asarray(render(loaded, request(64, 96)).image)
    assert np.array_equal(first, expected[0]) and np.array_equal(second, expected[1])
    warm = graphs_compiled()
    assert warm > 0  # the blocks really ran compiled
    # Streamed blocks swapped their weights many times above; the same shapes again compile nothing.
    again = np.asarray(render(loaded, request(64, 64)).image)
    assert np.array_equal(again, expected[0])
    assert graphs_compiled() == warm
    # A new size and a longer prompt: shapes are dynamic after the first two, so at most a few graphs.
    render(loaded, request(96, 96, prompt_long()))
    assert graphs_compiled() - warm <= 2
    placement.remove()


def prompt_long() -> str:
    """A longer prompt: the text length is a shape too."""
    return "a detailed painting of a cat on a red sofa by a window, soft light, " * 3
