"""Batch requests and their expansion: prompts x seeds x sizes, each checked as GenerationParams."""

from __future__ import annotations

import secrets
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from jobs.params import (
    Dtype,
    GenerationParams,
    Guidance,
    ModelName,
    NegativeText,
    Priority,
    PromptText,
    Seed,
    SeedValue,
    Side,
    Steps,
)
from jobs.webhook_targets import MAX_URL_LENGTH, url_form_problem

OVERRIDABLE = ("negative_prompt", "seed", "width", "height", "steps", "guidance_scale")
PARAMS_LIST = TypeAdapter(list[GenerationParams])


class PromptItem(BaseModel):
    """One prompt with optional per-prompt overrides (a CSV row or a JSONL line)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: PromptText
    negative_prompt: NegativeText | None = None
    seed: SeedValue | None = None
    width: Side | None = None
    height: Side | None = None
    steps: Steps | None = None
    guidance_scale: Guidance | None = None


class Size(BaseModel):
    """An image size in pixels."""

    model_config = ConfigDict(extra="forbid", strict=True)

    width: int
    height: int

    @model_validator(mode="before")
    @classmethod
    def _from_text_or_pair(cls, value: Any) -> Any:
        if isinstance(value, str):
            width, sep, height = value.lower().partition("x")
            if not sep or not is_ascii_number(width) or not is_ascii_number(height):
                raise ValueError(f"size must look like 1024x768, got {value!r}")
            return {"width": int(width), "height": int(height)}
        if isinstance(value, list | tuple):
            if len(value) != 2:
                raise ValueError("size must be [width, height]")
            return {"width": value[0], "height": value[1]}
        return value


def is_ascii_number(text: str) -> bool:
    """Digits 0-9 only: `str.isdigit` also accepts full-width and other scripts' digits."""
    stripped = text.strip()
    return stripped.isascii() and stripped.isdigit()


class JobCreate(BaseModel):
    """`POST /v1/jobs`: one prompt."""

    # Strict: JSON `true` is not a priority of 1, nor "8" a step count (forms are typed before this).
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: PromptText
    negative_prompt: NegativeText | None = None
    width: Side = 1024
    height: Side = 1024
    steps: Steps = 9
    guidance_scale: Guidance = 0.0
    seed: Seed | None = None
    model: ModelName | None = None
    dtype: Dtype = "bf16"
    priority: Priority = 0


class BatchCreate(BaseModel):
    """`POST /v1/batches`: prompts x seeds x sizes, with shared defaults."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompts: list[PromptText | PromptItem] = Field(min_length=1)
    negative_prompt: NegativeText | None = None
    width: Side = 1024
    height: Side = 1024
    sizes: list[Size] | None = Field(None, min_length=1)
    steps: Steps = 9
    guidance_scale: Guidance = 0.0
    seed: Seed | None = None
    seeds: list[Seed] | None = Field(None, min_length=1)
    model: ModelName | None = None
    dtype: Dtype = "bf16"
    priority: Priority = 0
    webhook_url: str | None = Field(
        None,
        max_length=MAX_URL_LENGTH,
        description="http(s) URL POSTed a signed summary each time the batch finishes (README: Webhooks)",
    )

    @field_validator("webhook_url")
    @classmethod
    def _webhook_url_form(cls, url: str | None) -> str | None:
        problem = url_form_problem(url) if url is not None else None
        if problem:
            raise ValueError(problem)
        return url

    @model_validator(mode="after")
    def _one_seed_form(self) -> BatchCreate:
        if self.seed is not None and self.seeds is not None:
            raise ValueError("give either 'seed' or 'seeds', not both")
        items = [p for p in self.prompts if isinstance(p, PromptItem)]
        if self.seeds and any(p.seed is not None for p in items):
            raise ValueError("a prompt with its own 'seed' cannot be combined with 'seeds'")
        if self.sizes and any(p.width is not None or p.height is not None for p in items):
            raise ValueError("a prompt with its own width or height cannot be combined with 'sizes'")
        return self

    def job_count(self) -> int:
        """How many jobs this request expands to."""
        return len(self.prompts) * len(self.seeds or [0]) * len(self.sizes or [0])


class ExpansionError(ValueError):
    """Expanded parameters that are invalid, with pydantic-style error entries located in the body."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(errors[0]["msg"] if errors else "invalid batch")
        self.errors = errors


def random_seed() -> int:
    """A fresh seed, stored on the job so the image can be reproduced."""
    return secrets.randbelow(2**31)


def job_params(request: JobCreate, model: str) -> GenerationParams:
    """A single job's parameters, with a seed chosen if none was given."""
    fields = request.model_dump(exclude={"priority", "seed", "model"})
    seed = request.seed if request.seed is not None else random_seed()
    return _checked(lambda: GenerationParams(**fields, seed=seed, model=model), ())


def expand_batch(request: BatchCreate, model: str) -> list[GenerationParams]:
    """Every (prompt, seed, size) combination, in prompt-major order."""
    sizes = request.sizes or [Size(width=request.width, height=request.height)]
    seeds: list[int | None] = list(request.seeds) if request.seeds else [request.seed]
    _check_shared_fields(request, sizes, model)
    bases = [{**_base_fields(request, size, seed), "model": model} for seed in seeds for size in sizes]
    fields = [_job_fields(base, item) for item in request.prompts for base in bases]
    try:
        # One validation of the whole list: a model built per job took twice as long.
        return PARAMS_LIST.validate_python(fields)
    except ValidationError as error:
        raise _first_job_errors(error, jobs_per_prompt=len(bases)) from None


def _job_fields(base: dict[str, Any], item: str | PromptItem) -> dict[str, Any]:
    overrides = item.model_dump(exclude_none=True) if isinstance(item, PromptItem) else {"prompt": item}
    fields = {**base, **overrides}
    fields.setdefault("seed", random_seed())
    return fields


def _first_job_errors(error: ValidationError, *, jobs_per_prompt: int) -> ExpansionError:
    # The first invalid job's errors, located at its prompt, as one job's validation reported them.
    entries = error.errors(include_url=False, include_context=False, include_input=False)
    first = int(entries[0]["loc"][0])  # a list item's index
    return ExpansionError(
        [
            {
                "loc": ["body", "prompts", first // jobs_per_prompt, *e["loc"][1:]],
                "msg": e["msg"],
                "type": e["type"],
            }
            for e in entries
            if e["loc"][0] == first
        ]
    )


def _check_shared_fields(request: BatchCreate, sizes: list[Size], model: str) -> None:
    # Report a bad shared field (steps, width, ...) at its own place, not at the first prompt.
    known_good = {**_base_fields(request, Size(width=1024, height=1024), 0), "prompt": "-"}
    _checked(lambda: GenerationParams(**known_good, model=model), ())
    for index, size in enumerate(sizes):
        base = {**_base_fields(request, size, 0), "prompt": "-"}
        where: tuple[Any, ...] = ("sizes", index) if request.sizes else ()
        _checked(lambda b=base: GenerationParams(**b, model=model), where)


def _base_fields(request: BatchCreate, size: Size, seed: int | None) -> dict[str, Any]:
    base: dict[str, Any] = {
        "negative_prompt": request.negative_prompt,
        "width": size.width,
        "height": size.height,
        "steps": request.steps,
        "guidance_scale": request.guidance_scale,
        "dtype": request.dtype,
    }
    if seed is not None:
        base["seed"] = seed
    return base


def _checked(build: Any, where: tuple[Any, ...]) -> GenerationParams:
    try:
        return build()
    except ValidationError as error:
        raise ExpansionError(
            [
                {"loc": ["body", *where, *e["loc"]], "msg": e["msg"], "type": e["type"]}
                for e in error.errors(include_url=False, include_context=False, include_input=False)
            ]
        ) from None
