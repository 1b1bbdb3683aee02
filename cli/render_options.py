"""The options of the commands that render (submit, run, profile), and the one grammar of `--sizes`."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel

from jobs.batching import BatchCreate
from jobs.params import MAX_PIXELS, MAX_SIDE, MIN_SIDE, SIZE_MULTIPLE, GenerationParams

SIZES_GRAMMAR = "comma-separated; 512 means 512x512, 1024x768 is width x height"


def _bound(model: type[BaseModel], field: str, kind: str) -> Any:
    """A field's limit (`ge` or `le`) as the API validates it, so the CLI refuses the same values."""
    return next(getattr(item, kind) for item in model.model_fields[field].metadata if hasattr(item, kind))


MAX_STEPS = _bound(GenerationParams, "steps", "le")
MAX_GUIDANCE = _bound(GenerationParams, "guidance_scale", "le")
MAX_PRIORITY = _bound(BatchCreate, "priority", "le")


class DtypeChoice(StrEnum):
    """The weights' precision a job renders in."""

    BF16 = "bf16"
    FP16 = "fp16"
    FP32 = "fp32"


Out = Annotated[
    Path, typer.Option(help="Folder for the images: each batch goes in OUT/BATCH_ID with its manifest.json")
]
Steps = Annotated[
    int, typer.Option(min=1, max=MAX_STEPS, help=f"Denoising steps per image (1-{MAX_STEPS}); more is slower")
]
Seed = Annotated[
    int | None,
    typer.Option(
        min=0, help="One seed for every image (default: a random seed per image, stored on its job)"
    ),
]
Sizes = Annotated[
    str | None,
    typer.Option(
        help=f"Several sizes, each rendered for every prompt ({SIZES_GRAMMAR}); replaces --width/--height"
    ),
]
Seeds = Annotated[
    str | None,
    typer.Option(help="Several seeds, each rendered for every prompt, e.g. 1,2,3; replaces --seed"),
]
NegativePrompt = Annotated[
    str | None, typer.Option(help="What every image should not show (a prompt file's rows may set their own)")
]
Guidance = Annotated[
    float,
    typer.Option(
        min=0.0,
        max=MAX_GUIDANCE,
        help=f"Classifier-free guidance scale, 0-{MAX_GUIDANCE:g} (0 = off, for turbo models)",
    ),
]
Priority = Annotated[
    int, typer.Option(min=0, max=MAX_PRIORITY, help=f"0-{MAX_PRIORITY}: a higher priority runs sooner")
]
Dtype = Annotated[DtypeChoice, typer.Option(help="Precision of the weights: bf16, fp16 or fp32")]
Json = Annotated[bool, typer.Option("--json", help="Print the API's answer as JSON instead of tables")]


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """Sizes from `512,1024x768` (a single number is a square), each within the render limits."""
    sizes = [_parse_size(part.strip()) for part in text.split(",")]
    if not sizes:
        raise ValueError("give at least one size")
    return sizes


def _parse_size(part: str) -> tuple[int, int]:
    width, sep, height = part.lower().partition("x")
    if not _is_number(width) or (sep and not _is_number(height)):
        raise ValueError(f"sizes are {SIZES_GRAMMAR}; got {part!r}")
    size = (int(width), int(height) if sep else int(width))
    for side in size:
        if side % SIZE_MULTIPLE or not MIN_SIDE <= side <= MAX_SIDE:
            raise ValueError(
                f"size {part!r}: each side must be a multiple of {SIZE_MULTIPLE}, "
                f"from {MIN_SIDE} to {MAX_SIDE}"
            )
    if size[0] * size[1] > MAX_PIXELS:
        raise ValueError(f"size {part!r} is over {MAX_PIXELS:,} pixels")
    return size


def _is_number(text: str) -> bool:
    # ASCII digits only: `str.isdigit` also takes other scripts' digits, which int() would read.
    return text.isascii() and text.isdigit()


def sizes_field(sizes: list[tuple[int, int]]) -> str:
    """Sizes as the API's `sizes` form field reads them: 512x512,1024x768."""
    return ",".join(f"{width}x{height}" for width, height in sizes)


def parse_seeds(text: str) -> list[int]:
    """Seeds from `1,2,3`."""
    parts = [part.strip() for part in text.split(",")]
    if not all(_is_number(part) for part in parts):
        raise ValueError(f"seeds are comma-separated whole numbers, e.g. 1,2,3; got {text!r}")
    return [int(part) for part in parts]


def batch_fields(
    *,
    model: str | None,
    width: int,
    height: int,
    steps: int,
    seed: int | None,
    sizes: str | None,
    seeds: str | None,
    negative_prompt: str | None,
    guidance: float,
    priority: int,
    dtype: DtypeChoice,
) -> dict[str, str]:
    """The form fields of a batch upload, normalized (the same options give the same fields).

    Raises ValueError for --sizes or --seeds the API would refuse.
    """
    fields = {
        "width": str(width),
        "height": str(height),
        "steps": str(steps),
        "guidance_scale": repr(float(guidance)),
        "priority": str(priority),
        "dtype": dtype.value,
    }
    optional = {
        "model": model,
        "seed": None if seed is None else str(seed),
        "sizes": None if sizes is None else sizes_field(parse_sizes(sizes)),
        "seeds": None if seeds is None else ",".join(map(str, parse_seeds(seeds))),
        "negative_prompt": negative_prompt,
    }
    fields.update({name: value for name, value in optional.items() if value is not None})
    return fields
