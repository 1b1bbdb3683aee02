"""GenerationParams: the one validated contract between the API, SQL and the worker."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator

Dtype = Literal["bf16", "fp16", "fp32"]
SIZE_MULTIPLE = 16
MIN_SIDE, MAX_SIDE = 64, 2048
MAX_PIXELS = 2048 * 2048
MAX_SEED = 2**63 - 1
MAX_PROMPT_CHARS = 2000
# The schema's statement of "no control characters but tab, newline and return" (Unicode category Cc).
NO_CONTROL_PATTERN = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]*$"

# The request models' fields. The schema states the limits; GenerationParams enforces them when a request
# is expanded, so each error is reported once, at its place in the body (not once per union member).
PromptText = Annotated[
    str,
    WithJsonSchema(
        {"type": "string", "minLength": 1, "maxLength": MAX_PROMPT_CHARS, "pattern": NO_CONTROL_PATTERN}
    ),
]
NegativeText = Annotated[
    str, WithJsonSchema({"type": "string", "maxLength": MAX_PROMPT_CHARS, "pattern": NO_CONTROL_PATTERN})
]
Side = Annotated[
    int,
    WithJsonSchema(
        {"type": "integer", "minimum": MIN_SIDE, "maximum": MAX_SIDE, "multipleOf": SIZE_MULTIPLE}
    ),
]
SeedValue = Annotated[int, WithJsonSchema({"type": "integer", "minimum": 0, "maximum": MAX_SEED})]
Steps = Annotated[int, WithJsonSchema({"type": "integer", "minimum": 1, "maximum": 100})]
Guidance = Annotated[float, WithJsonSchema({"type": "number", "minimum": 0.0, "maximum": 30.0})]
ModelName = Annotated[
    str, Field(min_length=1, max_length=500, json_schema_extra={"pattern": NO_CONTROL_PATTERN})
]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
Priority = Annotated[int, Field(ge=0, le=9, description="0-9, higher runs sooner")]


# Unicode category Cc (U+0000-U+001F, U+007F-U+009F) but tab, newline and return, which prompt files may
# hold. One regex search is ~20x cheaper than a category lookup per character over a 10,000-prompt batch.
CONTROL_CHARACTER = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


class GenerationParams(BaseModel):
    """Everything a worker needs to render one image, exactly as stored on the job row."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(min_length=1, max_length=2000)
    negative_prompt: str | None = Field(None, max_length=2000)
    width: int = Field(1024, ge=MIN_SIDE, le=MAX_SIDE)
    height: int = Field(1024, ge=MIN_SIDE, le=MAX_SIDE)
    steps: int = Field(9, ge=1, le=100)
    guidance_scale: float = Field(0.0, ge=0.0, le=30.0)
    seed: int = Field(ge=0, le=MAX_SEED)
    model: str = Field(min_length=1, max_length=500)
    dtype: Dtype = "bf16"

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be blank")
        return value

    @field_validator("prompt", "negative_prompt", "model")
    @classmethod
    def _no_control_characters(cls, value: str | None) -> str | None:
        # PostgreSQL refuses NUL in text and SQLite would store it; neither belongs in a prompt.
        text = value or ""
        bad = CONTROL_CHARACTER.search(text)
        if bad is not None:
            code = f"U+{ord(bad.group()):04X}"
            raise ValueError(f"must not contain control characters ({code} at {bad.start()})")
        return value

    @field_validator("width", "height")
    @classmethod
    def _multiple_of_16(cls, value: int) -> int:
        if value % SIZE_MULTIPLE:
            raise ValueError(f"must be a multiple of {SIZE_MULTIPLE} (got {value})")
        return value
