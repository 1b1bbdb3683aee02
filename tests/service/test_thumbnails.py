"""Gallery thumbnails through the real app on both backends: small, made once, owner-checked, cached."""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from jobs import thumbnails
from jobs.db import make_database, make_session_factory, transaction
from jobs.keys import add_key
from jobs.lifecycle import claim_job, finish_job
from jobs.params import GenerationParams
from jobs.results import stored_result_path
from jobs.settings import Settings
from jobs.submit import insert_job
from jobs.tables import Job
from tests.conftest import BACKENDS, local_client

pytestmark = pytest.mark.parametrize("empty_database_url", BACKENDS, indirect=True)

SMALL = {"width": 64, "height": 64, "steps": 2, "model": "synthetic:tiny"}


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    """A plain engine on the test's database."""
    engine = make_database(settings.resolved_database_url())
    yield engine
    engine.dispose()


def noise_png(path: Path, width: int, height: int) -> int:
    """A PNG of random pixels (it hardly compresses, like a photo); returns its size in bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.frombytes("RGB", (width, height), os.urandom(width * height * 3)).save(path, format="PNG")
    return path.stat().st_size


def finish_with_image(engine: Engine, job_id: str, image: Path, outputs: Path) -> None:
    """Claim the job and finish it with `image`, stored relative to `outputs` as the writer does."""
    finish_with_result_path(engine, job_id, stored_result_path(outputs, image))


def finish_with_result_path(engine: Engine, job_id: str, result_path: str) -> None:
    """Claim the job and finish it with `result_path` recorded as it is."""
    with transaction(make_session_factory(engine)) as session:
        claim = claim_job(session, job_id=job_id)
        assert claim is not None
        stats = {"rung": "resident", "device_name": "cpu", "torch_version": "2", "diffusers_version": "0"}
        assert finish_job(
            session, job_id=job_id, lease_token=claim.lease_token, result_path=result_path, stats=stats
        )


def queued_job(engine: Engine) -> str:
    """One queued job of the keyless local owner."""
    params = GenerationParams(prompt="a red fox", seed=1, **SMALL)
    with transaction(make_session_factory(engine)) as session:
        return insert_job(session, params=params, priority=0, max_attempts=3).job_ids[0]


def test_a_thumbnail_is_small_made_once_and_revalidated(
    api_client: TestClient, settings: Settings, engine: Engine
) -> None:
    job_id = queued_job(engine)
    image = settings.resolved_outputs_dir() / "batch" / "00000-1-a-red-fox.png"
    png_bytes = noise_png(image, 640, 400)
    finish_with_image(engine, job_id, image, settings.resolved_outputs_dir())

    first = api_client.get(f"/v1/jobs/{job_id}/thumbnail")
    assert first.status_code == 200, first.text
    assert first.headers["content-type"] == "image/webp"
    assert first.headers["cache-control"] == "private, max-age=86400"
    with Image.open(io.BytesIO(first.content)) as thumb:
        assert (thumb.format, thumb.size) == ("WEBP", (256, 160))  # the long side, the aspect kept
    assert len(first.content) * 10 < png_bytes, (len(first.content), png_bytes)

    cached = settings.resolved_outputs_dir() / ".thumbnails" / f"{job_id}.webp"
    before = cached.stat()
    second = api_client.get(f"/v1/jobs/{job_id}/thumbnail")
    assert second.content == first.content and second.headers["etag"] == first.headers["etag"]
    after = cached.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # not written again

    etag = first.headers["etag"]
    revalidated = api_client.get(f"/v1/jobs/{job_id}/thumbnail", headers={"If-None-Match": etag})
    assert (revalidated.status_code, revalidated.content) == (304, b"")

    image.unlink()  # the image is gone: its thumbnail is not served on its own
    assert api_client.get(f"/v1/jobs/{job_id}/thumbnail").status_code == 410


def test_concurrent_first_requests_leave_one_whole_file(settings: Settings, engine: Engine) -> None:
    job_id = queued_job(engine)
    image = settings.resolved_outputs_dir() / "single" / "1-a-red-fox.png"
    noise_png(image, 1024, 1024)
    finish_with_image(engine, job_id, image, settings.resolved_outputs_dir())
    with Session(engine) as session:
        job = session.get_one(Job, job_id)
    start = threading.Barrier(6)

    def first_request() -> str:
        start.wait()
        return thumbnails.thumbnail_of(job, settings.resolved_outputs_dir()).etag

    with ThreadPoolExecutor(6) as pool:
        etags = list(pool.map(lambda _: first_request(), range(6)))
    folder = settings.resolved_outputs_dir() / ".thumbnails"
    assert sorted(p.name for p in folder.iterdir()) == [f"{job_id}.webp"]  # no temporary file left
    assert len(set(etags)) == 1  # every request served the file that won
    with Image.open(folder / f"{job_id}.webp") as thumb:
        thumb.load()  # the whole file decodes
        assert thumb.size == (256, 256)


def test_a_read_only_outputs_folder_still_gets_thumbnails(
    api_client: TestClient, settings: Settings, engine: Engine
) -> None:
    """The API's container may mount the outputs read-only: the thumbnail is then made per request."""
    job_id = queued_job(engine)
    image = settings.resolved_outputs_dir() / "single" / "1-a-red-fox.png"
    noise_png(image, 512, 512)
    finish_with_image(engine, job_id, image, settings.resolved_outputs_dir())
    (settings.resolved_outputs_dir() / ".thumbnails").write_text("not a folder")  # nothing can be stored
    answer = api_client.get(f"/v1/jobs/{job_id}/thumbnail")
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/webp"
    with Image.open(io.BytesIO(answer.content)) as thumb:
        assert thumb.size == (256, 256)
    again = api_client.get(f"/v1/jobs/{job_id}/thumbnail", headers={"If-None-Match": answer.headers["etag"]})
    assert again.status_code == 304


def test_only_the_owner_gets_a_thumbnail_and_only_of_an_image(settings: Settings, engine: Engine) -> None:
    with transaction(make_session_factory(engine)) as session:
        alice, bob = add_key(session, name="alice"), add_key(session, name="bob")
    with local_client(create_app_for(settings)) as api:
        as_alice, as_bob = {"Authorization": f"Bearer {alice}"}, {"Authorization": f"Bearer {bob}"}
        created = api.post("/v1/jobs", json={"prompt": "a red fox", **SMALL}, headers=as_alice)
        job_id = created.json()["id"]
        queued = api.get(f"/v1/jobs/{job_id}/thumbnail", headers=as_alice)
        assert queued.status_code == 409 and "has no image: it is queued" in queued.json()["detail"]

        image = settings.resolved_outputs_dir() / "single" / "1-a-red-fox.png"
        noise_png(image, 256, 256)
        finish_with_image(engine, job_id, image, settings.resolved_outputs_dir())
        assert api.get(f"/v1/jobs/{job_id}/thumbnail", headers=as_bob).status_code == 404
        assert api.get(f"/v1/jobs/{job_id}/thumbnail").status_code == 401
        assert not (settings.resolved_outputs_dir() / ".thumbnails").exists()  # nothing made for them
        assert api.get(f"/v1/jobs/{job_id}/thumbnail", headers=as_alice).status_code == 200


def test_an_old_absolute_row_is_served_and_a_path_out_of_outputs_is_not(
    api_client: TestClient, settings: Settings, engine: Engine, tmp_path: Path
) -> None:
    """An old absolute row still works; `..` or an outside path is refused, though the file is there."""
    outputs = settings.resolved_outputs_dir()
    inside, elsewhere = outputs / "single" / "1-a-red-fox.png", tmp_path / "elsewhere.png"
    noise_png(inside, 64, 64)
    noise_png(elsewhere, 64, 64)
    cases = {str(inside): 200, "single/../../elsewhere.png": 410, str(elsewhere): 410}
    for result_path, expected in cases.items():
        job_id = queued_job(engine)
        finish_with_result_path(engine, job_id, result_path)
        image = api_client.get(f"/v1/jobs/{job_id}/image")
        assert image.status_code == expected, (result_path, image.text)
        assert api_client.get(f"/v1/jobs/{job_id}/thumbnail").status_code == expected, result_path
        if expected == 200:
            assert image.content == inside.read_bytes()


def create_app_for(settings: Settings) -> object:
    """The real app without its reconciler thread."""
    from api.app import create_app

    return create_app(settings, reconcile=False)
