"""GenerationParams validation, batch expansion (prompts x seeds x sizes) and job state rules."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from jobs.batching import BatchCreate, ExpansionError, JobCreate, PromptItem, expand_batch, job_params
from jobs.lifecycle import can_transition
from jobs.params import MAX_SEED, GenerationParams
from jobs.states import TERMINAL, JobStatus, batch_status

MODEL = "synthetic:tiny"


def make_params(**overrides: Any) -> GenerationParams:
    return GenerationParams(**{"prompt": "a cat", "seed": 1, "model": MODEL, **overrides})


def locs(error: ValidationError) -> list[tuple[Any, ...]]:
    return [tuple(entry["loc"]) for entry in error.errors()]


def expansion_error(request: BatchCreate) -> ExpansionError:
    with pytest.raises(ExpansionError) as caught:
        expand_batch(request, MODEL)
    return caught.value


# GenerationParams


def test_defaults_are_the_turbo_settings() -> None:
    params = make_params()
    assert (params.width, params.height, params.steps, params.guidance_scale) == (1024, 1024, 9, 0.0)
    assert params.dtype == "bf16"


@pytest.mark.parametrize("side", ["width", "height"])
@pytest.mark.parametrize("value", [64, 80, 512, 2048])
def test_sides_in_range_and_multiple_of_16_are_accepted(side: str, value: int) -> None:
    assert getattr(make_params(**{side: value}), side) == value


@pytest.mark.parametrize("side", ["width", "height"])
@pytest.mark.parametrize("value", [1000, 520, 65])
def test_sides_not_multiple_of_16_are_rejected(side: str, value: int) -> None:
    with pytest.raises(ValidationError) as caught:
        make_params(**{side: value})
    assert locs(caught.value) == [(side,)]
    assert "multiple of 16" in caught.value.errors()[0]["msg"]


@pytest.mark.parametrize("side", ["width", "height"])
@pytest.mark.parametrize("value", [0, 48, 2064, 4096])
def test_sides_outside_min_max_are_rejected(side: str, value: int) -> None:
    with pytest.raises(ValidationError) as caught:
        make_params(**{side: value})
    assert (side,) in locs(caught.value)
    assert {e["type"] for e in caught.value.errors()} & {"greater_than_equal", "less_than_equal"}


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_blank_prompt_is_rejected(prompt: str) -> None:
    with pytest.raises(ValidationError) as caught:
        make_params(prompt=prompt)
    assert locs(caught.value) == [("prompt",)]


def test_whitespace_prompt_message_says_blank() -> None:
    with pytest.raises(ValidationError, match="must not be blank"):
        make_params(prompt="   ")


@pytest.mark.parametrize("field", ["sampler", "batch_id", "priority"])
def test_extra_fields_are_forbidden(field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        make_params(**{field: "x"})
    assert caught.value.errors()[0]["type"] == "extra_forbidden"
    assert locs(caught.value) == [(field,)]


@pytest.mark.parametrize("seed", [0, 1, 2**31, MAX_SEED])
def test_seeds_in_range_are_accepted(seed: int) -> None:
    assert make_params(seed=seed).seed == seed


@pytest.mark.parametrize("seed", [-1, MAX_SEED + 1, 2**64])
def test_seeds_out_of_range_are_rejected(seed: int) -> None:
    with pytest.raises(ValidationError) as caught:
        make_params(seed=seed)
    assert locs(caught.value) == [("seed",)]


def test_seed_and_model_are_required() -> None:
    with pytest.raises(ValidationError) as caught:
        GenerationParams(prompt="a cat")  # type: ignore[call-arg]
    assert set(locs(caught.value)) == {("seed",), ("model",)}


def test_unknown_dtype_is_rejected() -> None:
    with pytest.raises(ValidationError):
        make_params(dtype="int8")


def test_params_are_frozen() -> None:
    params = make_params()
    with pytest.raises(ValidationError):
        params.seed = 2  # type: ignore[misc]
    assert params.seed == 1


# BatchCreate and expand_batch


def test_expansion_count_matches_job_count() -> None:
    request = BatchCreate(prompts=["a", "b", "c"], seeds=[1, 2], sizes=["512x512", "768x512"])
    expanded = expand_batch(request, MODEL)
    assert request.job_count() == 12
    assert len(expanded) == 12


def test_expansion_is_prompt_major_then_seed_then_size() -> None:
    request = BatchCreate(prompts=["a", "b"], seeds=[7, 8], sizes=["512x512", "768x512"])
    order = [(p.prompt, p.seed, p.width, p.height) for p in expand_batch(request, MODEL)]
    assert order == [
        ("a", 7, 512, 512),
        ("a", 7, 768, 512),
        ("a", 8, 512, 512),
        ("a", 8, 768, 512),
        ("b", 7, 512, 512),
        ("b", 7, 768, 512),
        ("b", 8, 512, 512),
        ("b", 8, 768, 512),
    ]


def test_shared_fields_reach_every_job() -> None:
    request = BatchCreate(
        prompts=["a", "b"], negative_prompt="blurry", steps=4, guidance_scale=2.5, dtype="fp16", seed=3
    )
    for params in expand_batch(request, MODEL):
        assert (params.negative_prompt, params.steps, params.guidance_scale) == ("blurry", 4, 2.5)
        assert (params.dtype, params.model, params.seed) == ("fp16", MODEL, 3)
        assert (params.width, params.height) == (1024, 1024)


def test_seed_and_seeds_are_mutually_exclusive() -> None:
    with pytest.raises(ValidationError, match="either 'seed' or 'seeds'"):
        BatchCreate(prompts=["a"], seed=1, seeds=[2])


@pytest.mark.parametrize(("seeds", "bad"), [([-1], 0), ([1, MAX_SEED + 1], 1)])
def test_seeds_out_of_range_are_rejected_in_a_batch(seeds: list[int], bad: int) -> None:
    with pytest.raises(ValidationError) as caught:
        BatchCreate(prompts=["a"], seeds=seeds)
    assert locs(caught.value) == [("seeds", bad)]


def test_empty_prompts_and_seeds_are_rejected() -> None:
    with pytest.raises(ValidationError):
        BatchCreate(prompts=[])
    with pytest.raises(ValidationError):
        BatchCreate(prompts=["a"], seeds=[])


@pytest.mark.parametrize(
    "size", ["512x768", "512X768", " 512 x 768 ", [512, 768], {"width": 512, "height": 768}]
)
def test_sizes_accept_text_pairs_and_objects(size: Any) -> None:
    request = BatchCreate.model_validate({"prompts": ["a"], "sizes": [size]})
    assert request.sizes is not None
    assert (request.sizes[0].width, request.sizes[0].height) == (512, 768)


@pytest.mark.parametrize("size", ["512", "512x", "axb", "-512x512", [512], [512, 512, 512]])
def test_malformed_sizes_are_rejected(size: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        BatchCreate.model_validate({"prompts": ["a"], "sizes": [size]})
    assert locs(caught.value)[0][:2] == ("sizes", 0)


def test_sizes_replace_shared_width_and_height() -> None:
    request = BatchCreate(prompts=["a"], width=1024, height=1024, sizes=["512x768", [640, 480]])
    assert [(p.width, p.height) for p in expand_batch(request, MODEL)] == [(512, 768), (640, 480)]


def test_prompt_objects_parse_into_prompt_items() -> None:
    request = BatchCreate.model_validate({"prompts": ["a", {"prompt": "b", "steps": 4}]})
    assert request.prompts[0] == "a"
    assert request.prompts[1] == PromptItem(prompt="b", steps=4)


def test_prompt_items_forbid_unknown_fields() -> None:
    with pytest.raises(ValidationError) as caught:
        BatchCreate.model_validate({"prompts": [{"prompt": "b", "model": "other"}]})
    assert any(e["type"] == "extra_forbidden" for e in caught.value.errors())


def test_per_prompt_overrides_apply_to_that_prompt_only() -> None:
    item = PromptItem(prompt="b", negative_prompt="dark", seed=42, width=512, height=768, steps=3)
    request = BatchCreate(prompts=["a", item], seed=5, steps=9, negative_prompt="blurry")
    first, second = expand_batch(request, MODEL)
    assert (first.seed, first.width, first.height, first.steps, first.negative_prompt) == (
        5,
        1024,
        1024,
        9,
        "blurry",
    )
    assert (second.seed, second.width, second.height, second.steps, second.negative_prompt) == (
        42,
        512,
        768,
        3,
        "dark",
    )


def test_bad_shared_width_is_reported_at_body_width() -> None:
    error = expansion_error(BatchCreate(prompts=["a", "b"], width=1000))
    assert [e["loc"] for e in error.errors] == [["body", "width"]]
    assert "multiple of 16" in str(error)


def test_bad_shared_steps_is_reported_at_body_steps() -> None:
    error = expansion_error(BatchCreate(prompts=["a"], steps=0))
    assert [e["loc"] for e in error.errors] == [["body", "steps"]]


def test_bad_size_is_reported_at_its_index() -> None:
    error = expansion_error(BatchCreate(prompts=["a"], sizes=["512x512", "500x512"]))
    assert [e["loc"] for e in error.errors] == [["body", "sizes", 1, "width"]]


def test_bad_shared_steps_with_sizes_is_reported_at_body_steps() -> None:
    error = expansion_error(BatchCreate(prompts=["a"], sizes=["512x512"], steps=0))
    assert [e["loc"] for e in error.errors] == [["body", "steps"]]


@pytest.mark.parametrize(
    ("override", "field"),
    [({"width": 1000}, "width"), ({"height": 8}, "height"), ({"steps": 0}, "steps"), ({"seed": -1}, "seed")],
)
def test_bad_prompt_override_is_reported_at_that_prompt(override: dict[str, Any], field: str) -> None:
    request = BatchCreate(prompts=["a", "b", PromptItem(prompt="c", **override)])
    error = expansion_error(request)
    assert [e["loc"] for e in error.errors] == [["body", "prompts", 2, field]]


def test_blank_prompt_in_batch_is_reported_at_its_index() -> None:
    error = expansion_error(BatchCreate(prompts=["a", "   "]))
    assert [e["loc"] for e in error.errors] == [["body", "prompts", 1, "prompt"]]
    assert error.errors[0]["type"] == "value_error"


def test_random_seeds_are_assigned_when_none_given() -> None:
    expanded = expand_batch(BatchCreate(prompts=[f"p{i}" for i in range(20)]), MODEL)
    seeds = [p.seed for p in expanded]
    assert all(0 <= seed < 2**31 for seed in seeds)
    assert len(set(seeds)) > 1


def test_single_job_gets_a_random_seed_only_when_none_given() -> None:
    assert job_params(JobCreate(prompt="a", seed=11), MODEL).seed == 11
    assert 0 <= job_params(JobCreate(prompt="a"), MODEL).seed < 2**31


def test_single_job_error_is_located_in_the_body() -> None:
    with pytest.raises(ExpansionError) as caught:
        job_params(JobCreate(prompt="a", height=100), MODEL)
    assert [e["loc"] for e in caught.value.errors] == [["body", "height"]]


# jobs.states


def counts(**nonzero: int) -> dict[str, int]:
    return {**{status.value: 0 for status in JobStatus}, **nonzero}


@pytest.mark.parametrize(
    ("states", "expected"),
    [
        ({"queued": 3}, JobStatus.QUEUED),
        ({"queued": 2, "running": 1}, JobStatus.RUNNING),
        ({"queued": 2, "succeeded": 1}, JobStatus.RUNNING),
        ({"queued": 1, "failed": 1}, JobStatus.RUNNING),
        ({"running": 1, "cancelled": 2}, JobStatus.RUNNING),
        ({"succeeded": 3}, JobStatus.SUCCEEDED),
        ({"succeeded": 2, "failed": 1}, JobStatus.FAILED),
        ({"succeeded": 2, "cancelled": 1}, JobStatus.CANCELLED),
        ({"failed": 1, "cancelled": 1}, JobStatus.FAILED),
        ({"cancelled": 4}, JobStatus.CANCELLED),
    ],
)
def test_batch_status_is_derived_from_counts(states: dict[str, int], expected: JobStatus) -> None:
    assert batch_status(counts(**states)) == expected


def test_batch_status_accepts_sparse_counts() -> None:
    assert batch_status({"running": 1}) == JobStatus.RUNNING
    assert batch_status({"succeeded": 1}) == JobStatus.SUCCEEDED


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (JobStatus.QUEUED, JobStatus.RUNNING),
        (JobStatus.QUEUED, JobStatus.CANCELLED),
        (JobStatus.QUEUED, JobStatus.FAILED),
        (JobStatus.RUNNING, JobStatus.SUCCEEDED),
        (JobStatus.RUNNING, JobStatus.FAILED),
        (JobStatus.RUNNING, JobStatus.CANCELLED),
        (JobStatus.RUNNING, JobStatus.QUEUED),
    ],
)
def test_allowed_transitions(current: JobStatus, target: JobStatus) -> None:
    assert can_transition(current, target)


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (JobStatus.QUEUED, JobStatus.SUCCEEDED),
        (JobStatus.QUEUED, JobStatus.QUEUED),
        (JobStatus.RUNNING, JobStatus.RUNNING),
    ],
)
def test_forbidden_transitions(current: JobStatus, target: JobStatus) -> None:
    assert not can_transition(current, target)


@pytest.mark.parametrize("terminal", sorted(TERMINAL))
def test_terminal_states_never_move(terminal: JobStatus) -> None:
    assert not any(can_transition(terminal, target) for target in JobStatus)


def test_own_seed_with_seeds_is_refused() -> None:
    """A prompt's own seed and a seeds matrix would render duplicates, so the pair is refused."""
    with pytest.raises(ValidationError, match="cannot be combined with 'seeds'"):
        BatchCreate(prompts=[{"prompt": "a", "seed": 5}], seeds=[1, 2])


def test_own_size_with_sizes_is_refused() -> None:
    """A prompt's own width and a sizes matrix would render duplicates, so the pair is refused."""
    with pytest.raises(ValidationError, match="cannot be combined with 'sizes'"):
        BatchCreate(prompts=[{"prompt": "a", "width": 128}], sizes=["64x64", "96x64"])
