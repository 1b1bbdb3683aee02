"""The dashboard at `/`: static files from the package, which call the JSON API with the visitor's key.

The page itself needs no key (it holds no data); the JavaScript asks for one when the API answers 401.
Swagger UI and ReDoc come from `fastapi-offline` (see `create_app`), which ships their JavaScript and CSS
in its wheel, so `/docs` works with no network either.
"""

from __future__ import annotations

import functools
from html import escape
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.routing import BaseRoute, Match
from starlette.types import Message, Receive, Scope, Send

router = APIRouter(include_in_schema=False)

DOCS_ASSETS_URL = "/static/docs"
DASHBOARD_DIR = Path(__file__).resolve().parent.parent / "static" / "dashboard"
DASHBOARD_ASSETS_URL = "/dashboard-assets"
TAGLINE = "A render queue for text-to-image models that works within a VRAM budget."
# (path, what a person finds there); a path this app does not serve (metrics off) is left out.
PAGES = (
    ("/docs", "the API reference to try out (Swagger UI)"),
    ("/redoc", "the API reference to read (ReDoc)"),
    ("/openapi.json", "the OpenAPI document, for clients and code generators"),
    ("/healthz", "whether the database and the broker answer"),
    ("/metrics", "Prometheus metrics"),
)
# Scripts, styles, images and API calls from this server only; images also from the object URLs the
# dashboard makes of thumbnails it fetched with the key. No inline script or style, no framing.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; connect-src 'self'; "
    "base-uri 'self'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


class DashboardFiles(StaticFiles):
    """The dashboard's scripts and styles: revalidated on every load (ETag), so an upgrade shows at once."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve the file with no-cache and nosniff headers added."""

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message.get("headers", []),
                    (b"cache-control", b"no-cache"),
                    (b"x-content-type-options", b"nosniff"),
                ]
            await send(message)

        await super().__call__(scope, receive, send_with_headers)


router.mount(DASHBOARD_ASSETS_URL, DashboardFiles(directory=DASHBOARD_DIR), name="dashboard-assets")


@router.get("/", response_class=HTMLResponse)
def dashboard(request: Request) -> HTMLResponse:
    """The dashboard's page, with the product's version and links to the docs, health and metrics."""
    root = request.scope.get("root_path", "").rstrip("/")
    served = _served_paths(request)
    links = "\n".join(_link(root + path, text) for path, text in PAGES if path in served)
    page = (
        _index_html()
        .replace("{{root}}", escape(root))
        .replace("{{version}}", escape(request.app.version))
        .replace("{{tagline}}", escape(TAGLINE))
        .replace("{{links}}", links)
    )
    return HTMLResponse(page, headers=PAGE_HEADERS)


@functools.cache
def _index_html() -> str:
    return (DASHBOARD_DIR / "index.html").read_text(encoding="utf-8")


def _served_paths(request: Request) -> set[str]:
    # Asked of the router as a request would be: included routers no longer list their routes flat.
    return {path for path, _ in PAGES if _serves(request.app.router.routes, path)}


def _serves(routes: list[BaseRoute], path: str) -> bool:
    scope = {"type": "http", "method": "GET", "path": path, "root_path": ""}
    return any(route.matches(scope)[0] == Match.FULL for route in routes)


def _link(href: str, text: str) -> str:
    return f'    <li><a href="{escape(href)}">{escape(href)}</a>: {escape(text)}</li>'
