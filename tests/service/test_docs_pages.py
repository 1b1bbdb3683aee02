"""/docs, /redoc and the landing page at `/`, through the real app.

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
from jobs.db import make_database, make_session_factory, transaction
from jobs.keys import add_key
from jobs.settings import Settings
from tests.conftest import local_client

# No page here touches the database: SQLite keeps these tests quick.
pytestmark = pytest.mark.parametrize("empty_database_url", ["sqlite"], indirect=True)

CONTENT_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png", ".json": "application/json"}
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


def test_the_landing_page_links_to_the_docs_health_and_metrics(client: TestClient) -> None:
    answer = client.get("/")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in answer.headers["content-security-policy"]
    page = answer.text
    assert "<h1>nightrender <small>0.1.0</small></h1>" in page
    links = References()
    links.feed(page)
    assert set(links.urls) == {"/docs", "/redoc", "/openapi.json", "/healthz", "/metrics"}
    assert "<code>/dashboard</code>: the dashboard (coming soon)" in page
    for url in links.urls:
        assert client.get(url).status_code == 200, url


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
    assert [path for path in paths if path in pages or path.startswith("/static")] == []


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
        for url in ("/", "/docs", "/redoc", "/openapi.json", "/static/docs/swagger-ui.css"):
            assert remote.get(url).status_code == 200, url
