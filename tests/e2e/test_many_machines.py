"""Many machines: a worker on "another host" writes to a shared folder the API's host mounts elsewhere.

The recipe (README: Many machines): every worker points at the same PostgreSQL and Redis and writes its
images to a shared volume mounted at OUTPUTS_DIR, which each machine may mount at its own path. Here the
worker runs with its own DATA_DIR and OUTPUTS_DIR; once it has written the images, the folder is moved to
the path the API was started with (what a share mounted at another path looks like from the API's side),
so the worker's path no longer exists and only a path stored relative to OUTPUTS_DIR can be found.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image
from sqlalchemy import create_engine, select

from cli.process_commands import worker_command
from cli.stack import Stack
from jobs.settings import Settings
from jobs.tables import Job
from tests.e2e.test_end_to_end import wait_for_batch

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("empty_database_url", ["postgres"], indirect=True)]
PROMPTS = ["a lighthouse at dusk", "a cat on a roof", "a neon street in the rain"]


def on_host(settings: Settings, host: Path, outputs: Path) -> Settings:
    """The same database, Redis and queue, with this machine's own DATA_DIR and OUTPUTS_DIR."""
    return settings.model_copy(update={"data_dir": host / "data", "outputs_dir": outputs})


@pytest.fixture
def api_host(settings: Settings, tmp_path: Path) -> Iterator[Stack]:
    """The first machine: the API (and its reconciler); the shared folder will be mounted at mnt/renders."""
    stack = Stack(on_host(settings, tmp_path / "api-host", tmp_path / "api-host" / "mnt" / "renders"))
    try:
        stack.start(worker=False)
        yield stack
    finally:
        stop_every_process(stack)


@pytest.fixture
def worker_host(settings: Settings, tmp_path: Path) -> Iterator[Stack]:
    """The other machine: one worker, its own data folder, the shared folder at shared/outputs."""
    stack = Stack(on_host(settings, tmp_path / "gpu-host", tmp_path / "gpu-host" / "shared" / "outputs"))
    try:
        stack.logs_dir.mkdir(parents=True)
        stack.spawn("worker", worker_command(stack.settings, "gpu-host"))
        stack.wait_worker_ready("worker", timeout=300)
        yield stack
    finally:
        stop_every_process(stack)


def stop_every_process(stack: Stack) -> None:
    """The stack's own stop (SIGTERM, then SIGKILL), then a kill of any process it did not name."""
    started = list(stack.processes.values())
    stack.stop()
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def stored_result_paths(settings: Settings, job_ids: list[str]) -> dict[str, str]:
    """Each job's result_path as the worker recorded it, straight from SQL."""
    engine = create_engine(settings.resolved_database_url())
    try:
        with engine.connect() as connection:
            rows = connection.execute(select(Job.id, Job.result_path).where(Job.id.in_(job_ids))).all()
    finally:
        engine.dispose()
    return {row.id: row.result_path for row in rows}


def test_the_api_serves_what_a_worker_on_another_machine_wrote(api_host: Stack, worker_host: Stack) -> None:
    """Images, thumbnails and the zip come from the API's mount of the folder the worker wrote to."""
    http = httpx.Client(base_url=api_host.settings.resolved_api_url(), timeout=30)
    body = {"prompts": PROMPTS, "width": 64, "height": 64, "steps": 2, "seed": 5}
    created = http.post("/v1/batches", json=body)
    assert created.status_code == 201, created.text
    batch_id, job_ids = created.json()["id"], created.json()["job_ids"]
    summary = wait_for_batch(http, batch_id)
    assert summary["status"] == "succeeded", summary
    stop_every_process(worker_host)  # the other machine may go away: its images stay on the share

    written = worker_host.settings.resolved_outputs_dir()
    stored = stored_result_paths(api_host.settings, job_ids)
    assert all(not Path(path).is_absolute() and path.startswith(f"{batch_id}/") for path in stored.values())
    images = {job_id: (written / path).read_bytes() for job_id, path in stored.items()}

    mounted = api_host.settings.resolved_outputs_dir()
    assert not mounted.exists()
    mounted.parent.mkdir(parents=True)
    os.rename(written, mounted)  # the share, as the API's machine mounts it
    assert not written.exists()

    for job_id in job_ids:
        assert_image_and_thumbnail(http, job_id, images[job_id])
    assert_archive(http, batch_id, images)
    assert (mounted / ".thumbnails").is_dir()  # cached on the share, beside the images


def assert_image_and_thumbnail(http: httpx.Client, job_id: str, png: bytes) -> None:
    """The API serves the worker's PNG byte for byte, and a WebP thumbnail of it."""
    image = http.get(f"/v1/jobs/{job_id}/image")
    assert image.status_code == 200, image.text
    assert image.content == png
    thumbnail = http.get(f"/v1/jobs/{job_id}/thumbnail")
    assert thumbnail.status_code == 200, thumbnail.text
    assert thumbnail.headers["content-type"] == "image/webp"
    with Image.open(io.BytesIO(thumbnail.content)) as small:
        assert (small.format, small.size) == ("WEBP", (64, 64))  # never enlarged


def assert_archive(http: httpx.Client, batch_id: str, images: dict[str, bytes]) -> None:
    """The batch's zip holds every image, as written, and a manifest naming each file."""
    response = http.get(f"/v1/batches/{batch_id}/archive")
    assert response.status_code == 200, response.text
    assert response.headers["X-Archive-Estimated-Bytes"] == str(sum(len(png) for png in images.values()))
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        assert archive.testzip() is None
        manifest = json.loads(archive.read("manifest.json"))["jobs"]
        files = {job["id"]: archive.read(job["file"]) for job in manifest if job["file"]}
    assert files == images
