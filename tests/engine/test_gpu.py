"""CUDA-only checks of streaming, the allocator cap and a real OOM ladder (skipped without a GPU)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from worker.engine import Engine, LadderExhausted, RenderRequest, load_pipeline, render
from worker.engine.budget import apply_device_cap
from worker.engine.costs import GB, ActivationModel, Budget
from worker.engine.fitted_costs import DEFAULT_ACTIVATIONS

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda", 0)
REQUEST = RenderRequest("a lighthouse at dusk", 256, 256, 2, 0.0, seed=3)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model cache for this module."""
    return tmp_path_factory.mktemp("gpu-models")


def tiny_engine(cache: Path, budget: Budget, activations: ActivationModel = DEFAULT_ACTIVATIONS) -> Engine:
    """The tiny synthetic pipeline on the GPU under a budget."""

    def load() -> Any:
        return load_pipeline("synthetic:tiny", dtype="bf16", cache_dir=cache, device=CUDA)

    return Engine(load(), mode="auto", budget=budget, activations=activations, reload=load)


def test_streaming_on_cuda_gives_the_same_pixels(cache: Path) -> None:
    """Blocks copied in on the side stream compute exactly what resident blocks compute."""
    engine = tiny_engine(cache, Budget(40 * GB, 8 * GB))
    resident = engine.render(REQUEST).image.tobytes()
    assert engine.plan is not None and engine.plan.rung == "resident"
    planned = engine._planned
    assert planned is not None
    planned.transformer.set_resident({0})
    planned.text_encoder.set_resident(set())
    planned.embedding.place(on_host=True)
    streamed = render(engine.loaded, REQUEST, after_denoise=planned.drop_prefetched).image.tobytes()
    assert streamed == resident
    assert all(b.device_copy is None for b in planned.transformer.blocks if not b.resident)


def test_a_real_oom_walks_the_ladder_and_memory_returns(cache: Path) -> None:
    """With activations predicted as zero and a tiny cap, real OOMs are caught and the worker lives on."""
    free_before = torch.cuda.memory_allocated(CUDA)
    tight = Budget(device_bytes=48 * 1024**2, host_pinned_bytes=8 * GB)
    engine = tiny_engine(cache, tight, ActivationModel(0, 0, 0, 0, 0))
    apply_device_cap(tight, CUDA)
    big = RenderRequest("a lighthouse", 1024, 1024, 2, 0.0, seed=1)
    try:
        result = engine.render(big)
        assert any(a.ran_out_of_memory for a in result.stats.attempts)
    except LadderExhausted as error:
        assert all(a.ran_out_of_memory for a in error.attempts)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, CUDA)
    engine.place_on_host()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_allocated(CUDA) <= free_before + 64 * 1024**2
    engine.set_budget(Budget(40 * GB, 8 * GB))
    assert engine.render(REQUEST).image.size == (256, 256)


def test_peak_reserved_stays_under_the_cap(cache: Path) -> None:
    """Under a 1 GB cap the measured peak reserved memory never exceeds the budget."""
    budget = Budget(device_bytes=1 * GB, host_pinned_bytes=8 * GB)
    engine = tiny_engine(cache, budget)
    apply_device_cap(budget, CUDA)
    try:
        result = engine.render(RenderRequest("a cat", 512, 512, 2, 0.0, seed=2))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, CUDA)
    assert result.stats.peak_reserved_bytes is not None
    assert result.stats.peak_reserved_bytes <= budget.device_bytes
    assert result.stats.vram_budget_bytes == budget.device_bytes


def test_a_capped_worker_builds_the_full_synthetic_model_it_has_never_seen(tmp_path: Path) -> None:
    """The first `run --budget 12` used to fail: the 20 GB build ran under the 12 GB allocator cap."""
    import subprocess
    import sys

    script = (
        "from pathlib import Path; from jobs.settings import Settings;"
        "from worker.holder import EngineHolder;"
        f"h = EngineHolder(Settings(vram_budget_gb='6', model_cache_dir=Path({str(tmp_path)!r})));"
        "engine, _ = h.get('synthetic:full', 'bf16');"
        "print('budget', h.budget.device_bytes)"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "budget " in done.stdout and 0 < int(done.stdout.split("budget ")[1]) <= 6 * GB
