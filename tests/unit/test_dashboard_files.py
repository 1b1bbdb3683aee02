"""The dashboard's static files ship in the package, and the vendored chart library is the one recorded."""

from __future__ import annotations

import hashlib
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "api" / "static" / "dashboard"


def test_every_dashboard_file_ships_in_the_package() -> None:
    """pyproject's package-data globs cover every dashboard file, so a non-editable install serves them."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    package = ROOT / "api"
    shipped = {path for pattern in setuptools["package-data"]["api"] for path in package.glob(pattern)}
    present = {path for path in DASHBOARD.rglob("*") if path.is_file()}
    assert len(present) > 10, "no dashboard files found"
    assert present - shipped == set()


def test_the_vendored_files_match_their_recorded_hashes() -> None:
    """vendor/README.md names each vendored file's SHA-256; an edited or swapped file fails here."""
    vendor = DASHBOARD / "vendor"
    text = (vendor / "README.md").read_text()
    recorded = {name: digest for digest, name in re.findall(r"^([0-9a-f]{64})  (\S+)$", text, re.M)}
    assert set(recorded) == {"uPlot.iife.min.js", "uPlot.min.css"}
    for name, digest in recorded.items():
        assert hashlib.sha256((vendor / name).read_bytes()).hexdigest() == digest, name
