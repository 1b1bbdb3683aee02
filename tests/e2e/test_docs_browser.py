"""/docs and /redoc rendered by a real headless Chromium against a real uvicorn, with no network.

Every host but 127.0.0.1 is made unresolvable, so a page that still needed a CDN renders no operation.
Before this, /docs loaded Swagger UI from a CDN and was blank offline.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from cli.stack import Stack
from jobs.settings import Settings

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("empty_database_url", ["sqlite"], indirect=True)]

# Debian's package `chromium` (.ci/run installs it); the test needs a real browser to mean anything.
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_TIMEOUT_S = 90


def rendered_dom(url: str, profile: Path) -> str:
    """The DOM after the page's scripts ran, with every host but 127.0.0.1 unresolvable."""
    assert CHROMIUM is not None
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",  # CI runs as root
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--virtual-time-budget=10000",
        "--dump-dom",
        url,
    ]
    # Its own session, so the browser's helper processes are ended with it whatever happens.
    browser = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        dom, errors = browser.communicate(timeout=BROWSER_TIMEOUT_S)
    finally:
        _end_session(browser)
    assert browser.returncode == 0, errors[-2000:]
    return dom


def _end_session(browser: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone, helpers included
        os.killpg(browser.pid, signal.SIGKILL)
    browser.communicate()


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's `chromium` package (apt-get install chromium)")
def test_docs_and_redoc_render_the_api_with_no_network(
    api_only: Stack, settings: Settings, tmp_path: Path
) -> None:
    base = settings.resolved_api_url()
    swagger = rendered_dom(f"{base}/docs", tmp_path / "profile")
    assert 'class="swagger-ui' in swagger, "Swagger UI did not start"
    assert 'data-path="/v1/batches"' in swagger, "Swagger UI rendered no operation for /v1/batches"
    assert "opblock-post" in swagger

    redoc = rendered_dom(f"{base}/redoc", tmp_path / "profile")
    assert 'id="operation/' in redoc, "ReDoc rendered no operation"
    assert re.search(r'http-verb post">post</span><span[^>]*>/v1/batches</span>', redoc), (
        "ReDoc rendered no operation for POST /v1/batches"
    )

    home = rendered_dom(f"{base}/", tmp_path / "profile")
    assert 'href="/docs"' in home
    assert "nightrender" in home
