"""The API under several uvicorn worker processes: all of them serve, and stopping the stack stops all."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import psutil
import pytest

from cli.stack import Stack
from jobs.settings import Settings
from tests.conftest import BACKENDS

pytestmark = pytest.mark.e2e


@pytest.fixture
def two_workers(settings: Settings) -> Iterator[Stack]:
    """The API alone, as a real uvicorn with two worker processes."""
    running = Stack(settings.model_copy(update={"api_workers": 2}))
    try:
        running.start(worker=False)
        yield running
    finally:
        running.stop()


@pytest.mark.parametrize("empty_database_url", BACKENDS, indirect=True)
def test_two_api_processes_serve_one_queue(two_workers: Stack, settings: Settings) -> None:
    supervisor = psutil.Process(two_workers.processes["api"].pid)
    servers = [p for p in supervisor.children(recursive=True) if "spawn_main" in " ".join(p.cmdline())]
    assert len(servers) == 2, [p.cmdline() for p in supervisor.children(recursive=True)]
    with httpx.Client(base_url=settings.resolved_api_url(), timeout=30) as http:
        created = http.post("/v1/batches", json={"prompts": ["a", "b"], "sizes": ["64x64"]})
        assert created.status_code == 201, created.text
        batch_id = created.json()["id"]
        # Whichever process answers, it reads the same rows.
        answers = {http.get(f"/v1/batches/{batch_id}").json()["counts"]["queued"] for _ in range(20)}
    assert answers == {2}
    children = supervisor.children(recursive=True)
    two_workers.stop()
    # The resource tracker exits right after its parent; give it a moment, then nothing may be left.
    _, alive = psutil.wait_procs(children, timeout=10)
    assert alive == []
