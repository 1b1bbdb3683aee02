"""/docs, /redoc and the dashboard at `/`, through the real app.

Before this, /docs loaded Swagger UI from a CDN (a blank page offline) and `/` answered 404.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from html.parser import HTMLParser

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine

from api.app import create_app
from api.routes.home import DASHBOARD_DIR
from jobs.db import make_database, make_session_factory, transaction
from jobs.keys import add_key
from jobs.settings import Settings
from tests.conftest import local_client

# No page here touches the database: SQLite keeps these tests quick.
pytestmark = pytest.mark.parametrize("empty_database_url", ["sqlite"], indirect=True)

CONTENT_TYPES = {
    ".js": "javascript",
    ".css": "text/css",
    ".png": "image/png",
    ".json": "application/json",
    ".svg": "image/svg+xml",
}
SPEC_URL = re.compile(r"""url: '([^']+)'|spec-url="([^"]+)\"""")


class References(HTMLParser):
    """Every URL a page's tags point at (src and href)."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        """Collect src and href values."""
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


def references(page: str) -> list[str]:
    """The tag URLs of `page`, plus the OpenAPI URL that its inline script or <redoc> tag loads."""
    parser = References()
    parser.feed(page)
    specs = [first or second for first, second in SPEC_URL.findall(page)]
    return parser.urls + specs


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """The real app, called from loopback."""
    with local_client(create_app(settings, reconcile=False)) as client:
        yield client


@pytest.mark.parametrize(
    ("page", "expected"),
    [
        ("/docs", {"swagger-ui-bundle.js", "swagger-ui.css", "openapi.json"}),
        ("/redoc", {"redoc.standalone.js", "openapi.json"}),
    ],
)
def test_docs_load_every_file_from_this_server(client: TestClient, page: str, expected: set[str]) -> None:
    answer = client.get(page)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/html")
    assert not re.search(r"https?://|//[a-z]", answer.text, re.IGNORECASE), "an absolute or off-site URL"
    urls = references(answer.text)
    assert {url.rsplit("/", 1)[1] for url in urls} >= expected
    for url in urls:
        assert url.startswith("/"), url
        asset = client.get(url)
        assert asset.status_code == 200, url
        suffix = url[url.rfind(".") :]
        assert CONTENT_TYPES[suffix] in asset.headers["content-type"], (url, asset.headers["content-type"])
        assert len(asset.content) > 1000, f"{url} is not the real file"


def test_the_bundles_are_the_real_renderers(client: TestClient) -> None:
    swagger = client.get("/static/docs/swagger-ui-bundle.js").text
    redoc = client.get("/static/docs/redoc.standalone.js").text
    assert "SwaggerUIBundle" in swagger
    assert "Redoc" in redoc


def test_the_landing_page_is_the_dashboard_with_links_to_the_docs_health_and_metrics(
    client: TestClient,
) -> None:
    answer = client.get("/")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/html")
    policy = answer.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    page = answer.text
    assert "nightrender <small>0.1.0</small>" in page
    assert '<script type="module" src="dashboard-assets/app.js">' in page
    links = References()
    links.feed(page)
    api_links = {url for url in links.urls if url.startswith("/") and url != "/"}
    assert api_links == {"/docs", "/redoc", "/openapi.json", "/healthz", "/metrics"}
    for url in api_links:
        assert client.get(url).status_code == 200, url
    assert {url for url in links.urls if url.startswith("#")} == {"#/", "#/submit", "#/memory"}


def test_every_file_the_dashboard_loads_is_served_from_this_server(client: TestClient) -> None:
    page = client.get("/").text
    assert not re.search(r"https?://|//[a-z]", page, re.IGNORECASE), "an absolute or off-site URL"
    links = References()
    links.feed(page)
    assets = [url for url in links.urls if url.startswith("dashboard-assets/")]
    modules = _imported_modules(client, "dashboard-assets/app.js")
    # Every module in the folder is reached from app.js (and so is served and loads).
    assert modules == {path.name for path in DASHBOARD_DIR.glob("*.js")} - {"app.js"}
    assert "dashboard-assets/vendor/uPlot.iife.min.js" in assets
    for url in [*assets, *(f"dashboard-assets/{name}" for name in modules)]:
        asset = client.get("/" + url)
        assert asset.status_code == 200, url
        suffix = url[url.rfind(".") :]
        assert CONTENT_TYPES[suffix] in asset.headers["content-type"], (url, asset.headers["content-type"])
        assert asset.headers["x-content-type-options"] == "nosniff"
        if suffix in (".js", ".css") and not url.startswith("dashboard-assets/vendor/"):
            assert not re.search(r"https?://", asset.text), f"{url} names an off-site URL"
    assert "uPlot" in client.get("/dashboard-assets/vendor/uPlot.iife.min.js").text
    assert client.get("/dashboard-assets/%2e%2e/%2e%2e/routes/home.py").status_code == 404  # only that folder


IMPORT = re.compile(r"""from "\./([a-z-]+\.js)";""")


def _imported_modules(client: TestClient, url: str) -> set[str]:
    """Every module `url` imports, and theirs, by name."""
    found: set[str] = set()
    waiting = [client.get("/" + url).text]
    while waiting:
        for name in IMPORT.findall(waiting.pop()):
            if name not in found:
                found.add(name)
                waiting.append(client.get(f"/dashboard-assets/{name}").text)
    return found


def test_the_landing_page_lists_only_what_is_served(settings: Settings) -> None:
    app = create_app(settings.model_copy(update={"metrics_enabled": False}), reconcile=False)
    with local_client(app) as client:
        page = client.get("/").text
    assert 'href="/docs"' in page
    assert "/metrics" not in page


def test_pages_are_outside_the_api_document(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert paths, "the document lists the API"
    assert "/v1/batches" in paths
    pages = {"/", "/docs", "/redoc", "/docs/oauth2-redirect"}
    assert [
        path for path in paths if path in pages or path.startswith(("/static", "/dashboard-assets"))
    ] == []


@pytest.fixture
def engine(settings: Settings) -> Iterator[Engine]:
    """A plain engine on the test's database."""
    engine = make_database(settings.resolved_database_url())
    yield engine
    engine.dispose()


def test_pages_need_no_key_as_the_openapi_document_did(settings: Settings, engine: Engine) -> None:
    with transaction(make_session_factory(engine)) as session:
        add_key(session, name="someone")
    app = create_app(settings, reconcile=False)
    with TestClient(app, base_url="http://127.0.0.1", client=("203.0.113.7", 4000)) as remote:
        assert remote.get("/v1/queue").status_code == 401  # the API itself needs the key
        pages = (
            "/",
            "/docs",
            "/redoc",
            "/openapi.json",
            "/static/docs/swagger-ui.css",
            "/dashboard-assets/app.js",
        )
        for url in pages:
            assert remote.get(url).status_code == 200, url
