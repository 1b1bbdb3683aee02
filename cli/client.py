"""A small HTTP client of the nightrender API, used by the CLI."""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from jobs.settings import Settings


class ApiError(RuntimeError):
    """The API refused a request; the message carries its reason."""


class Client:
    """Wraps the endpoints the CLI needs."""

    def __init__(self, base_url: str, timeout: float = 60.0, api_key: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url, timeout=timeout, headers=headers)

    @classmethod
    def for_settings(cls, settings: Settings) -> Client:
        """A client of the configured API, sending API_KEY when one is set."""
        return cls(settings.resolved_api_url(), api_key=settings.api_key)

    def healthy(self) -> bool:
        """Whether the API answers /healthz with 200."""
        try:
            return self.http.get("/healthz", timeout=2.0).status_code == 200
        except httpx.HTTPError:
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

    def download_archive(self, batch_id: str, out_dir: Path, on_bytes: Callable[[int], None]) -> Path:
        """Stream the batch's zip to disk, then unpack it into out_dir; returns the manifest's path."""
        out_dir.mkdir(parents=True, exist_ok=True)
        archive = out_dir / f".batch-{batch_id}.zip"
        with self.http.stream("GET", f"/v1/batches/{batch_id}/archive") as response:
            if response.status_code != 200:
                response.read()
                _json(response)
            with archive.open("wb") as stream:
                for chunk in response.iter_bytes():
                    stream.write(chunk)
                    on_bytes(len(chunk))
        with zipfile.ZipFile(archive) as opened:
            opened.extractall(out_dir)
        archive.unlink()
        return out_dir / "manifest.json"


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
