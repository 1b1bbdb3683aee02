"""Downloading a batch: its zip streamed to disk with a progress bar, then unpacked beside older downloads."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import DownloadColumn, MofNCompleteColumn, Progress, TaskID, TransferSpeedColumn

from cli.client import ApiError, Client
from jobs.states import ACTIVE

# What the API sends with the zip: the images' total size, known before the zip is built (api/archive.py).
ESTIMATED_BYTES_HEADER = "X-Archive-Estimated-Bytes"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Downloaded:
    """A batch's folder after a download, and what its manifest says about the jobs."""

    folder: Path
    jobs: list[dict[str, Any]]
    written: int  # images written by this download (the others were on disk already)

    @property
    def images(self) -> int:
        """Images of the batch now in the folder."""
        return sum(1 for job in self.jobs if job.get("file"))

    @property
    def unfinished(self) -> int:
        """Jobs still queued or running, whose images a later download will bring."""
        return sum(1 for job in self.jobs if job["status"] in ACTIVE)


def download_batch(client: Client, batch_id: str, out: Path, console: Console) -> Downloaded:
    """Download what is done into OUT/BATCH_ID; raises ApiError before making a folder if it is refused."""
    folder = out / batch_id
    partial = folder / f".batch-{batch_id}.zip.part"
    try:
        return _download(client, batch_id, folder, partial, console)
    except (httpx.HTTPError, zipfile.BadZipFile, OSError) as error:
        raise ApiError(f"the download of {batch_id} was cut short ({error}); run it again") from None


def _download(client: Client, batch_id: str, folder: Path, partial: Path, console: Console) -> Downloaded:
    with client.archive(batch_id) as response:
        estimate = _estimated_bytes(response)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            with _bar(console, by_bytes=estimate is not None) as bar:
                task = bar.add_task("downloading", total=estimate)
                _save(response, partial, lambda n: bar.advance(task, n if estimate is not None else 0))
                written = _unpack(partial, folder, bar, task)
        finally:
            partial.unlink(missing_ok=True)
    jobs = json.loads((folder / MANIFEST).read_text())["jobs"]
    return Downloaded(folder=folder, jobs=jobs, written=written)


def _bar(console: Console, *, by_bytes: bool) -> Progress:
    """Bytes against the API's estimate, or else images unpacked against the images in the zip."""
    counts = (DownloadColumn(), TransferSpeedColumn()) if by_bytes else (MofNCompleteColumn(),)
    return Progress(*Progress.get_default_columns(), *counts, console=console)


def _estimated_bytes(response: httpx.Response) -> int | None:
    value = response.headers.get(ESTIMATED_BYTES_HEADER, "")
    return int(value) if value.isdigit() else None


def _save(response: httpx.Response, path: Path, on_bytes: Callable[[int], None]) -> None:
    with path.open("wb") as stream:
        for chunk in response.iter_bytes():
            stream.write(chunk)
            on_bytes(len(chunk))


def _unpack(archive: Path, folder: Path, bar: Progress, task: TaskID) -> int:
    """Extract the images not on disk yet (same name and size), then the manifest; returns how many."""
    with zipfile.ZipFile(archive) as opened:
        images = [member for member in opened.infolist() if member.filename != MANIFEST]
        by_images = bar.tasks[task].total is None
        if by_images:
            bar.update(task, description="unpacking", total=len(images))
        else:  # the zip's headers and manifest come on top of the images' estimated size
            bar.update(task, total=bar.tasks[task].completed)
        written = 0
        for member in images:
            target = folder / member.filename
            if not (target.is_file() and target.stat().st_size == member.file_size):
                opened.extract(member, folder)
                written += 1
            bar.advance(task, 1 if by_images else 0)
        opened.extract(MANIFEST, folder)
    return written
