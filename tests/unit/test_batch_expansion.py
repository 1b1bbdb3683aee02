"""Batch expansion validates the whole list at once, yet reports errors as one job's validation did:
at the prompt the failing job came from, for the first failing job only.
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from jobs.batching import BatchCreate, ExpansionError, PromptItem, expand_batch
from jobs.params import GenerationParams

MODEL = "synthetic:tiny"


def expansion_error(request: BatchCreate) -> ExpansionError:
    """The error expanding `request` raises."""
    with pytest.raises(ExpansionError) as caught:
        expand_batch(request, MODEL)
    return caught.value


def test_jobs_come_prompt_major_then_seed_then_size() -> None:
    request = BatchCreate.model_validate(
        {"prompts": ["a", "b"], "seeds": [1, 2], "sizes": ["64x64", "128x64"], "steps": 2}
    )
    expanded = expand_batch(request, MODEL)
    assert [(p.prompt, p.seed, p.width) for p in expanded] == [
        (prompt, seed, width) for prompt in "ab" for seed in (1, 2) for width in (64, 128)
    ]
    assert expanded[0] == GenerationParams(prompt="a", seed=1, width=64, height=64, steps=2, model=MODEL)


def test_an_error_is_located_at_its_prompt_when_each_prompt_makes_several_jobs() -> None:
    # 2 seeds x 2 sizes: the third prompt's jobs are items 8 to 11 of the expanded list.
    request = BatchCreate.model_validate(
        {
            "prompts": ["a", "b", {"prompt": "c", "steps": 0}, "d"],
            "seeds": [1, 2],
            "sizes": ["64x64", "128x64"],
        }
    )
    error = expansion_error(request)
    assert [e["loc"] for e in error.errors] == [["body", "prompts", 2, "steps"]]
    assert error.errors[0]["type"] == "greater_than_equal"


def test_only_the_first_invalid_job_is_reported() -> None:
    request = BatchCreate(prompts=["a", PromptItem(prompt=" ", steps=0), "c", "\x00"], seeds=[3, 4])
    error = expansion_error(request)
    assert sorted(tuple(e["loc"]) for e in error.errors) == [
        ("body", "prompts", 1, "prompt"),
        ("body", "prompts", 1, "steps"),
    ]


def test_the_messages_are_those_of_one_job_validated_alone() -> None:
    error = expansion_error(BatchCreate(prompts=["a", "bad\x07prompt"]))
    with pytest.raises(ValidationError) as alone:
        GenerationParams(prompt="bad\x07prompt", seed=1, model=MODEL)
    assert [e["msg"] for e in error.errors] == [alone.value.errors()[0]["msg"]]
