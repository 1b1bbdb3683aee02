"""The Engine on the CPU with the tiny synthetic model: the OOM ladder, block streaming and the holder.

Out-of-memory errors are injected through a real forward pre-hook on the transformer, raised while the
engine's current plan is on a chosen rung; everything else is the real pipeline.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from jobs.settings import Settings
from worker.engine import Engine, EngineError, LadderExhausted, RenderCancelled, RenderRequest, render
from worker.engine.costs import ActivationModel, Budget
from worker.engine.fitted_costs import DEFAULT_ACTIVATIONS
from worker.engine.loading import load_pipeline
from worker.engine.placement import PlannedPlacement, module_bytes
from worker.engine.plan import (
    FRAGMENTATION_HEADROOM,
    TRANSFORMER_LOOKAHEAD,
    Plan,
    plan_ladder,
    stream_buffers,
)
from worker.engine.render import RenderResult, is_black
from worker.engine.streaming import BlockStreamer
from worker.runner import EngineHolder

TINY = "synthetic:tiny"
CPU = torch.device("cpu")
HUGE = Budget(device_bytes=1 << 62, host_pinned_bytes=1 << 62)
REQUEST = RenderRequest(
    prompt="a cat on a red sofa", width=64, height=64, steps=2, guidance_scale=0.0, seed=7
)
CPU_LADDER = ["resident", "te_streamed", "stream_tiled", "stream_tiled", "sequential"]
NO_ACTIVATIONS = ActivationModel(0, 0, 0, 0, 0)


@pytest.fixture(scope="module")
def engine(model_cache: Path) -> Engine:
    """An auto-mode engine over the tiny pipeline with a budget nothing can exceed."""
    loaded = load_pipeline(TINY, dtype="fp32", cache_dir=model_cache, device=CPU)
    return Engine(loaded, mode="auto", budget=HUGE, activations=DEFAULT_ACTIVATIONS)


@pytest.fixture(scope="module")
def reference(model_cache: Path) -> np.ndarray:
    """REQUEST rendered by the single-attempt primitive on a separately loaded, never placed pipeline."""
    plain = load_pipeline(TINY, dtype="fp32", cache_dir=model_cache, device=CPU)
    return np.array(render(plain, REQUEST).image)


@pytest.fixture
def fail_on(engine: Engine) -> Iterator[set[str]]:
    """Rungs on which the transformer's forward raises an out-of-memory error (add to the set)."""
    failing: set[str] = set()

    def out_of_memory(_module: nn.Module, _args: Any) -> None:
        if engine.plan is not None and engine.plan.rung in failing:
            raise torch.cuda.OutOfMemoryError(f"injected on {engine.plan.rung}")

    handle = engine.loaded.pipeline.transformer.register_forward_pre_hook(out_of_memory)
    yield failing
    handle.remove()


def attempts(result: RenderResult) -> list[dict[str, Any]]:
    """The attempts as the job's stored record lists them."""
    return list(result.stats.stored_plan()["attempts"])


def streaming_plan(engine: Engine) -> Plan:
    """A planner-made 'stream' plan that keeps one transformer block resident and streams the rest."""
    sizes = engine.sizes
    floor = sizes.transformer_rest + sizes.vae + sizes.text_encoder_rest
    floor += stream_buffers(sizes.transformer_blocks, TRANSFORMER_LOOKAHEAD)
    one_block = floor + max(sizes.transformer_blocks)
    budget = Budget(device_bytes=int(one_block / (1 - FRAGMENTATION_HEADROOM)) + 1, host_pinned_bytes=1 << 40)
    plan = plan_ladder(sizes, NO_ACTIVATIONS, budget, 64, 64)[0]
    assert plan.rung == "stream" and plan.text_encoder_streamed
    assert len(plan.transformer_resident) == 1
    return plan


def placement(engine: Engine) -> PlannedPlacement:
    """The engine's planned placement (present once a planned rung was placed)."""
    assert engine._planned is not None
    return engine._planned


# the ladder the engine walks


def test_cpu_ladder_with_a_huge_budget(engine: Engine) -> None:
    """On the CPU everything fits: resident first, then the fallbacks, then sequential."""
    plans = engine.ladder(64, 64)
    assert [p.rung for p in plans] == CPU_LADDER
    assert plans[0].transformer_resident == frozenset(range(len(engine.sizes.transformer_blocks)))
    assert plans[2].transformer_resident == plans[0].transformer_resident and plans[2].vae_tiled
    assert plans[3].transformer_resident == frozenset() and plans[3].vae_tiled


def test_stream_mode_never_tries_the_resident_rung(engine: Engine) -> None:
    """mode='stream' drops the all-resident rung and keeps the rest of the ladder."""
    stream = Engine(engine.loaded, mode="stream", budget=HUGE, activations=DEFAULT_ACTIVATIONS)
    assert [p.rung for p in stream.ladder(64, 64)] == CPU_LADDER[1:]


@pytest.mark.parametrize(
    ("mode", "rungs"),
    [("none", ["none", "sequential"]), ("model", ["model", "sequential"]), ("sequential", ["sequential"])],
)
def test_diffusers_modes_fall_back_to_sequential(engine: Engine, mode: str, rungs: list[str]) -> None:
    """A fixed diffusers mode is tried first and falls back to sequential offload."""
    fixed = Engine(engine.loaded, mode=mode, budget=HUGE, activations=DEFAULT_ACTIVATIONS)
    assert [p.rung for p in fixed.ladder(64, 64)] == rungs


def test_engine_render_matches_the_primitive(engine: Engine, reference: np.ndarray) -> None:
    """The engine's first rung renders the primitive's pixels and annotates the stats with its plan."""
    result = engine.render(REQUEST)
    assert np.array_equal(np.array(result.image), reference)
    stats = result.stats
    assert stats.rung == "resident" and stats.plan == engine.plan
    assert stats.vram_budget_bytes is None  # no allocator cap on the CPU
    assert (stats.planned_for, stats.compiled) == ((64, 64), False)
    stored = stats.stored_plan()
    assert stored["rung"] == "resident" and stored["planned_for"] == [64, 64]
    assert (
        stats.predicted_peak_bytes
        == stored["predicted_peak_bytes"]
        == engine.ladder(64, 64)[0].predicted_peak_bytes
    )
    assert [(a["rung"], a["outcome"]) for a in stored["attempts"]] == [("resident", "ok")]
    assert engine.plan is not None and engine.plan.rung == "resident"


def test_oom_on_the_first_rung_renders_on_the_next(
    engine: Engine, fail_on: set[str], reference: np.ndarray
) -> None:
    """An OOM on 'resident' is recorded and the same image comes from 'te_streamed'."""
    fail_on.add("resident")
    result = engine.render(REQUEST)
    tried = attempts(result)
    assert [a["rung"] for a in tried] == ["resident", "te_streamed"]
    assert tried[0]["outcome"] == "out of memory: injected on resident"
    assert tried[1]["outcome"] == "ok"
    assert result.stats.rung == "te_streamed"
    assert result.stats.oom_attempts == 1
    assert result.stats.stored_plan()["text_encoder_streamed"] is True
    assert np.array_equal(np.array(result.image), reference)


def test_oom_on_every_planned_rung_reaches_sequential(
    engine: Engine, fail_on: set[str], reference: np.ndarray
) -> None:
    """With every planned rung failing, diffusers' sequential offload renders the image."""
    fail_on.update({"resident", "te_streamed", "stream_tiled"})
    result = engine.render(REQUEST)
    tried = attempts(result)
    assert [a["rung"] for a in tried] == CPU_LADDER
    assert all(a["outcome"].startswith("out of memory") for a in tried[:-1])
    assert tried[-1]["outcome"] == "ok"
    assert result.stats.rung == "sequential"
    assert np.array_equal(np.array(result.image), reference)


def test_exhausted_ladder_lists_every_attempt_and_the_engine_survives(
    engine: Engine, fail_on: set[str], reference: np.ndarray
) -> None:
    """OOM on every rung raises LadderExhausted with all attempts; the next render succeeds."""
    fail_on.update(CPU_LADDER)
    with pytest.raises(LadderExhausted, match="resource_exhausted") as raised:
        engine.render(REQUEST)
    record = raised.value.record
    assert (record.rung, record.device_name, record.plan) == ("exhausted", "cpu", None)
    assert [a.plan.rung for a in record.attempts] == CPU_LADDER
    assert [a.outcome for a in record.attempts] == [
        f"out of memory: injected on {rung}" for rung in CPU_LADDER
    ]
    assert record.oom_attempts == len(CPU_LADDER)
    assert f"({len(CPU_LADDER)} attempts)" in str(raised.value)
    assert engine.plan is None
    fail_on.clear()
    result = engine.render(REQUEST)
    assert result.stats.rung == "resident"
    assert np.array_equal(np.array(result.image), reference)


def test_cancel_is_not_an_oom_and_is_not_retried(engine: Engine) -> None:
    """A callback that stops the render ends it on the first rung: no other rung is tried."""
    seen: list[tuple[int, int]] = []

    def stop(step: int, total: int) -> bool:
        seen.append((step, total))
        return False

    with pytest.raises(RenderCancelled, match="after step 1 of 2"):
        engine.render(REQUEST, on_step=stop)
    assert seen == [(1, 2)]
    assert engine.plan is not None and engine.plan.rung == "resident"


def test_engine_encode_feeds_render_embeds(engine: Engine, reference: np.ndarray) -> None:
    """Prompts encoded together by the engine render the same image as encoding per job."""
    positive, negative = engine.encode([REQUEST.prompt, "a lighthouse"], None, 0.0, 64, 64)
    assert len(positive) == 2 and negative == []
    result = engine.render(REQUEST, embeds=([positive[0]], []))
    assert np.array_equal(np.array(result.image), reference)
    other = engine.render(REQUEST, embeds=([positive[1]], []))
    assert not np.array_equal(np.array(other.image), reference)


# streaming on the CPU


def test_streamed_blocks_render_identical_pixels(engine: Engine, reference: np.ndarray) -> None:
    """Streaming all but one block (and the text encoder) changes no pixel, and each streamed
    block really runs on a swapped-in copy."""
    plan = streaming_plan(engine)
    engine.place(plan)
    streamer = placement(engine).transformer
    swapped: dict[int, bool] = {}

    def watch(block_index: int) -> Any:
        def hook(_module: nn.Module, _args: Any) -> None:
            swapped[block_index] = streamer.blocks[block_index].device_copy is not None

        return hook

    handles = [b.module.register_forward_pre_hook(watch(b.index)) for b in streamer.blocks]
    try:
        image = np.array(render(engine.loaded, REQUEST).image)
    finally:
        for handle in handles:
            handle.remove()
    assert np.array_equal(image, reference)
    streamed = set(range(len(streamer.blocks))) - plan.transformer_resident
    assert swapped == {i: i in streamed for i in range(len(streamer.blocks))}
    assert streamer.resident_indices() == set(plan.transformer_resident)
    assert placement(engine).text_encoder.resident_indices() == set()
    assert streamer.streamed_bytes_per_pass == sum(module_bytes(streamer.blocks[i].module) for i in streamed)


def test_no_streamed_block_holds_a_device_copy_after_a_render(engine: Engine) -> None:
    """Once a render is over, streamed blocks hold no device copies (transformer and text encoder)."""
    engine.place(streaming_plan(engine))
    planned = placement(engine)
    # As Engine._attempt does: the transformer's prefetch for a next step is dropped before the decode.
    render(engine.loaded, REQUEST, after_denoise=planned.drop_prefetched)
    held = [
        (name, b.index)
        for name, streamer in (("transformer", planned.transformer), ("text_encoder", planned.text_encoder))
        for b in streamer.blocks
        if not b.resident and b.device_copy is not None
    ]
    assert held == []


def test_replacing_moves_only_blocks_that_change(engine: Engine) -> None:
    """Going from the streaming plan back to all-resident re-places only the blocks that were streamed."""
    plan = streaming_plan(engine)
    engine.place(plan)
    streamer = placement(engine).transformer
    before = {b.index: (b.host, [t.data_ptr() for t in b.tensors()]) for b in streamer.blocks}
    engine.place(engine.ladder(64, 64)[0])
    assert streamer.resident_indices() == set(range(len(streamer.blocks)))
    for block in streamer.blocks:
        host, pointers = before[block.index]
        unchanged = block.index in plan.transformer_resident
        assert (block.host is host) == unchanged, block.index
        if unchanged:
            assert [t.data_ptr() for t in block.tensors()] == pointers
    assert streamer.streamed_bytes_per_pass == 0


def small_stack() -> nn.Sequential:
    """Six small seeded linear blocks."""
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(8, 8) for _ in range(6)])


def test_set_resident_moves_only_changed_blocks() -> None:
    """set_resident touches only the blocks whose placement changes; the rest keep their storage."""
    stack = small_stack()
    x = torch.randn(3, 8)
    expected = stack(x)
    streamer = BlockStreamer(list(stack), CPU, lookahead=2)
    streamer.set_resident({0, 1, 2, 3})
    before = {b.index: (b.host, [t.data_ptr() for t in b.tensors()]) for b in streamer.blocks}
    streamer.set_resident({2, 3, 4, 5})
    changed = {b.index for b in streamer.blocks if b.host is not before[b.index][0]}
    assert changed == {0, 1, 4, 5}
    for index in (2, 3):
        assert [t.data_ptr() for t in streamer.blocks[index].tensors()] == before[index][1]
    assert streamer.resident_indices() == {2, 3, 4, 5}
    assert not any(b.pinned for b in streamer.blocks)  # nothing is pinned without CUDA
    assert streamer.streamed_bytes_per_pass == sum(module_bytes(stack[i]) for i in (0, 1))
    assert torch.equal(stack(x), expected)


def test_streamer_prefetches_the_next_streamed_blocks() -> None:
    """When a streamed block runs, the next `lookahead` streamed blocks already have copies in flight."""
    stack = small_stack()
    streamer = BlockStreamer(list(stack), CPU, lookahead=2)
    streamer.set_resident({1, 4})  # streamed: 0, 2, 3, 5
    in_flight: dict[int, set[int]] = {}

    def watch(index: int) -> Any:
        def hook(_module: nn.Module, _args: Any) -> None:
            in_flight[index] = {b.index for b in streamer.blocks if b.device_copy is not None}

        return hook

    for i, block in enumerate(stack):
        block.register_forward_pre_hook(watch(i))
    stack(torch.randn(2, 8))
    assert in_flight[0] == {0, 2, 3}
    assert in_flight[2] == {2, 3, 5}
    assert in_flight[1] == in_flight[0] - {0}  # a streamed block drops its copy once it has run


def test_remove_takes_every_hook_off() -> None:
    """remove() leaves no hooks and every block in host memory, and the stack computes as before."""
    stack = small_stack()
    x = torch.randn(3, 8)
    expected = stack(x)
    streamer = BlockStreamer(list(stack), CPU, lookahead=2)
    assert all(block._forward_pre_hooks and block._forward_hooks for block in stack)
    streamer.set_resident({0, 3})
    stack(x)
    streamer.remove()
    for block in stack:
        assert not block._forward_pre_hooks and not block._forward_hooks
    assert streamer.resident_indices() == set()
    assert all(b.device_copy is None for b in streamer.blocks)
    assert torch.equal(stack(x), expected)


# output checks


def test_normal_render_is_not_bad(engine: Engine) -> None:
    """A normal render's output is neither NaN nor black."""
    result = engine.render(REQUEST)
    assert result.output_bad is False
    assert not is_black(result.image)


def test_is_black() -> None:
    """All-black and near-black images are black; noise or one bright pixel is not."""
    assert is_black(Image.new("RGB", (16, 16)))
    assert is_black(Image.new("RGB", (16, 16), (2, 2, 2)))
    noise = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    assert not is_black(Image.fromarray(noise))
    dot = Image.new("RGB", (16, 16))
    dot.putpixel((5, 5), (255, 255, 255))
    assert not is_black(dot)


# the worker's engine holder


def test_engine_holder_loads_once_per_model_and_dtype(model_cache: Path) -> None:
    """get() twice loads once; another dtype loads again."""
    holder = EngineHolder(Settings(model_cache_dir=model_cache, offload_mode="auto", worker_dtype="fp32"))
    first, first_load = holder.get(TINY, "fp32")
    again, again_load = holder.get(TINY, "fp32")
    assert again is first
    assert holder.loads == 1
    assert first_load > 0 and again_load == 0.0
    assert first.mode == "auto"
    assert holder.budget is not None and holder.budget.device_bytes == 1 << 62  # no cap on the CPU
    other, other_load = holder.get(TINY, "bf16")
    assert other is not first and other.loaded.dtype == "bf16"
    assert holder.loads == 2 and other_load > 0


def test_engine_holder_renders(model_cache: Path, reference: np.ndarray) -> None:
    """The holder's engine renders REQUEST on the resident rung with the same pixels."""
    holder = EngineHolder(Settings(model_cache_dir=model_cache, offload_mode="auto", worker_dtype="fp32"))
    held, _load_s = holder.get(TINY, "fp32")
    result = held.render(REQUEST)
    assert result.stats.rung == "resident"
    assert np.array_equal(np.array(result.image), reference)


@pytest.mark.parametrize(("setting", "tiled"), [("on", True), ("off", False)])
def test_forced_vae_tiling_keeps_only_matching_planned_rungs(
    engine: Engine, setting: str, tiled: bool
) -> None:
    """VAE_TILING=on/off keeps the planned rungs that tile (or don't); sequential still ends the ladder."""
    forced = Engine(
        engine.loaded, mode="auto", budget=HUGE, activations=DEFAULT_ACTIVATIONS, vae_tiling=setting
    )
    ladder = forced.ladder(64, 64)
    assert ladder[-1].rung == "sequential"
    assert ladder[:-1] and all(plan.vae_tiled == tiled for plan in ladder[:-1])


def test_unknown_vae_tiling_is_refused(engine: Engine) -> None:
    """A typo in VAE_TILING is an error, not a silent default."""
    with pytest.raises(EngineError, match="vae tiling"):
        Engine(engine.loaded, mode="auto", budget=HUGE, activations=DEFAULT_ACTIVATIONS, vae_tiling="maybe")
