"""Request ids, JSON log lines, liveness and readiness, over a real database and the real Redis."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.observability import MAX_LOGGED_PATH
from api.overload import LoadShedder
from api.routes.system import migration_heads
from jobs import migrate
from jobs.settings import Settings
from tests.conftest import BACKENDS, REDIS_URL, local_client

CLOSED_BROKER = "redis://127.0.0.1:1/0"


def log_lines(captured: str) -> list[dict[str, Any]]:
    """Every line the API logged, each parsed as JSON (a line that is not JSON fails the test)."""
    return [json.loads(line) for line in captured.splitlines() if line.strip()]


def access_lines(lines: list[dict[str, Any]], path: str) -> list[dict[str, Any]]:
    """The access lines for one path."""
    return [line for line in lines if line["logger"] == "api.access" and line["path"] == path]


@pytest.mark.parametrize("empty_database_url", ["sqlite"], indirect=True)
def test_request_id_is_echoed_and_logged_as_json(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """A sane X-Request-ID comes back and is on the request's JSON access line, with its fields."""
    with local_client(
        create_app(settings.model_copy(update={"log_level": "debug"}), reconcile=False)
    ) as client:
        capsys.readouterr()
        response = client.get("/readyz", headers={"X-Request-ID": "req-42.a_b"})
    assert response.headers["X-Request-ID"] == "req-42.a_b"
    [line] = access_lines(log_lines(capsys.readouterr().err), "/readyz")
    assert line["request_id"] == "req-42.a_b"
    assert (line["method"], line["status"], line["level"]) == ("GET", 200, "DEBUG")  # probes log at DEBUG
    assert line["duration_ms"] >= 0
    assert {"time", "message"} <= set(line)


@pytest.mark.parametrize("empty_database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("incoming", ["x" * 65, "two words", "id\nforged: line", ""])
def test_an_odd_request_id_is_replaced(settings: Settings, incoming: str) -> None:
    """Too long, spaced, multi-line or empty ids are not trusted: the request gets a fresh uuid4 hex."""
    with local_client(create_app(settings, reconcile=False)) as client:
        response = client.get("/livez", headers={"X-Request-ID": incoming})
    assert response.headers["X-Request-ID"] != incoming
    assert len(response.headers["X-Request-ID"]) == 32
    int(response.headers["X-Request-ID"], 16)


@pytest.mark.parametrize("empty_database_url", ["sqlite"], indirect=True)
def test_log_lines_inside_a_request_carry_its_id(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """A line logged in the route's worker thread (the metrics scrape failing to read SQL) has the id."""
    broken = settings.model_copy(update={"database_url": f"sqlite:///{settings.data_dir.resolve()}/none.db"})
    with local_client(create_app(broken, reconcile=False)) as client:
        capsys.readouterr()
        client.get("/metrics", headers={"X-Request-ID": "scrape-7"})
    lines = log_lines(capsys.readouterr().err)
    [warning] = [line for line in lines if line["logger"] == "api.queue_metrics"]
    assert warning["request_id"] == "scrape-7"
    assert warning["level"] == "WARNING"
    assert all("request_id" not in line for line in lines if line["logger"] == "httpx2")  # the client's own


@pytest.mark.parametrize("empty_database_url", ["sqlite"], indirect=True)
def test_long_paths_are_cut_in_logs(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    """A 5,000-character path is logged cut to a bound, never whole."""
    with local_client(create_app(settings, reconcile=False)) as client:
        capsys.readouterr()
        assert client.get("/" + "a" * 5000).status_code == 404
    [line] = [line for line in log_lines(capsys.readouterr().err) if line["logger"] == "api.access"]
    assert len(line["path"]) <= MAX_LOGGED_PATH + 3
    assert line["status"] == 404


@pytest.mark.parametrize("empty_database_url", ["sqlite"], indirect=True)
def test_an_unhandled_error_is_a_500_with_the_id(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """A route that raises: the client gets a 500 with its request id; the access line says 500."""
    app = create_app(settings, reconcile=False)

    def explode() -> None:
        raise RuntimeError("boom")

    app.add_api_route("/test-explode", explode)
    with local_client(app, raise_server_exceptions=False) as client:
        capsys.readouterr()
        response = client.get("/test-explode", headers={"X-Request-ID": "err-1"})
    assert response.status_code == 500
    assert response.headers["X-Request-ID"] == "err-1"
    assert response.json()["request_id"] == "err-1"
    [line] = access_lines(log_lines(capsys.readouterr().err), "/test-explode")
    assert (line["status"], line["request_id"]) == (500, "err-1")


@pytest.mark.parametrize("empty_database_url", ["sqlite"], indirect=True)
def test_text_log_format(settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    """LOG_FORMAT=text: plain lines, with the request id in brackets."""
    with local_client(
        create_app(settings.model_copy(update={"log_format": "text"}), reconcile=False)
    ) as client:
        capsys.readouterr()
        client.get("/no-such-page", headers={"X-Request-ID": "txt-1"})
    [line] = [line for line in capsys.readouterr().err.splitlines() if "api.access" in line]
    assert "INFO api.access [txt-1] GET /no-such-page 404" in line


@pytest.mark.parametrize("empty_database_url", BACKENDS, indirect=True)
def test_livez_and_readyz_when_all_is_well(api_client: TestClient) -> None:
    """Both 200; readiness names each check."""
    assert api_client.get("/livez").json() == {"status": "alive"}
    response = api_client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"database": "ok", "broker": "ok", "schema": "ok"}


@pytest.fixture
def unmigrated_settings(empty_database_url: str, tmp_path: Path) -> Settings:
    """Settings on a fresh database that no migration has touched."""
    return Settings(
        database_url=empty_database_url,
        redis_url=REDIS_URL,
        queue_name=f"nr-test-{uuid.uuid4().hex[:10]}",
        data_dir=tmp_path / "data",
    )


@pytest.mark.parametrize("empty_database_url", BACKENDS, indirect=True)
def test_readyz_503_until_the_schema_is_at_head(unmigrated_settings: Settings) -> None:
    """A database that answers but has no migrations, or old ones: not ready, and it says which revision."""
    url = unmigrated_settings.resolved_database_url()
    with local_client(create_app(unmigrated_settings, reconcile=False)) as client:
        assert client.get("/livez").status_code == 200
        response = client.get("/readyz")
        assert response.status_code == 503
        checks = response.json()
        assert (checks["database"], checks["broker"]) == ("ok", "ok")
        assert "not migrated" in checks["schema"]
        migrate.upgrade(url, "0001")
        behind = client.get("/readyz").json()["schema"]
        assert "at 0001" in behind
        assert all(head in behind for head in migration_heads())
        migrate.upgrade(url)
        assert client.get("/readyz").status_code == 200


@pytest.mark.parametrize("empty_database_url", ["postgres"], indirect=True)
def test_readyz_503_and_livez_200_when_the_database_is_unreachable(settings: Settings) -> None:
    """Readiness names the database; liveness makes no database call, so it stays 200."""
    url = settings.resolved_database_url().rsplit("/", 1)[0] + "/nr_test_no_such_database"
    with local_client(
        create_app(settings.model_copy(update={"database_url": url}), reconcile=False)
    ) as client:
        assert client.get("/livez").status_code == 200
        response = client.get("/readyz")
    assert response.status_code == 503
    checks = response.json()
    assert checks["database"].startswith("error: OperationalError")
    assert checks["schema"] == "not checked: no database"
    assert checks["broker"] == "ok"


@pytest.mark.parametrize("empty_database_url", ["sqlite"], indirect=True)
def test_readyz_names_a_dead_broker(settings: Settings) -> None:
    """The broker is part of readiness too."""
    with local_client(
        create_app(settings.model_copy(update={"redis_url": CLOSED_BROKER}), reconcile=False)
    ) as c:
        response = c.get("/readyz")
    assert response.status_code == 503
    assert response.json()["broker"].startswith("error:")


@pytest.mark.parametrize("empty_database_url", ["sqlite"], indirect=True)
def test_probes_are_never_shed(settings: Settings) -> None:
    """With no room for any request, /livez and /readyz are still answered; other routes get a 503."""
    app = create_app(settings, reconcile=False)
    with local_client(app) as started:  # runs the app's startup, then the shedder wraps it
        full = TestClient(LoadShedder(started.app, max_inflight=0))
        assert full.get("/livez").status_code == 200
        assert full.get("/readyz").status_code == 200
        shed = full.get("/metrics")
    assert shed.status_code == 503
    assert shed.headers["Retry-After"]
