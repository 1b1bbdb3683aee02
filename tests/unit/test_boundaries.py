"""Import boundaries, checked in fresh interpreters: `api -> jobs <- worker`; the API never loads torch, the
engine no queue code.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

# Imports every submodule of the jobs package, so a heavy import added to any of them is caught.
IMPORT_ALL_JOBS = (
    "import importlib, pkgutil, jobs\n"
    "for info in pkgutil.iter_modules(jobs.__path__):\n"
    "    importlib.import_module(f'jobs.{info.name}')\n"
)

PROBE = """
import json, sys
{imports}
loaded = sorted({{name.split('.')[0] for name in sys.modules}})
print(json.dumps({{"loaded": loaded}}))
"""


def loaded_packages(imports: str) -> set[str]:
    """Top-level packages in sys.modules after running `imports` in a fresh interpreter."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(imports=imports)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stdout.strip().splitlines()[-1])["loaded"])


@pytest.mark.parametrize(
    ("imports", "expected", "forbidden"),
    [
        ("import api.app", {"api", "jobs", "fastapi"}, {"torch", "diffusers", "transformers", "worker"}),
        ("import worker.engine", {"worker", "torch", "diffusers"}, {"sqlalchemy", "celery", "jobs", "api"}),
        ("import jobs", {"jobs"}, {"torch", "api", "worker"}),
        (IMPORT_ALL_JOBS, {"jobs", "sqlalchemy"}, {"torch", "diffusers", "api", "worker"}),
        ("import worker.celery_app", {"worker", "jobs", "celery", "torch"}, {"api", "fastapi"}),
    ],
    ids=["api.app", "worker.engine", "jobs", "jobs.*", "worker.celery_app"],
)
def test_import_boundary(imports: str, expected: set[str], forbidden: set[str]) -> None:
    loaded = loaded_packages(imports)
    assert expected <= loaded, f"the probe did not import what it should: {expected - loaded}"
    assert not loaded & forbidden, f"{imports!r} loaded {sorted(loaded & forbidden)}"
