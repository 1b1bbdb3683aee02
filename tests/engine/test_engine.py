"""The render engine on the CPU with the tiny synthetic Z-Image pipeline, plus atomic PNG output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from jobs.params import GenerationParams
from jobs.settings import DEFAULT_MODEL
from worker.engine import EngineError, LoadedPipeline, RenderCancelled, RenderRequest, RenderResult, render
from worker.engine.loading import check_device_for, load_pipeline
from worker.engine.offload import OFFLOAD_MODES, apply_offload
from worker.engine.synthetic import COMPLETE_MARKER, ensure_saved, parameter_counts
from worker.outputs import image_path, png_metadata, save_png_atomically
from worker.runner import to_request

TINY = "synthetic:tiny"
CPU = torch.device("cpu")


def make_params(**overrides: object) -> GenerationParams:
    fields: dict[str, object] = {"prompt": "a cat on a red sofa", "width": 64, "height": 64, "steps": 2}
    return GenerationParams(**{**fields, "seed": 1, "model": TINY, **overrides})


@pytest.fixture(scope="module")
def loaded(model_cache: Path) -> LoadedPipeline:
    """The tiny pipeline, loaded once for the module."""
    return load_pipeline(TINY, dtype="bf16", offload_mode="none", cache_dir=model_cache, device=CPU)


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
    assert parameter_counts("synthetic:full") == {
        "transformer": 6_154_908_736,
        "text_encoder": 4_022_468_096,
        "vae": 83_819_683,
    }


def test_unknown_synthetic_model_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown synthetic model"):
        parameter_counts("synthetic:huge")


def test_ensure_saved_writes_a_complete_folder_once(tmp_path: Path) -> None:
    folder = ensure_saved(TINY, tmp_path)
    assert folder == tmp_path / "synthetic-tiny"
    assert (folder / "model_index.json").is_file()
    assert (folder / COMPLETE_MARKER).read_text() == TINY
    assert {"transformer", "text_encoder", "vae", "tokenizer", "scheduler"} <= {
        p.name for p in folder.iterdir()
    }
    assert [p.name for p in tmp_path.iterdir()] == ["synthetic-tiny"]


def test_ensure_saved_reuses_the_saved_folder(model_cache: Path) -> None:
    folder = ensure_saved(TINY, model_cache)
    stamps = {p.name: p.stat().st_mtime_ns for p in (folder / "model_index.json", folder / COMPLETE_MARKER)}
    assert ensure_saved(TINY, model_cache) == folder
    assert {
        p.name: p.stat().st_mtime_ns for p in (folder / "model_index.json", folder / COMPLETE_MARKER)
    } == stamps
    assert not [p for p in model_cache.iterdir() if p.name.startswith(".build-")]


# loading and device checks


def test_loaded_pipeline_describes_itself(loaded: LoadedPipeline) -> None:
    assert (loaded.model, loaded.dtype, loaded.offload_mode) == (TINY, "bf16", "none")
    assert loaded.device == CPU
    assert loaded.load_seconds > 0
    assert loaded.pipeline.transformer.dtype == torch.bfloat16


@pytest.mark.parametrize("model", [DEFAULT_MODEL, "synthetic:full", "some/other-model"])
def test_models_that_need_cuda_are_refused_on_the_cpu(model: str) -> None:
    with pytest.raises(EngineError, match="CUDA"):
        check_device_for(model, CPU)


def test_tiny_model_on_the_cpu_and_any_model_on_cuda_pass_the_check() -> None:
    assert check_device_for(TINY, CPU) is None
    assert check_device_for(DEFAULT_MODEL, torch.device("cuda", 0)) is None


def test_load_pipeline_refuses_a_hub_model_on_the_cpu(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="CUDA"):
        load_pipeline(DEFAULT_MODEL, dtype="bf16", offload_mode="none", cache_dir=tmp_path, device=CPU)
    assert list(tmp_path.iterdir()) == []


def test_load_pipeline_refuses_an_unknown_dtype(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="dtype"):
        load_pipeline(TINY, dtype="int8", offload_mode="none", cache_dir=tmp_path, device=CPU)


def test_apply_offload_rejects_an_unknown_mode(loaded: LoadedPipeline) -> None:
    with pytest.raises(ValueError, match="offload mode"):
        apply_offload(loaded.pipeline, "disk", CPU)


@pytest.mark.parametrize("mode", OFFLOAD_MODES)
def test_every_offload_mode_is_none_on_the_cpu(loaded: LoadedPipeline, mode: str) -> None:
    assert apply_offload(loaded.pipeline, mode, CPU) == "none"


# rendering


def test_render_gives_an_image_of_the_requested_size(base: RenderResult) -> None:
    assert base.image.size == (64, 64)
    assert base.image.mode == "RGB"
    low, high = base.image.convert("L").getextrema()
    assert low < high


def test_render_stats_on_the_cpu(base: RenderResult) -> None:
    stats = base.stats
    assert (stats.device_name, stats.offload_mode) == ("cpu", "none")
    assert stats.peak_allocated_bytes is None
    assert stats.peak_reserved_bytes is None
    assert stats.device_total_bytes is None
    assert stats.host_rss_bytes is not None and stats.host_rss_bytes > 0
    assert stats.encode_s > 0 and stats.denoise_s > 0 and stats.decode_s > 0
    assert stats.torch_version == torch.__version__


def test_step_callback_sees_every_step(base: RenderResult, steps_seen: list[tuple[int, int]]) -> None:
    assert steps_seen == [(1, 2), (2, 2)]


def test_same_request_and_seed_gives_identical_pixels(loaded: LoadedPipeline, base: RenderResult) -> None:
    again = render(loaded, to_request(make_params()))
    assert again.image.tobytes() == base.image.tobytes()


def test_different_seed_gives_different_pixels(loaded: LoadedPipeline, base: RenderResult) -> None:
    other = render(loaded, to_request(make_params(seed=2)))
    assert other.image.size == base.image.size
    assert other.image.tobytes() != base.image.tobytes()


def test_non_square_size_is_width_by_height(loaded: LoadedPipeline) -> None:
    result = render(
        loaded, RenderRequest(prompt="a cat", width=96, height=64, steps=1, guidance_scale=0.0, seed=3)
    )
    assert result.image.size == (96, 64)


def test_callback_returning_false_cancels_after_that_step(loaded: LoadedPipeline) -> None:
    seen: list[tuple[int, int]] = []

    def stop_after_two(step: int, total: int) -> bool:
        seen.append((step, total))
        return step < 2

    with pytest.raises(RenderCancelled, match="after step 2 of 4"):
        render(loaded, to_request(make_params(steps=4)), on_step=stop_after_two)
    assert seen == [(1, 4), (2, 4)]


def test_to_request_carries_every_render_field() -> None:
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


def test_png_holds_the_parameters_as_text(base: RenderResult, tmp_path: Path) -> None:
    params = make_params(negative_prompt="blurry")
    path = image_path(tmp_path, "job-1", "batch-1")
    save_png_atomically(base.image, path, png_metadata("job-1", params))
    with Image.open(path) as saved:
        text = dict(saved.text)  # type: ignore[attr-defined]
        assert saved.size == (64, 64)
    assert text["prompt"] == "a cat on a red sofa"
    assert (text["seed"], text["width"], text["height"], text["steps"]) == ("1", "64", "64", "2")
    assert (text["model"], text["negative_prompt"], text["nightrender:job_id"]) == (TINY, "blurry", "job-1")
    assert json.loads(text["parameters"]) == params.model_dump()


def test_png_save_leaves_no_temporary_files(base: RenderResult, tmp_path: Path) -> None:
    path = image_path(tmp_path, "job-2", None)
    metadata = png_metadata("job-2", make_params())
    save_png_atomically(base.image, path, metadata)
    save_png_atomically(base.image, path, metadata)
    assert path == tmp_path / "single" / "job-2.png"
    assert list(path.parent.iterdir()) == [path]


def test_failed_png_save_cleans_up(tmp_path: Path) -> None:
    path = tmp_path / "b" / "job-3.png"
    with pytest.raises(OSError):
        save_png_atomically(Image.new("CMYK", (8, 8)), path, png_metadata("job-3", make_params()))
    assert list(path.parent.iterdir()) == []
