"""The reconciler's lease: among several API processes one leads, and another takes over when it goes."""

from __future__ import annotations

import uuid

from jobs.leader import Leadership
from tests.conftest import REDIS_URL


def test_one_process_leads_until_it_lets_go() -> None:
    name = f"nr-test-{uuid.uuid4().hex[:10]}:reconciler-leader"
    first, second = Leadership(REDIS_URL, name, ttl_s=30), Leadership(REDIS_URL, name, ttl_s=30)
    try:
        assert first.hold() is True
        assert second.hold() is False
        assert first.hold() is True  # renewing its own lease
        first.release()
        assert second.hold() is True
        assert Leadership(REDIS_URL, name, ttl_s=30).hold() is False
    finally:
        second.release()


def test_an_unreachable_redis_does_not_stop_the_pass() -> None:
    lonely = Leadership("redis://127.0.0.1:1/0", "nowhere", ttl_s=1)
    assert lonely.hold() is True
    lonely.release()
