"""The page a person sees at `/`: what this is, and where the API reference, health and metrics are.

Swagger UI and ReDoc themselves come from `fastapi-offline` (see `create_app`), which ships their
JavaScript and CSS in its wheel, so `/docs` works with no network.
"""

from __future__ import annotations

from html import escape

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from starlette.routing import BaseRoute, Match

router = APIRouter(include_in_schema=False)

DOCS_ASSETS_URL = "/static/docs"
DASHBOARD_URL = "/dashboard"
TAGLINE = "A render queue for text-to-image models that works within a VRAM budget."
# (path, what a person finds there); a path this app does not serve (metrics off) is left out.
PAGES = (
    ("/docs", "the API reference to try out (Swagger UI)"),
    ("/redoc", "the API reference to read (ReDoc)"),
    ("/openapi.json", "the OpenAPI document, for clients and code generators"),
    ("/healthz", "whether the database and the broker answer"),
    ("/metrics", "Prometheus metrics"),
)
# Nothing on this page loads from anywhere, this server included.
CONTENT_SECURITY_POLICY = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>nightrender {version}</title>
<style>
body {{ font: 16px/1.5 system-ui, sans-serif; max-width: 42rem; margin: 3rem auto; padding: 0 1rem; }}
h1 small {{ color: #666; font-weight: normal; font-size: 1rem; }}
li {{ margin: .4rem 0; }}
code {{ background: #f3f3f3; padding: 0 .25rem; }}
</style>
</head>
<body>
<h1>nightrender <small>{version}</small></h1>
<p>{tagline}</p>
<ul>
{items}
</ul>
<p>From a terminal: <code>nightrender --help</code></p>
</body>
</html>
"""


@router.get("/", response_class=HTMLResponse)
def home(request: Request) -> HTMLResponse:
    """A small HTML page with the product's version and links to its docs, health and metrics."""
    root = request.scope.get("root_path", "")
    served = _served_paths(request)
    items = [_link(root + path, text) for path, text in PAGES if path in served]
    items.append(_dashboard_item(root, DASHBOARD_URL in served))
    page = PAGE.format(version=escape(request.app.version), tagline=escape(TAGLINE), items="\n".join(items))
    return HTMLResponse(page, headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY})


def _served_paths(request: Request) -> set[str]:
    # Asked of the router as a request would be: included routers no longer list their routes flat.
    candidates = (*(path for path, _ in PAGES), DASHBOARD_URL)
    return {path for path in candidates if _serves(request.app.router.routes, path)}


def _serves(routes: list[BaseRoute], path: str) -> bool:
    scope = {"type": "http", "method": "GET", "path": path, "root_path": ""}
    return any(route.matches(scope)[0] == Match.FULL for route in routes)


def _link(href: str, text: str) -> str:
    return f'<li><a href="{escape(href)}">{escape(href)}</a>: {escape(text)}</li>'


def _dashboard_item(root: str, served: bool) -> str:
    # The dashboard is planned; until its route exists the page names its address without a dead link.
    if served:
        return _link(root + DASHBOARD_URL, "the dashboard")
    return f"<li><code>{escape(root + DASHBOARD_URL)}</code>: the dashboard (coming soon)</li>"
