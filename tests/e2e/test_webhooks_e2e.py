"""End to end: a real API process sends the webhook on its own loop when a real worker finishes the batch."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Iterator

import httpx
import pytest

from cli.stack import Stack
from jobs.settings import Settings
from tests.conftest import BACKENDS
from tests.service.webhook_receiver import Receiver

pytestmark = pytest.mark.e2e
SECRET = "e2e-webhook-secret-0123456789abcdef"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A webhook receiver on 127.0.0.1."""
    with Receiver() as running:
        yield running


@pytest.fixture
def stack(settings: Settings) -> Iterator[Stack]:
    """The API (with webhooks on, loopback receivers allowed) and one worker as real processes."""
    hooks = {"webhook_secret": SECRET, "webhook_allow_private": True, "webhook_interval_s": 0.5}
    running = Stack(settings.model_copy(update=hooks))
    try:
        running.start()
        yield running
    finally:
        running.stop()


def wait_for_requests(receiver: Receiver, count: int, timeout: float = 240.0) -> None:
    """Wait until the receiver has had `count` requests (a deadline for a hang, not a speed check)."""
    deadline = time.monotonic() + timeout
    while len(receiver.requests) < count and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(receiver.requests) >= count, f"{len(receiver.requests)} webhook requests, wanted {count}"


@pytest.mark.parametrize("empty_database_url", BACKENDS, indirect=True)
def test_the_api_posts_a_signed_summary_when_the_worker_finishes(
    stack: Stack, settings: Settings, receiver: Receiver
) -> None:
    http = httpx.Client(base_url=settings.resolved_api_url(), timeout=30)
    body = {"prompts": ["a lighthouse", "a red fox"], "steps": 2, "width": 64, "height": 64}
    created = http.post("/v1/batches", json={**body, "webhook_url": receiver.url})
    assert created.status_code == 201, created.text
    batch_id = created.json()["id"]

    wait_for_requests(receiver, 1)
    request = receiver.requests[0]
    payload = json.loads(request.body)
    assert (payload["batch_id"], payload["status"], payload["sequence"]) == (batch_id, "succeeded", 1)
    assert payload["counts"]["succeeded"] == 2
    timestamp = request.headers["x-nightrender-timestamp"].encode()
    digest = hmac.new(SECRET.encode(), timestamp + b"." + request.body, hashlib.sha256).hexdigest()
    assert request.headers["x-nightrender-signature"] == f"sha256={digest}"
    # The receiver answers before the API records the outcome: wait for the record too.
    deadline = time.monotonic() + 60
    while (summary := http.get(f"/v1/batches/{batch_id}").json())["webhook"]["status"] == "pending":
        assert time.monotonic() < deadline, summary
        time.sleep(0.2)
    assert summary["status"] == "succeeded"
    assert (summary["webhook"]["status"], summary["webhook"]["attempts"]) == ("delivered", 1)
    assert len(receiver.requests) == 1
