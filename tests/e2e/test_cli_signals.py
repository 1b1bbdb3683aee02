"""`nightrender up` and `run` stop everything they started on SIGTERM and SIGHUP, as on Ctrl-C.

Before, SIGTERM or SIGHUP (closing the terminal) ended the CLI at once and left redis-server, uvicorn
and celery running, re-parented to PID 1, because they run in their own sessions.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.e2e.test_cli import CLI, embedded_env

pytestmark = pytest.mark.e2e
READY = "nightrender is up"


def wait_for_line(process: subprocess.Popen[str], text: str, timeout_s: float) -> str:
    """The output up to the first line holding `text` (whitespace folded), or fail with what was printed."""
    assert process.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        seen.append(line)
        if text in line:
            return " ".join("".join(seen).split())
    pytest.fail(f"no {text!r} in the CLI's output:\n{''.join(seen)[-3000:]}")


@pytest.mark.parametrize("sent", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_to_up_stops_every_process_it_started(
    sent: signal.Signals, tmp_path: Path, model_cache: Path
) -> None:
    env = {**embedded_env(tmp_path, model_cache), "WORKER_MODEL": "synthetic:tiny", "COLUMNS": "200"}
    up = subprocess.Popen(
        [*CLI, "up"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=Path.cwd()
    )
    started: list[psutil.Process] = []
    try:
        wait_for_line(up, READY, timeout_s=240)
        started = psutil.Process(up.pid).children(recursive=True)
        names = " ".join(" ".join(p.cmdline()) for p in started)
        assert "redis-server" in names and "uvicorn" in names and "celery" in names, names
        up.send_signal(sent)
        assert up.wait(timeout=120) == 0
        _, alive = psutil.wait_procs(started, timeout=30)
        assert [p.cmdline() for p in alive] == []
    finally:
        for process in [*started, psutil.Process(up.pid)] if up.poll() is None else started:
            if process.is_running():
                process.kill()
