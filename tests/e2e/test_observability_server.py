"""The API as real uvicorn processes: JSON log lines with no doubled access log, and metrics merged
across worker processes with PROMETHEUS_MULTIPROC_DIR.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from cli.stack import Stack
from jobs.settings import Settings

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("empty_database_url", ["sqlite"], indirect=True)]
WORKERS = 2
MAX_REQUESTS = 400


def test_every_log_line_is_json_and_one_access_line_per_request(api_only: Stack, settings: Settings) -> None:
    """uvicorn's own lines are JSON too, and its access log does not double ours."""
    response = httpx.get(settings.resolved_api_url() + "/no-such-page", headers={"X-Request-ID": "e2e-log-1"})
    assert response.headers["X-Request-ID"] == "e2e-log-1"
    api_only.stop()
    lines = [json.loads(line) for line in api_only.log_tail("api", 500).splitlines() if line.strip()]
    assert any(line["logger"] == "uvicorn.error" for line in lines)
    mentions = [line for line in lines if "no-such-page" in line["message"]]
    assert len(mentions) == 1, mentions
    assert mentions[0]["request_id"] == "e2e-log-1"
    assert (mentions[0]["logger"], mentions[0]["status"]) == ("api.access", 404)


@pytest.fixture
def two_workers(settings: Settings, tmp_path: Path) -> Iterator[tuple[Stack, Path]]:
    """The API under uvicorn with two worker processes sharing a metrics folder."""
    folder = tmp_path / "prometheus"
    folder.mkdir()
    shared = settings.model_copy(update={"prometheus_multiproc_dir": folder, "api_workers": WORKERS})
    running = Stack(shared)  # exports PROMETHEUS_MULTIPROC_DIR to the processes it starts
    try:
        running.start(worker=False)
        yield running, folder
    finally:
        running.stop()


def latency_count(families: Iterable[Metric], route: str) -> float:
    """Requests counted for a route, over every status."""
    return sum(
        sample.value
        for family in families
        for sample in family.samples
        if sample.name == "nightrender_http_request_duration_seconds_count"
        and sample.labels["route"] == route
    )


def livez_served_per_process(folder: Path) -> list[float]:
    """How many /livez requests each worker process has recorded in its own file."""
    files = sorted(folder.glob("histogram_*.db"))
    return [latency_count(MultiProcessCollector.merge([str(f)], accumulate=True), "/livez") for f in files]


def both_served(counts: list[float]) -> bool:
    """Every worker process has answered /livez at least once."""
    return len(counts) == WORKERS and all(counts)


def gauge(text: str, name: str) -> float:
    """A label-less gauge's value in one scrape."""
    families = {family.name: family for family in text_string_to_metric_families(text)}
    return families[name].samples[0].value


def test_metrics_are_merged_across_worker_processes(
    two_workers: tuple[Stack, Path], settings: Settings
) -> None:
    """Every scrape counts every worker's requests, whichever worker answers it; pools are summed."""
    stack, folder = two_workers
    url = settings.resolved_api_url()
    sent = 0
    # Fresh connections spread over the workers; go on until each has served some (each has its file).
    while not both_served(livez_served_per_process(folder)) and sent < MAX_REQUESTS:
        assert httpx.get(url + "/livez", headers={"Connection": "close"}).status_code == 200
        sent += 1
    per_process = livez_served_per_process(folder)
    assert both_served(per_process), per_process
    for _ in range(4):
        scrape = httpx.get(url + "/metrics", headers={"Connection": "close"}).text
        assert latency_count(text_string_to_metric_families(scrape), "/livez") == sent == sum(per_process)
        assert gauge(scrape, "nightrender_db_pool_size") == WORKERS * (settings.api_threads + 2)
        assert gauge(scrape, "nightrender_metrics_database_up") == 1
    stack.stop()
    # Each worker dropped its live gauges on the way out; its counters stay, as Prometheus expects.
    assert list(folder.glob("gauge_livesum_*.db")) == []
