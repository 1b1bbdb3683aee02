"""The render engine on the CPU with the tiny synthetic Z-Image pipeline, plus atomic PNG output."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from jobs.lifecycle import Claim
from jobs.params import GenerationParams
from jobs.settings import DEFAULT_MODEL
from worker.engine import (
    Engine,
    EngineError,
    LoadedPipeline,
    RenderCancelled,
    RenderRequest,
    RenderResult,
    render,
)
from worker.engine.costs import Budget
from worker.engine.fitted_costs import DEFAULT_ACTIVATIONS
from worker.engine.loading import check_device_for, load_pipeline
from worker.engine.modes import DIFFUSERS_MODES
from worker.engine.offload import apply_offload
from worker.engine.synthetic import COMPLETE_MARKER, ensure_saved, parameter_counts
from worker.outputs import image_path, png_metadata, save_png_atomically
from worker.runner import to_request

TINY = "synthetic:tiny"
CPU = torch.device("cpu")
HUGE = Budget(device_bytes=1 << 62, host_pinned_bytes=1 << 62)


def make_params(**overrides: object) -> GenerationParams:
    """Generation parameters for a 64x64, 2-step render of the tiny model, with overrides."""
    fields: dict[str, object] = {"prompt": "a cat on a red sofa", "width": 64, "height": 64, "steps": 2}
    return GenerationParams(**{**fields, "seed": 1, "model": TINY, **overrides})


@pytest.fixture(scope="module")
def loaded(model_cache: Path) -> LoadedPipeline:
    """The tiny pipeline, loaded once for the module."""
    loaded = load_pipeline(TINY, dtype="bf16", cache_dir=model_cache, device=CPU)
    loaded.pipeline.to(CPU)  # the loader leaves weights in host memory, which on the CPU is the device
    return loaded


@pytest.fixture(scope="module")
def steps_seen() -> list[tuple[int, int]]:
    """Every (step, total) the base render's callback received."""
    return []


@pytest.fixture(scope="module")
def base(loaded: LoadedPipeline, steps_seen: list[tuple[int, int]]) -> RenderResult:
    """One 64x64, 2-step render with seed 1, recording its step callbacks."""

    def record(step: int, total: int) -> bool:
        steps_seen.append((step, total))
        return True

    return render(loaded, to_request(make_params()), on_step=record)


# synthetic models


def test_full_parameter_counts_match_z_image_turbo() -> None:
    """synthetic:full has Z-Image-Turbo's exact parameter counts."""
    assert parameter_counts("synthetic:full") == {
        "transformer": 6_154_908_736,
        "text_encoder": 4_022_468_096,
        "vae": 83_819_683,
    }


def test_unknown_synthetic_model_is_refused() -> None:
    """An unknown synthetic name is refused with the choices."""
    with pytest.raises(ValueError, match="unknown synthetic model"):
        parameter_counts("synthetic:huge")


def test_ensure_saved_writes_a_complete_folder_once(tmp_path: Path) -> None:
    """Saving builds one complete folder and leaves no staging folder."""
    folder = ensure_saved(TINY, tmp_path)
    assert folder == tmp_path / "synthetic-tiny"
    assert (folder / "model_index.json").is_file()
    assert (folder / COMPLETE_MARKER).read_text() == TINY
    assert {"transformer", "text_encoder", "vae", "tokenizer", "scheduler"} <= {
        p.name for p in folder.iterdir()
    }
    # The folder, and the lock that lets one worker build it while the others wait (test_model_cache.py).
    assert sorted(p.name for p in tmp_path.iterdir()) == [".synthetic-tiny.lock", "synthetic-tiny"]


def test_ensure_saved_reuses_the_saved_folder(model_cache: Path) -> None:
    """A saved folder is reused untouched."""
    folder = ensure_saved(TINY, model_cache)
    stamps = {p.name: p.stat().st_mtime_ns for p in (folder / "model_index.json", folder / COMPLETE_MARKER)}
    assert ensure_saved(TINY, model_cache) == folder
    assert {
        p.name: p.stat().st_mtime_ns for p in (folder / "model_index.json", folder / COMPLETE_MARKER)
    } == stamps
    assert not [p for p in model_cache.iterdir() if p.name.startswith(".build-")]


# loading and device checks


def test_loaded_pipeline_describes_itself(loaded: LoadedPipeline) -> None:
    """A loaded pipeline knows its model, dtype, device and load time, and no placement."""
    assert (loaded.model, loaded.dtype) == (TINY, "bf16")
    assert "offload_mode" not in {f.name for f in dataclasses.fields(LoadedPipeline)}
    assert loaded.device == CPU
    assert loaded.load_seconds > 0
    assert loaded.pipeline.transformer.dtype == torch.bfloat16


def test_load_pipeline_leaves_weights_in_host_memory_without_hooks(model_cache: Path) -> None:
    """Loading places nothing: every weight is on the host and no offload or streaming hook is attached."""
    fresh = load_pipeline(TINY, dtype="fp32", cache_dir=model_cache, device=CPU)
    pipeline = fresh.pipeline
    for component in (pipeline.transformer, pipeline.text_encoder, pipeline.vae):
        assert {p.device.type for p in component.parameters()} == {"cpu"}
        for module in component.modules():
            assert not module._forward_pre_hooks and not module._forward_hooks
            assert not hasattr(module, "_hf_hook")
    assert pipeline.transformer.dtype == torch.float32


def test_engine_refuses_an_unknown_mode(loaded: LoadedPipeline) -> None:
    """The Engine names the modes it knows when given another."""
    with pytest.raises(EngineError, match="offload mode"):
        Engine(loaded, mode="disk", budget=HUGE, activations=DEFAULT_ACTIVATIONS)


@pytest.mark.parametrize("model", [DEFAULT_MODEL, "synthetic:full", "some/other-model"])
def test_models_that_need_cuda_are_refused_on_the_cpu(model: str) -> None:
    """Real models are refused on the CPU with a reason naming CUDA."""
    with pytest.raises(EngineError, match="CUDA"):
        check_device_for(model, CPU)


def test_tiny_model_on_the_cpu_and_any_model_on_cuda_pass_the_check() -> None:
    """The tiny model runs on the CPU; any model passes on CUDA."""
    assert check_device_for(TINY, CPU) is None
    assert check_device_for(DEFAULT_MODEL, torch.device("cuda", 0)) is None


def test_load_pipeline_refuses_a_hub_model_on_the_cpu(tmp_path: Path) -> None:
    """Loading a hub model on the CPU fails before downloading anything."""
    with pytest.raises(EngineError, match="CUDA"):
        load_pipeline(DEFAULT_MODEL, dtype="bf16", cache_dir=tmp_path, device=CPU)
    assert list(tmp_path.iterdir()) == []


def test_load_pipeline_refuses_an_unknown_dtype(tmp_path: Path) -> None:
    """An unknown dtype is an EngineError."""
    with pytest.raises(EngineError, match="dtype"):
        load_pipeline(TINY, dtype="int8", cache_dir=tmp_path, device=CPU)


def test_apply_offload_rejects_an_unknown_mode(loaded: LoadedPipeline) -> None:
    """apply_offload names its modes when given another."""
    with pytest.raises(ValueError, match="offload mode"):
        apply_offload(loaded.pipeline, "disk", CPU)


@pytest.mark.parametrize("mode", DIFFUSERS_MODES)
def test_every_offload_mode_is_none_on_the_cpu(loaded: LoadedPipeline, mode: str) -> None:
    """On the CPU every diffusers offload mode comes down to none."""
    assert apply_offload(loaded.pipeline, mode, CPU) == "none"


# rendering


def test_render_gives_an_image_of_the_requested_size(base: RenderResult) -> None:
    """A render is an RGB image of the requested size, not flat."""
    assert base.image.size == (64, 64)
    assert base.image.mode == "RGB"
    low, high = base.image.convert("L").getextrema()
    assert low < high


def test_render_stats_on_the_cpu(base: RenderResult) -> None:
    """The primitive render records phases and host memory; device fields stay empty on the CPU."""
    stats = base.stats
    assert (stats.device_name, stats.rung) == ("cpu", "none")
    assert (stats.plan, stats.predicted_peak_bytes, stats.vram_budget_bytes) == (None, None, None)
    assert (stats.attempts, stats.notes.stored()) == ([], {})
    assert base.output_bad is False
    assert stats.peak_allocated_bytes is None
    assert stats.peak_reserved_bytes is None
    assert stats.device_total_bytes is None
    assert stats.host_rss_bytes is not None and stats.host_rss_bytes > 0
    assert stats.encode_s > 0 and stats.denoise_s > 0 and stats.decode_s > 0
    assert stats.torch_version == torch.__version__


def test_step_callback_sees_every_step(base: RenderResult, steps_seen: list[tuple[int, int]]) -> None:
    """The step callback hears (step, total) after every step."""
    assert steps_seen == [(1, 2), (2, 2)]


def test_same_request_and_seed_gives_identical_pixels(loaded: LoadedPipeline, base: RenderResult) -> None:
    """Rendering is deterministic for a request and seed."""
    again = render(loaded, to_request(make_params()))
    assert again.image.tobytes() == base.image.tobytes()


def test_precomputed_embeds_give_identical_pixels(loaded: LoadedPipeline, base: RenderResult) -> None:
    """Embeddings encoded beforehand (embeds=) render the same image as encoding inline."""
    with torch.inference_mode():
        embeds = loaded.pipeline.encode_prompt(
            prompt=["a cat on a red sofa"], device=CPU, do_classifier_free_guidance=False
        )
    result = render(loaded, to_request(make_params()), embeds=embeds)
    assert result.image.tobytes() == base.image.tobytes()
    assert result.stats.encode_s < base.stats.encode_s


def test_different_seed_gives_different_pixels(loaded: LoadedPipeline, base: RenderResult) -> None:
    """Another seed gives another image."""
    other = render(loaded, to_request(make_params(seed=2)))
    assert other.image.size == base.image.size
    assert other.image.tobytes() != base.image.tobytes()


def test_non_square_size_is_width_by_height(loaded: LoadedPipeline) -> None:
    """Width and height are not swapped."""
    result = render(
        loaded, RenderRequest(prompt="a cat", width=96, height=64, steps=1, guidance_scale=0.0, seed=3)
    )
    assert result.image.size == (96, 64)


def test_callback_returning_false_cancels_after_that_step(loaded: LoadedPipeline) -> None:
    """A callback returning False stops the render after that step."""
    seen: list[tuple[int, int]] = []

    def stop_after_two(step: int, total: int) -> bool:
        seen.append((step, total))
        return step < 2

    with pytest.raises(RenderCancelled, match="after step 2 of 4"):
        render(loaded, to_request(make_params(steps=4)), on_step=stop_after_two)
    assert seen == [(1, 4), (2, 4)]


def test_to_request_carries_every_render_field() -> None:
    """to_request copies every field the engine uses."""
    params = make_params(negative_prompt="blurry", guidance_scale=1.5, seed=9, width=96)
    assert to_request(params) == RenderRequest(
        prompt="a cat on a red sofa",
        negative_prompt="blurry",
        width=96,
        height=64,
        steps=2,
        guidance_scale=1.5,
        seed=9,
    )


# outputs


def output_claim(job_id: str, batch_id: str | None, token: str, params: GenerationParams) -> Claim:
    """A claim as the worker holds it, for naming the output file."""
    return Claim(job_id=job_id, lease_token=token, attempt=1, params=params, batch_id=batch_id, batch_index=4)


def test_png_holds_the_parameters_as_text(base: RenderResult, tmp_path: Path) -> None:
    """The PNG carries A1111's `parameters` text and, under `nightrender`, the exact parameters as JSON."""
    params = make_params(negative_prompt="blurry, low: quality")
    path = image_path(tmp_path, output_claim("job-1", "batch-1", "lease-00000001", params))
    save_png_atomically(base.image, path, png_metadata("job-1", params))
    with Image.open(path) as saved:
        text = dict(saved.text)  # type: ignore[attr-defined]
        assert saved.size == (64, 64)
    assert text["parameters"].startswith(
        "a cat on a red sofa\nNegative prompt: blurry, low: quality\nSteps: 2,"
    )
    assert 'Seed: 1, Size: 64x64, Model: "synthetic:tiny"' in text["parameters"]
    ours = json.loads(text["nightrender"])
    assert (ours["job_id"], ours["params"]) == ("job-1", params.model_dump())
    assert set(text) == {"parameters", "nightrender"}  # no bare `prompt` chunk: ComfyUI reads it as a graph


def test_png_save_leaves_no_temporary_files(base: RenderResult, tmp_path: Path) -> None:
    """Saving twice leaves only the final PNG."""
    params = make_params()
    path = image_path(tmp_path, output_claim("job-2", None, "lease-00000002", params))
    metadata = png_metadata("job-2", params)
    save_png_atomically(base.image, path, metadata)
    save_png_atomically(base.image, path, metadata)
    assert path == tmp_path / "single" / "1-a-cat-on-a-red-sofa-lease-00.png"
    assert list(path.parent.iterdir()) == [path]


def test_failed_png_save_cleans_up(tmp_path: Path) -> None:
    """A failed save leaves no temporary file."""
    path = tmp_path / "b" / "job-3.png"
    with pytest.raises(OSError):
        save_png_atomically(Image.new("CMYK", (8, 8)), path, png_metadata("job-3", make_params()))
    assert list(path.parent.iterdir()) == []
