"""What `up` does when a process of its stack exits, read from real processes (`sleep`s standing for them).

A worker that dies while another runs is said once and outlived; the stack ends when the API or Redis
exits, or when no worker is left, with the line `up` prints before it stops the rest.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator

import pytest

from cli.stack_watch import ExitWatch

STALE_S = 120.0


@pytest.fixture
def processes() -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    """An API, Redis and two GPU workers as long `sleep`s; any left running are killed after the test."""
    started = {
        name: subprocess.Popen(["sleep", "600"]) for name in ("api", "redis", "worker-gpu0", "worker-gpu1")
    }
    try:
        yield started
    finally:
        for process in started.values():
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)


def killed(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL, as the OOM killer does, and reaped (so poll() sees it)."""
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)


def test_one_worker_dying_is_said_once_and_the_stack_goes_on(
    processes: dict[str, subprocess.Popen[bytes]],
) -> None:
    watch = ExitWatch(processes, ["worker-gpu0", "worker-gpu1"], STALE_S)
    said: list[str] = []
    assert watch.check(said.append) is None and said == []
    killed(processes["worker-gpu1"])
    assert watch.check(said.append) is None
    assert watch.check(said.append) is None  # said once, not on every check
    assert said == [
        "worker-gpu1 exited with -9; the other workers go on, and its jobs are requeued after "
        "HEARTBEAT_STALE_S (120s); see `nightrender logs worker-gpu1`"
    ]
    killed(processes["worker-gpu0"])
    assert watch.check(said.append) == (
        "every worker exited (worker-gpu0 with -9, worker-gpu1 with -9); see `nightrender logs worker-gpu0`"
    )
    assert len(said) == 1


@pytest.mark.parametrize("name", ["api", "redis"])
def test_the_api_or_redis_exiting_ends_the_stack_though_workers_run(
    processes: dict[str, subprocess.Popen[bytes]], name: str
) -> None:
    watch = ExitWatch(processes, ["worker-gpu0", "worker-gpu1"], STALE_S)
    processes[name].terminate()
    processes[name].wait(timeout=10)
    assert watch.check(lambda line: None) == f"the {name} exited with -15; see `nightrender logs {name}`"


def test_the_one_worker_of_a_plain_up_exiting_ends_it_as_before(
    processes: dict[str, subprocess.Popen[bytes]],
) -> None:
    plain = {"api": processes["api"], "worker": processes["worker-gpu0"]}
    said: list[str] = []
    watch = ExitWatch(plain, ["worker"], STALE_S)
    killed(plain["worker"])
    assert watch.check(said.append) == "the worker exited with -9; see `nightrender logs worker`"
    assert said == []
