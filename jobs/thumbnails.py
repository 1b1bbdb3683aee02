"""Gallery thumbnails: a small WebP of a job's image, made once and kept beside the outputs.

A job's image never changes (a retry is a new job), so its thumbnail is made on the first request and
served from disk after that. It is written to a temporary file and hard-linked into place: concurrent first
requests each write their own temporary file, the first link wins, and no reader sees half a file.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from jobs.results import result_file
from jobs.states import JobStatus
from jobs.tables import Job

log = logging.getLogger(__name__)

THUMBNAIL_SIDE = 256  # the long side at most, in pixels
THUMBNAIL_QUALITY = 80
THUMBNAILS_FOLDER = ".thumbnails"
MEDIA_TYPE = "image/webp"


class NoImage(LookupError):
    """The job has no image (yet): it is not succeeded."""


class ImageGone(LookupError):
    """The job succeeded, but its image is no longer on disk (or cannot be read)."""


@dataclass(frozen=True)
class Thumbnail:
    """A thumbnail on disk, or in memory where the outputs folder is read-only; `etag` names its content."""

    path: Path | None
    content: bytes | None
    etag: str


def thumbnail_of(job: Job, outputs_dir: Path) -> Thumbnail:
    """The job's thumbnail, made now if this is its first request. Raises NoImage or ImageGone."""
    image = image_of(job, outputs_dir)
    target = outputs_dir / THUMBNAILS_FOLDER / f"{job.id}.webp"
    if not target.is_file():
        content = render_thumbnail(image, job.id)
        try:
            store_once(content, target)
        except OSError as error:  # e.g. outputs mounted read-only in the API's container
            _warn_not_cached(target.parent, str(error))
            return Thumbnail(path=None, content=content, etag=f'"{job.id}-m{len(content):x}"')
    stat = target.stat()
    return Thumbnail(path=target, content=None, etag=f'"{job.id}-{stat.st_mtime_ns:x}-{stat.st_size:x}"')


def image_of(job: Job, outputs_dir: Path) -> Path:
    """The job's PNG, only if the worker wrote it under the outputs folder and it is still there."""
    if job.status != JobStatus.SUCCEEDED or not job.result_path:
        raise NoImage(f"job {job.id} has no image: it is {job.status.value}")
    path = result_file(outputs_dir, job.result_path)
    if path is None:
        raise ImageGone(f"the image of job {job.id} is no longer on disk")
    return path


def render_thumbnail(image: Path, job_id: str) -> bytes:
    """The image shrunk to THUMBNAIL_SIDE on its long side (never enlarged), as WebP bytes."""
    try:
        with Image.open(image) as source:
            source.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.Resampling.LANCZOS)
            buffer = io.BytesIO()
            source.convert("RGB").save(buffer, format="WEBP", quality=THUMBNAIL_QUALITY, method=4)
    except (UnidentifiedImageError, OSError) as error:
        raise ImageGone(f"the image of job {job_id} cannot be read: {error}") from None
    return buffer.getvalue()


def store_once(content: bytes, target: Path) -> None:
    """Write `content` at `target` unless a file is there already; the first writer wins, atomically."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.stem}-", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(content)
            stream.flush()
            os.fsync(stream.fileno())
        _link_unless_present(Path(temporary), target)
    finally:
        Path(temporary).unlink(missing_ok=True)


def _link_unless_present(temporary: Path, target: Path) -> None:
    try:
        os.link(temporary, target)
    except FileExistsError:
        pass  # a concurrent first request stored it: keep that file (its ETag may already be out)
    except OSError:
        os.replace(temporary, target)  # a filesystem without hard links: a rename is still atomic


@functools.cache
def _warn_not_cached(folder: Path, error: str) -> None:
    # Once per folder and reason: a gallery asks for dozens of thumbnails at a time.
    log.warning("thumbnails are not cached in %s (%s): each is made again on request", folder, error)
