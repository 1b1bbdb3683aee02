"""A batch's zip, streamed while it is built: every image that exists, then a manifest of every job.

The standard library's `zipfile` writes to a stream it cannot seek (sizes and CRCs go in a data
descriptor after each entry, ZIP64 where needed), so no temporary file and no extra dependency: the
one thing `zipstream-ng` adds, a Content-Length known up front, needs the manifest's size before the
first byte. Jobs are read in keyset pages (stats joined), each page in its own short session, so a
slow download never holds a database connection.

Each image is named `{index:05d}-{seed}-{prompt slug}.png` (`jobs/filenames.py`); a name already given
in this archive gets `-2`, `-3`, ... so no entry hides another, and the manifest maps each job to its name.
"""

from __future__ import annotations

import json
import os
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, contains_eager, sessionmaker

from jobs.filenames import image_stem
from jobs.results import result_file, result_location
from jobs.superseded import not_superseded
from jobs.tables import Job
from jobs.views import job_view

PAGE_JOBS = 500
# Sent with the archive: the images' total size, known before the zip is built (the CLI's progress bar).
ESTIMATED_BYTES_HEADER = "X-Archive-Estimated-Bytes"
# The first page is small so that the first byte leaves soon (a 1,000-job batch: 7 ms instead of 30 ms).
FIRST_PAGE_JOBS = 50
COPY_BYTES = 64 * 1024
# Bytes gathered before a chunk is handed to the server: small PNGs go out several to a chunk.
CHUNK_BYTES = 64 * 1024


class _Sink:
    """The write-only file `zipfile` writes into; the generator takes what it holds between writes."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self.size = 0

    def write(self, data: bytes, /) -> int:
        """Keep a copy of the bytes (zipfile may reuse its buffer)."""
        self._parts.append(bytes(data))
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        """Nothing to flush: the bytes leave through `take`."""

    def close(self) -> None:
        """Nothing to close: the response owns the stream."""

    def take(self) -> bytes:
        """Everything written since the last take."""
        data = b"".join(self._parts)
        self._parts.clear()
        self.size = 0
        return data


def stream_archive(
    factory: sessionmaker[Session], batch_id: str, outputs_dir: Path, *, page_size: int = PAGE_JOBS
) -> Iterator[bytes]:
    """The zip's bytes in chunks: PNGs stored as they are, manifest.json last."""
    sink = _Sink()
    manifest: list[dict[str, Any]] = []
    names = UniqueNames()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED) as archive:
        for entry, image, stem in _archived_jobs(factory, batch_id, outputs_dir, page_size):
            entry["file"] = None
            if image is not None:
                name = names.claim(stem)
                entry["file"] = name if _store(archive, image, name) else None
            manifest.append(entry)
            if sink.size >= CHUNK_BYTES:
                yield sink.take()
        archive.writestr("manifest.json", json.dumps({"batch_id": batch_id, "jobs": manifest}, indent=2))
    yield sink.take()  # the manifest and the central directory, written on close


def _archived_jobs(
    factory: sessionmaker[Session], batch_id: str, outputs_dir: Path, page_size: int
) -> Iterator[tuple[dict[str, Any], Path | None, str]]:
    """Each job's manifest entry, its image file and its readable name (no extension), page by page."""
    after, size = -1, min(FIRST_PAGE_JOBS, page_size)
    while True:
        with factory() as session:
            jobs = session.scalars(_page_query(batch_id, after, size)).all()
            entries = [(job_view(session, job), job) for job in jobs]
        for entry, job in entries:
            stem = image_stem(index=job.batch_index, seed=job.seed, prompt=job.prompt)
            yield entry, result_file(outputs_dir, job.result_path), stem
        if len(jobs) < size:
            return
        after, size = jobs[-1].batch_index, page_size


def _page_query(batch_id: str, after: int, page_size: int) -> Any:
    """The batch's jobs after `after` in submission order, their stats joined (no query per job)."""
    return (
        select(Job)
        .outerjoin(Job.stats)
        .options(contains_eager(Job.stats))
        .where(Job.batch_id == batch_id, Job.batch_index > after, not_superseded())
        .order_by(Job.batch_index)
        .limit(page_size)
    )


def _store(archive: zipfile.ZipFile, image: Path, name: str) -> bool:
    """Copy the PNG into the zip uncompressed; False if it vanished before it could be opened."""
    try:
        source = image.open("rb")
    except OSError:
        return False
    with source:
        written = os.fstat(source.fileno())
        info = zipfile.ZipInfo(name, date_time=time.localtime(written.st_mtime)[:6])
        info.file_size = written.st_size  # tells zipfile up front whether the entry needs ZIP64
        info.compress_type = zipfile.ZIP_STORED
        with archive.open(info, "w") as target:
            while block := source.read(COPY_BYTES):
                target.write(block)
    return True


class UniqueNames:
    """File names handed out once per archive: a repeated stem gets `-2`, `-3`, ... before `.png`.

    A batch has one job per index (a retry supersedes its original), so repeats are rare; this is the
    guarantee, not the common path. Names are lowercase, so case-insensitive filesystems agree.
    """

    def __init__(self) -> None:
        self._taken: set[str] = set()

    def claim(self, stem: str, suffix: str = ".png") -> str:
        """The first free name among `stem.png`, `stem-2.png`, `stem-3.png`, ..."""
        name, copy = f"{stem}{suffix}", 1
        while name in self._taken:
            copy += 1
            name = f"{stem}-{copy}{suffix}"
        self._taken.add(name)
        return name


def archived_image_bytes(session: Session, batch_id: str, outputs_dir: Path) -> int:
    """The total size of the batch's image files: one query for their paths, one `stat` per file.

    Sent as a header before the zip, so a client can show a total. No `resolve()` per path (that is
    ~10x the stat): a lexical check keeps files outside the outputs folder out of the sum, and the
    archive itself still checks each file strictly before it sends any.
    """
    query = select(Job.result_path).where(
        Job.batch_id == batch_id, Job.result_path.is_not(None), not_superseded()
    )
    stored = session.scalars(query).all()
    return sum(_file_size(result_location(outputs_dir, path)) for path in stored if path)


def _file_size(path: str | None) -> int:
    """The file's size in bytes, 0 if it is gone (or lies outside the outputs folder: None)."""
    if path is None:
        return 0
    try:
        return os.stat(path).st_size
    except OSError:
        return 0
