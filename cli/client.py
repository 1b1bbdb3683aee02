"""A small HTTP client of the nightrender API, used by the CLI."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from jobs.settings import Settings


class ApiError(RuntimeError):
    """The API refused a request; the message carries its reason."""


class ApiUnreachable(ApiError):
    """No API answers at the configured address (not started, or another address)."""


class _ApiHttp(httpx.Client):
    """httpx, with a connection failure turned into one line that says what to do."""

    def send(self, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        """Send, or raise ApiUnreachable naming the address and the fixes."""
        try:
            return super().send(request, **kwargs)
        except httpx.TransportError as error:
            raise ApiUnreachable(
                f"no nightrender API answers at {self.base_url} ({error or type(error).__name__}): start one "
                "with `nightrender up`, or point --api-url (API_URL) at a running one"
            ) from None


class Client:
    """Wraps the endpoints the CLI needs."""

    def __init__(self, base_url: str, timeout: float = 60.0, api_key: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = _ApiHttp(base_url=base_url, timeout=timeout, headers=headers)

    @classmethod
    def for_settings(cls, settings: Settings) -> Client:
        """A client of the configured API, sending API_KEY when one is set."""
        return cls(settings.resolved_api_url(), api_key=settings.api_key)

    def healthy(self) -> bool:
        """Whether the API answers /healthz with 200."""
        try:
            return self.http.get("/healthz", timeout=2.0).status_code == 200
        except (ApiUnreachable, httpx.HTTPError):
            return False

    def submit_file(
        self, path: Path, fields: dict[str, str], idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Upload a prompt file as a batch (the same Idempotency-Key returns the same batch)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        with path.open("rb") as stream:
            response = self.http.post(
                "/v1/batches", files={"file": (path.name, stream)}, data=fields, headers=headers
            )
        return _json(response)

    def batch(self, batch_id: str) -> dict[str, Any]:
        """A batch's summary."""
        return _json(self.http.get(f"/v1/batches/{batch_id}"))

    def post(self, path: str) -> dict[str, Any]:
        """POST an action (cancel, retry, pause, resume); an empty JSON body, as the API requires."""
        return _json(self.http.post(path, json={}))

    def stats(self) -> dict[str, Any]:
        """The memory-by-resolution table."""
        return _json(self.http.get("/v1/stats"))

    def job(self, job_id: str) -> dict[str, Any]:
        """One job's status."""
        return _json(self.http.get(f"/v1/jobs/{job_id}"))

    def batches(self, limit: int, cursor: str | None = None) -> dict[str, Any]:
        """One page of batches, newest first."""
        params: dict[str, Any] = {"limit": limit, **({"cursor": cursor} if cursor else {})}
        return _json(self.http.get("/v1/batches", params=params))

    def batch_jobs(self, batch_id: str, limit: int = 1000, cursor: str | None = None) -> dict[str, Any]:
        """One page of a batch's jobs, in submission order, each with its error."""
        params: dict[str, Any] = {"limit": limit, **({"cursor": cursor} if cursor else {})}
        return _json(self.http.get(f"/v1/batches/{batch_id}/jobs", params=params))

    def jobs_where(self, batch_id: str, status: str) -> Iterator[dict[str, Any]]:
        """The batch's jobs in this status, page after page."""
        cursor = None
        while True:
            page = self.batch_jobs(batch_id, cursor=cursor)
            yield from (job for job in page["jobs"] if job["status"] == status)
            cursor = page["next_cursor"]
            if cursor is None:
                return

    def queue(self) -> dict[str, Any]:
        """Whether the queue is paused, and how many jobs wait and run."""
        return _json(self.http.get("/v1/queue"))

    @contextmanager
    def archive(self, batch_id: str) -> Iterator[httpx.Response]:
        """The batch's zip as a streamed response; raises ApiError before any byte if the API refuses."""
        with self.http.stream("GET", f"/v1/batches/{batch_id}/archive") as response:
            if response.status_code != 200:
                response.read()
                _json(response)
            yield response


def _json(response: httpx.Response) -> dict[str, Any]:
    if response.status_code >= 400:
        raise ApiError(
            f"{response.request.method} {response.request.url.path} -> "
            f"{response.status_code}: {_reason(response)}"
        )
    return response.json()  # type: ignore[no-any-return]


def _reason(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except ValueError:
        return response.text[:500]
    if isinstance(detail, list):
        return "; ".join(f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg')}" for d in detail)
    return str(detail)
