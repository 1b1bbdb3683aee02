"""The batch archive, streamed while it is built, over a real database (PostgreSQL and SQLite).

Before, the whole zip was built in a temporary file before the first byte, and every queued job of
the batch cost a queue-position COUNT: a 10,000-job archive took over a minute to start.
"""

from __future__ import annotations

import io
import json
import random
import zipfile
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from rich.console import Console
from sqlalchemy import Engine, event, select, update
from sqlalchemy.orm import Session, sessionmaker

from api.app import create_app
from api.archive import ESTIMATED_BYTES_HEADER, stream_archive
from cli.client import Client
from cli.downloads import download_batch
from cli.stack import Stack
from jobs.db import transaction
from jobs.lifecycle import claim_job, fail_job, finish_job, retry_jobs
from jobs.params import GenerationParams
from jobs.results import stored_result_path
from jobs.settings import Settings
from jobs.submit import insert_batch
from jobs.tables import Job
from tests.conftest import BACKENDS

pytestmark = pytest.mark.parametrize("empty_database_url", BACKENDS, indirect=True)

PARAMS = GenerationParams(prompt="a red fox", width=64, height=64, steps=2, seed=1, model="synthetic:tiny")
STATS = {
    "peak_allocated_bytes": 1000,
    "peak_reserved_bytes": 2000,
    "rung": "none",
    "device_name": "test-device",
    "torch_version": "2.x",
    "diffusers_version": "0.x",
}


def write_png(path: Path, seed: int, side: int = 32) -> bytes:
    """A small noise PNG (noise, so it does not compress to nothing); returns its bytes."""
    rng = random.Random(seed)
    image = Image.frombytes("RGB", (side, side), bytes(rng.randrange(256) for _ in range(side * side * 3)))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path.read_bytes()


def make_batch(
    factory: sessionmaker[Session], outputs: Path, *, succeeded: int, queued: int = 0, failed: int = 0
) -> tuple[str, dict[str, bytes]]:
    """A batch whose first jobs succeeded (PNG on disk), then failed ones, then queued ones.

    Returns the batch id and each succeeded job's PNG bytes by job id.
    """
    with transaction(factory) as session:
        submission = insert_batch(
            session, params=[PARAMS] * (succeeded + failed + queued), priority=0, max_attempts=3
        )
    images: dict[str, bytes] = {}
    with transaction(factory) as session:
        for index, job_id in enumerate(submission.job_ids[: succeeded + failed]):
            claim = claim_job(session, job_id=job_id)
            assert claim is not None
            if index >= succeeded:
                fail_job(session, job_id=job_id, lease_token=claim.lease_token, error="boom", stats=None)
                continue
            path = outputs / f"{job_id}.png"
            images[job_id] = write_png(path, index)
            stored = stored_result_path(outputs, path)  # relative to OUTPUTS_DIR, as the writer stores it
            finish_job(session, job_id=job_id, lease_token=claim.lease_token, result_path=stored, stats=STATS)
    assert submission.batch_id is not None
    return submission.batch_id, images


def open_zip(data: bytes) -> zipfile.ZipFile:
    """The archive, checked whole (every CRC) before the test reads it."""
    archive = zipfile.ZipFile(io.BytesIO(data))
    assert archive.testzip() is None
    return archive


def test_streamed_zip_holds_every_image_and_a_manifest_of_every_job(
    api_client: TestClient, factory: sessionmaker[Session], settings: Settings
) -> None:
    """A valid zip: each PNG stored as written, and manifest.json, last, lists every job."""
    batch_id, images = make_batch(factory, settings.resolved_outputs_dir(), succeeded=12, failed=2, queued=3)
    response = api_client.get(f"/v1/batches/{batch_id}/archive")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/zip"
    assert f"batch-{batch_id}.zip" in response.headers["content-disposition"]
    archive = open_zip(response.content)
    names = archive.namelist()
    assert names[-1] == "manifest.json"
    manifest = json.loads(archive.read("manifest.json"))
    assert manifest["batch_id"] == batch_id
    jobs = manifest["jobs"]
    assert len(jobs) == 17
    assert {job["id"]: job["file"] for job in jobs if job["file"]}.keys() == images.keys()
    for job in jobs:
        if job["file"]:
            assert archive.read(job["file"]) == images[job["id"]]
            assert archive.getinfo(job["file"]).compress_type == zipfile.ZIP_STORED
            assert job["memory"]["peak_reserved_bytes"] == 2000
    assert [job["status"] for job in jobs] == ["succeeded"] * 12 + ["failed"] * 2 + ["queued"] * 3
    assert [job["queue_position"] for job in jobs[-3:]] == [0, 1, 2]
    assert jobs[12]["error"] == "boom"
    assert len(names) == 13
    assert [job["file"] for job in jobs[:12]] == [f"{index:05d}-1-a-red-fox.png" for index in range(12)]
    assert response.headers[ESTIMATED_BYTES_HEADER] == str(sum(len(data) for data in images.values()))


@pytest.mark.parametrize("jobs", [7, 8, 9])
def test_pages_cover_every_job_once(factory: sessionmaker[Session], settings: Settings, jobs: int) -> None:
    """Pages of 4 over 7, 8 and 9 jobs (short last page, exact end, one over): every job once, in order."""
    outputs = settings.resolved_outputs_dir()
    batch_id, images = make_batch(factory, outputs, succeeded=jobs)
    archive = open_zip(b"".join(stream_archive(factory, batch_id, outputs, page_size=4)))
    manifest = json.loads(archive.read("manifest.json"))["jobs"]
    assert [job["id"] for job in manifest] == list(images)
    assert archive.namelist() == [job["file"] for job in manifest] + ["manifest.json"]


def test_the_first_chunk_leaves_before_the_zip_is_built(
    factory: sessionmaker[Session], settings: Settings
) -> None:
    """The first chunk is the start of the zip, sent before the manifest exists; closing early is clean."""
    outputs = settings.resolved_outputs_dir()
    batch_id, _ = make_batch(factory, outputs, succeeded=40)
    chunks = stream_archive(factory, batch_id, outputs, page_size=10)
    first = next(chunks)
    assert first.startswith(b"PK\x03\x04")
    assert b"manifest.json" not in first
    chunks.close()  # a client that hangs up mid-download


def test_a_missing_image_is_left_out_not_an_error(
    api_client: TestClient, factory: sessionmaker[Session], settings: Settings
) -> None:
    """An image deleted from disk is named in the manifest with no file; the zip stays valid."""
    batch_id, images = make_batch(factory, settings.resolved_outputs_dir(), succeeded=3)
    gone = list(images)[1]
    (settings.resolved_outputs_dir() / f"{gone}.png").unlink()
    response = api_client.get(f"/v1/batches/{batch_id}/archive")
    archive = open_zip(response.content)
    files = {job["id"]: job["file"] for job in json.loads(archive.read("manifest.json"))["jobs"]}
    assert files[gone] is None
    assert len([name for name in files.values() if name]) == 2
    kept = sum(len(data) for job_id, data in images.items() if job_id != gone)
    assert response.headers[ESTIMATED_BYTES_HEADER] == str(kept)


def test_a_retried_job_keeps_its_index_and_names_never_repeat(
    api_client: TestClient, factory: sessionmaker[Session], settings: Settings
) -> None:
    """A retry takes its original's index (the original leaves the archive); a repeated name gets `-2`."""
    outputs = settings.resolved_outputs_dir()
    batch_id, images = make_batch(factory, outputs, succeeded=2, failed=1)
    with transaction(factory) as session:
        failed = session.scalars(select(Job.id).where(Job.batch_id == batch_id, Job.status == "failed")).one()
        retried = retry_jobs(session, job_ids=[failed])[0]
    images[retried] = finish_with_image(factory, retried, outputs, seed=9)
    with transaction(factory) as session:  # two jobs at one index: only a hand-edited row does this
        first = session.scalars(select(Job.id).where(Job.batch_id == batch_id, Job.batch_index == 0)).one()
        session.execute(update(Job).where(Job.id == list(images)[1]).values(batch_index=0))
    response = api_client.get(f"/v1/batches/{batch_id}/archive")
    archive = open_zip(response.content)
    files = {job["id"]: job["file"] for job in json.loads(archive.read("manifest.json"))["jobs"]}
    assert failed not in files
    assert files[retried] == "00002-1-a-red-fox.png"
    moved = list(images)[1]
    assert {files[first], files[moved]} == {"00000-1-a-red-fox.png", "00000-1-a-red-fox-2.png"}
    assert sorted(archive.namelist()) == sorted([*files.values(), "manifest.json"])
    for job_id, name in files.items():
        assert archive.read(name) == images[job_id]
    assert response.headers[ESTIMATED_BYTES_HEADER] == str(sum(len(data) for data in images.values()))


def finish_with_image(factory: sessionmaker[Session], job_id: str, outputs: Path, seed: int) -> bytes:
    """Claim a queued job, write its PNG and finish it, as the worker does; returns the PNG's bytes."""
    with transaction(factory) as session:
        claim = claim_job(session, job_id=job_id)
        assert claim is not None
        path = outputs / f"{job_id}.png"
        data = write_png(path, seed)
        stored = stored_result_path(outputs, path)
        finish_job(session, job_id=job_id, lease_token=claim.lease_token, result_path=stored, stats=STATS)
    return data


def test_old_absolute_rows_are_archived_and_paths_out_of_outputs_are_not(
    api_client: TestClient, factory: sessionmaker[Session], settings: Settings, tmp_path: Path
) -> None:
    """A row from before relative paths (absolute, inside) is archived; `..` or an outside path is not."""
    outputs = settings.resolved_outputs_dir()
    batch_id, images = make_batch(factory, outputs, succeeded=4)
    old, climbing, outside, _ = list(images)
    elsewhere = tmp_path / "elsewhere.png"  # beside the outputs folder, not in it
    write_png(elsewhere, 99)
    rows = {old: str(outputs / f"{old}.png"), climbing: "../elsewhere.png", outside: str(elsewhere)}
    with transaction(factory) as session:
        for job_id, result_path in rows.items():
            session.execute(update(Job).where(Job.id == job_id).values(result_path=result_path))
    response = api_client.get(f"/v1/batches/{batch_id}/archive")
    archive = open_zip(response.content)
    files = {job["id"]: job["file"] for job in json.loads(archive.read("manifest.json"))["jobs"]}
    assert files[climbing] is None and files[outside] is None
    served = {job_id: images[job_id] for job_id in images if job_id not in (climbing, outside)}
    assert {job_id: archive.read(files[job_id]) for job_id in served} == served
    assert response.headers[ESTIMATED_BYTES_HEADER] == str(sum(len(data) for data in served.values()))


def count_archive_statements(settings: Settings, batch_id: str) -> int:
    """SQL statements a fresh API process runs to serve one archive (queue snapshot and keys cold)."""
    app = create_app(settings, reconcile=False)
    engine: Engine = app.state.session_factory.kw["bind"]
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    with TestClient(app, base_url="http://127.0.0.1", client=("127.0.0.1", 50000)) as client:
        response = client.get(f"/v1/batches/{batch_id}/archive")
    assert response.status_code == 200
    open_zip(response.content)
    return len(statements)


def test_the_archive_runs_no_query_per_job(factory: sessionmaker[Session], settings: Settings) -> None:
    """10 and 40 jobs, half queued, cost the same statements (the old code ran a COUNT per queued job).

    Both batches fit the first page; a longer batch adds one query per page of 500 jobs, not per job.
    """
    outputs = settings.resolved_outputs_dir()
    small, _ = make_batch(factory, outputs, succeeded=5, queued=5)
    large, _ = make_batch(factory, outputs, succeeded=20, queued=20)
    counted_small = count_archive_statements(settings, small)
    counted_large = count_archive_statements(settings, large)
    assert counted_large <= counted_small


@pytest.mark.e2e
def test_cli_download_unpacks_the_streamed_archive(
    api_only: Stack, factory: sessionmaker[Session], settings: Settings, tmp_path: Path
) -> None:
    """The CLI's download, over real HTTP from uvicorn, unpacks every image and the manifest."""
    batch_id, images = make_batch(factory, settings.resolved_outputs_dir(), succeeded=6, failed=1)
    downloaded = download_batch(Client(settings.resolved_api_url()), batch_id, tmp_path / "out", Console())
    assert downloaded.folder == tmp_path / "out" / batch_id
    assert len(downloaded.jobs) == 7 and downloaded.images == 6 and downloaded.written == 6
    for job in downloaded.jobs:
        if job["file"]:
            assert (downloaded.folder / job["file"]).read_bytes() == images[job["id"]]
    assert not list(downloaded.folder.glob(".batch-*"))  # the partial zip is gone once unpacked
