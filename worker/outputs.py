"""Writing images atomically, with the job's parameters in the PNG's text metadata."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from jobs.params import GenerationParams


def png_metadata(job_id: str, params: GenerationParams) -> PngInfo:
    """Text chunks that let anyone reproduce the image from the file alone."""
    info = PngInfo()
    info.add_text("nightrender:job_id", job_id)
    for name, value in params.model_dump().items():
        info.add_text(name, "" if value is None else str(value))
    info.add_text("parameters", json.dumps(params.model_dump(), sort_keys=True))
    return info


def image_path(outputs_dir: Path, job_id: str, batch_id: str | None, lease_token: str) -> Path:
    """Where an attempt's PNG lives: a folder per batch, named by job id and attempt, never by client input.

    The attempt's lease in the name means an attempt that lost its lease can delete its own file
    without touching the file of the attempt that won.
    """
    return outputs_dir / (batch_id or "single") / f"{job_id}-{lease_token[:8]}.png"


def save_png_atomically(image: Image.Image, path: Path, metadata: PngInfo) -> None:
    """Write to a temporary file in the same folder, fsync, then rename, so no reader sees half a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            image.save(stream, format="PNG", pnginfo=metadata)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
