"""End to end over real HTTP: a real uvicorn server and a real Celery worker process on synthetic:tiny."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image
from sqlalchemy import create_engine, func, select

from cli.stack import Stack
from jobs.settings import Settings
from jobs.tables import JobStats
from tests.a1111_reader import read_infotext
from tests.conftest import BACKENDS

pytestmark = pytest.mark.e2e
SIZES = [(64, 64), (96, 64)]
PROMPTS = [f"test prompt number {i}: a lighthouse, a cat, a neon street" for i in range(20)]


@pytest.fixture
def stack(settings: Settings) -> Iterator[Stack]:
    """The API and one worker as real processes against this test's database and queue."""
    running = Stack(settings)
    try:
        running.start()
        yield running
    finally:
        running.stop()


def wait_for_batch(http: httpx.Client, batch_id: str, timeout: float = 240.0) -> dict[str, Any]:
    """Poll the cheap status endpoint until every job has finished."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        summary = http.get(f"/v1/batches/{batch_id}").json()
        if summary["status"] not in ("queued", "running"):
            return summary
        time.sleep(0.3)
    raise AssertionError(f"batch {batch_id} did not finish: {summary}")


@pytest.mark.parametrize("empty_database_url", BACKENDS, indirect=True)
def test_batch_renders_end_to_end(stack: Stack, settings: Settings) -> None:
    """Submit 20 prompts at two sizes, poll, download every PNG, and find stats for every job."""
    http = httpx.Client(base_url=settings.resolved_api_url(), timeout=30)
    body = {"prompts": PROMPTS, "sizes": [f"{w}x{h}" for w, h in SIZES], "steps": 2, "seed": 7}
    created = http.post("/v1/batches", json=body)
    assert created.status_code == 201, created.text
    job_ids = created.json()["job_ids"]
    assert len(job_ids) == len(PROMPTS) * len(SIZES)

    summary = wait_for_batch(http, created.json()["id"])
    assert summary["status"] == "succeeded", summary
    assert summary["counts"]["succeeded"] == len(job_ids)
    assert summary["progress"] == 1.0

    for index, job_id in enumerate(job_ids):
        check_job_and_image(http, job_id, PROMPTS[index // len(SIZES)], SIZES[index % len(SIZES)])
    assert stats_rows(settings) == len(job_ids)
    plans = [http.get(f"/v1/jobs/{job_id}").json()["memory"]["plan"] or {} for job_id in job_ids]
    groups = [plan.get("notes", {}).get("group", 1) for plan in plans]
    assert max(groups) > 1, "queued jobs should share text-encoder passes"
    # The worker loads its pipeline once, at start: no job's stats carry load time.
    memories = [http.get(f"/v1/jobs/{job_id}").json()["memory"] for job_id in job_ids]
    assert [memory["load_s"] for memory in memories] == [0.0] * len(job_ids), "a job paid for a load"


def check_job_and_image(http: httpx.Client, job_id: str, prompt: str, size: tuple[int, int]) -> None:
    """The job reports success with memory stats, and its PNG has the right size and metadata."""
    job = http.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded"
    assert job["progress"] == {"step": 2, "total": 2}
    assert job["memory"]["device_name"] == "cpu"
    assert job["memory"]["denoise_s"] > 0
    assert job["memory"]["host_rss_bytes"] > 0
    response = http.get(f"/v1/jobs/{job_id}/image")
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    assert image.size == size
    read = read_infotext(image.text["parameters"])  # A1111's format, which other tools read
    assert (read["prompt"], read["negative_prompt"], read["seed"], read["steps"]) == (prompt, "", 7, 2)
    assert read["size"] == size and read["fields"]["Model"] == "synthetic:tiny"
    ours = json.loads(image.text["nightrender"])
    assert ours["job_id"] == job_id and ours["params"]["steps"] == 2


def stats_rows(settings: Settings) -> int:
    """job_stats rows, counted straight from SQL."""
    engine = create_engine(settings.resolved_database_url())
    try:
        with engine.connect() as connection:
            return int(connection.execute(select(func.count()).select_from(JobStats)).scalar_one())
    finally:
        engine.dispose()


@pytest.mark.parametrize("empty_database_url", ["postgres"], indirect=True)
def test_same_seed_same_image_and_archive(stack: Stack, settings: Settings) -> None:
    """Two jobs with the same parameters give the same pixels; the archive holds images and a manifest."""
    http = httpx.Client(base_url=settings.resolved_api_url(), timeout=30)
    body = {"prompts": ["same prompt", "same prompt"], "width": 64, "height": 64, "steps": 2, "seed": 3}
    created = http.post("/v1/batches", json=body).json()
    assert wait_for_batch(http, created["id"])["status"] == "succeeded"
    first, second = (http.get(f"/v1/jobs/{j}/image").content for j in created["job_ids"])
    assert Image.open(io.BytesIO(first)).tobytes() == Image.open(io.BytesIO(second)).tobytes()

    archive = http.get(f"/v1/batches/{created['id']}/archive")
    assert archive.status_code == 200
    import zipfile

    with zipfile.ZipFile(io.BytesIO(archive.content)) as opened:
        names = set(opened.namelist())
        manifest = json.loads(opened.read("manifest.json"))
        sizes = [opened.getinfo(name).file_size for name in names if name.endswith(".png")]
        texts = [Image.open(io.BytesIO(opened.read(job["file"]))).text for job in manifest["jobs"]]
    assert len(names) == 3
    assert [job["id"] for job in manifest["jobs"]] == created["job_ids"]
    assert all(job["file"] in names and job["memory"] for job in manifest["jobs"])
    # Readable names, one per job although both jobs have the same prompt and seed.
    assert [job["file"] for job in manifest["jobs"]] == ["00000-3-same-prompt.png", "00001-3-same-prompt.png"]
    assert archive.headers["X-Archive-Estimated-Bytes"] == str(sum(sizes))
    for job_id, text in zip(created["job_ids"], texts, strict=True):
        assert read_infotext(text["parameters"])["prompt"] == "same prompt"
        assert json.loads(text["nightrender"])["job_id"] == job_id
    on_disk = sorted(path.name for path in (settings.resolved_outputs_dir() / created["id"]).iterdir())
    stems = [name.rsplit("-", 1)[0] for name in on_disk]  # less the attempt's lease, kept on disk
    assert stems == ["00000-3-same-prompt", "00001-3-same-prompt"]
    stats = http.get("/v1/stats").json()["rows"]
    assert stats[0]["width"] == 64 and stats[0]["jobs"] == 2
