"""Status answers kept for up to a second, so a crowd of pollers costs one computation a second per item.

A batch's summary is four aggregate queries over its jobs; at 200 polls a second on a busy 2-core
machine that was enough to fall behind. Each entry keeps its owner, so a cached answer is still only
given to its owner. A cancel, retry or pause through this process empties the cache (actions are rare
next to polls, and the client that acted sees its change at once); other API processes, and the
worker's progress, show within `API_STATUS_CACHE_S`.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MAX_ENTRIES = 10_000


@dataclass(frozen=True)
class CachedView:
    """One answer, whose owner it is, and until when it may be given."""

    owner: str
    view: dict[str, Any]
    expires_at: float


class StatusCache:
    """Recent job and batch views by (kind, id), least recently stored dropped first past MAX_ENTRIES."""

    def __init__(self, max_age_s: float) -> None:
        self.max_age_s = max_age_s
        self._views: OrderedDict[tuple[str, str], CachedView] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, kind: str, item_id: str) -> CachedView | None:
        """The fresh answer for this item, if any."""
        with self._lock:
            cached = self._views.get((kind, item_id))
        if cached is None or cached.expires_at < time.monotonic():
            return None
        return cached

    def put(self, kind: str, item_id: str, owner: str, view: dict[str, Any]) -> dict[str, Any]:
        """Keep an answer (when caching is on) and return it."""
        if self.max_age_s > 0:
            entry = CachedView(owner=owner, view=view, expires_at=time.monotonic() + self.max_age_s)
            with self._lock:
                self._views[(kind, item_id)] = entry
                self._views.move_to_end((kind, item_id))
                while len(self._views) > MAX_ENTRIES:
                    self._views.popitem(last=False)
        return view

    def clear(self) -> None:
        """Forget every answer: a change through this process may have made any of them stale."""
        with self._lock:
            self._views.clear()

    def view_or(
        self, kind: str, item_id: str, owner: str, compute: Callable[[], tuple[str, dict[str, Any]]]
    ) -> dict[str, Any] | None:
        """The cached answer if it is the caller's, None if it is someone else's, else compute and keep.

        `compute` returns (owner, view) and raises the 404 itself for an unknown id.
        """
        cached = self.get(kind, item_id)
        if cached is not None:
            return cached.view if cached.owner == owner else None
        found_owner, view = compute()
        self.put(kind, item_id, found_owner, view)
        return view if found_owner == owner else None
