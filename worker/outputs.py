"""Writing images atomically, named for people, with the job's parameters in the PNG's text metadata."""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from jobs.filenames import image_stem
from jobs.lifecycle import Claim
from jobs.params import GenerationParams

# Every model here runs diffusers' FlowMatchEulerDiscreteScheduler: "Euler" in A1111's sampler names.
SAMPLER = "Euler"
NEGATIVE_PREFIX = "Negative prompt: "
_LINE_BREAK = re.compile(r"\r\n?")
_PATH_SEPARATOR = re.compile(r"[\\/]")


@functools.cache
def program_version() -> str:
    """`nightrender <version>`, as A1111 writes its own version into the infotext."""
    try:
        return f"nightrender {package_metadata.version('nightrender')}"
    except package_metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "nightrender"


def png_metadata(job_id: str, params: GenerationParams) -> PngInfo:
    """`parameters` in A1111's infotext format for other tools; `nightrender` holds the exact JSON."""
    info = PngInfo()
    info.add_text("parameters", a1111_parameters(params))
    ours = {"job_id": job_id, "version": program_version(), "params": params.model_dump()}
    info.add_text("nightrender", json.dumps(ours, sort_keys=True, ensure_ascii=False))
    return info


def a1111_parameters(params: GenerationParams) -> str:
    """The infotext A1111, Forge, SD.Next, InvokeAI's import and civitai read: prompt, negative, then fields.

    The prompts are written as they are (the format has no escape for them); each field value with a
    comma, colon or line break is a JSON string, as A1111's `quote` writes it.
    """
    fields: dict[str, Any] = {
        "Steps": params.steps,
        "Sampler": SAMPLER,
        "CFG scale": params.guidance_scale,
        "Seed": params.seed,
        "Size": f"{params.width}x{params.height}",
        "Model": model_name(params.model),
        "Version": program_version(),
    }
    line = ", ".join(f"{key}: {infotext_value(value)}" for key, value in fields.items())
    negative = unix_lines(params.negative_prompt or "")
    negative_text = f"\n{NEGATIVE_PREFIX}{negative}" if negative else ""
    return f"{unix_lines(params.prompt)}{negative_text}\n{line}".strip()


def unix_lines(text: str) -> str:
    """Line breaks as "\\n" only: A1111's reader splits on "\\n", and a stray "\\r" confuses others."""
    return _LINE_BREAK.sub("\n", text)


def infotext_value(value: object) -> str:
    """A field value, JSON-quoted when it holds a separator (and when it starts with a quote, to survive)."""
    text = str(value)
    if any(mark in text for mark in (",", ":", "\n")) or text.startswith('"'):
        return json.dumps(text, ensure_ascii=False)
    return text


def model_name(model: str) -> str:
    """The model's own name, as A1111 names a checkpoint: a hub id or a folder without its parents."""
    return _PATH_SEPARATOR.split(model.rstrip("/\\"))[-1] or model


def image_path(outputs_dir: Path, claim: Claim) -> Path:
    """Where an attempt's PNG lives: a folder per batch, `{index:05d}-{seed}-{slug}-{lease}.png` in it.

    The attempt's lease in the name means an attempt that lost its lease can delete its own file
    without touching the file of the attempt that won. A job outside a batch has no index.
    """
    index = claim.batch_index if claim.batch_id else None
    stem = image_stem(index=index, seed=claim.params.seed, prompt=claim.params.prompt)
    return outputs_dir / (claim.batch_id or "single") / f"{stem}-{claim.lease_token[:8]}.png"


def temporary_prefix(job_id: str) -> str:
    """The name every attempt of a job gives its half-written file: hidden, and found by the job's id."""
    return f".{job_id}-"


def remove_dead_attempts_files(path: Path, job_id: str) -> None:
    """Once `path` is committed as the job's image, delete what the job's other attempts left beside it.

    An attempt killed mid-write (kill -9, a lost machine) leaves its temporary file, or, killed between
    its rename and its commit, a whole PNG under its own lease; nothing else would ever remove them.
    A PNG goes only if its own metadata names this job: another job may share the name's stem.
    """
    for leftover in path.parent.glob(f"{temporary_prefix(job_id)}*.tmp"):
        leftover.unlink(missing_ok=True)
    job_stem = path.stem.rsplit("-", 1)[0]  # the name without this attempt's lease
    for other in path.parent.glob(f"{job_stem}-*.png"):
        if other != path and png_job_id(other) == job_id:
            other.unlink(missing_ok=True)


def png_job_id(path: Path) -> str | None:
    """The job id a PNG we wrote carries in its `nightrender` text (None if unreadable or not ours)."""
    try:
        with Image.open(path) as image:
            found = json.loads(image.info.get("nightrender", "{}")).get("job_id")
        return found if isinstance(found, str) else None
    except (OSError, ValueError, AttributeError):
        return None


def save_png_atomically(
    image: Image.Image, path: Path, metadata: PngInfo, *, prefix: str | None = None
) -> None:
    """Write to a temporary file in the same folder, fsync, then rename, so no reader sees half a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=prefix or f".{path.stem}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            image.save(stream, format="PNG", pnginfo=metadata)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
