"""One stack per data directory, readiness from the worker's own row, and the commands that manage a stack.

Each test drives the real CLI (`python -m cli.main`) in a subprocess on the embedded default, as a
person in a terminal does; the stacks it starts are stopped, and their processes checked gone.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from cli.embedded_redis import redis_answers, redis_server_command
from tests.e2e.test_cli import CLI, embedded_env, free_port
from tests.e2e.test_cli_signals import READY, wait_for_line

pytestmark = pytest.mark.e2e


def cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """One CLI command to its end; its output (stdout and stderr together) in `.stdout`."""
    return subprocess.run(
        [*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def output(result: subprocess.CompletedProcess[str]) -> str:
    """What a command printed, with rich's line wrapping undone."""
    return " ".join((result.stdout + result.stderr).split())


class RunningUp:
    """A `nightrender up` in the background and the processes it started."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.process = subprocess.Popen(
            [*CLI, "up"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        try:
            self.printed = wait_for_line(self.process, READY, timeout_s=240)
        except BaseException:  # never ready: stop it and whatever it started before failing the test
            for child in psutil.Process(self.process.pid).children(recursive=True):
                child.kill()
            self.process.kill()
            self.process.wait(timeout=30)
            raise
        self.children = psutil.Process(self.process.pid).children(recursive=True)

    def kill_all(self) -> None:
        """Whatever is still running, killed (the cleanup when a test failed half-way)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)
        for process in self.children:
            if process.is_running():
                process.kill()


def stack_env(tmp_path: Path, model_cache: Path, name: str) -> dict[str, str]:
    """An embedded stack's environment in its own data directory, on free ports."""
    env = embedded_env(tmp_path / name, model_cache)
    env.update(WORKER_MODEL="synthetic:tiny", COLUMNS="200", HEARTBEAT_INTERVAL_S="1")
    return env


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[RunningUp]:
    """One `up` shared by the tests that only look at a running stack."""
    stack = RunningUp(stack_env(tmp_path_factory.mktemp("running"), model_cache, "a"))
    try:
        yield stack
    finally:
        stack.kill_all()


def test_a_second_up_on_the_same_data_dir_is_refused_and_the_first_keeps_running(
    running: RunningUp,
) -> None:
    second = cli({**running.env, "API_PORT": str(free_port())}, "up")
    assert second.returncode == 2
    assert f"already running from {running.env['DATA_DIR']} (pid {running.process.pid}" in output(second)
    assert running.process.poll() is None and all(p.is_running() for p in running.children)


def test_a_stack_on_another_data_dir_is_refused_the_first_stacks_redis(
    running: RunningUp, tmp_path: Path, model_cache: Path
) -> None:
    other = stack_env(tmp_path, model_cache, "b")
    other["EMBEDDED_REDIS_PORT"] = running.env["EMBEDDED_REDIS_PORT"]  # the collision that mixed queues
    result = cli(other, "up")
    assert result.returncode == 2
    assert f"port {other['EMBEDDED_REDIS_PORT']} is taken by another Redis" in output(result)
    assert "set EMBEDDED_REDIS_PORT" in output(result)
    assert not (Path(other["DATA_DIR"]) / "stack.json").exists()  # it released its lock


def test_a_taken_api_port_is_named_before_anything_is_spawned(tmp_path: Path, model_cache: Path) -> None:
    env = stack_env(tmp_path, model_cache, "c")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", int(env["API_PORT"])))
        squatter.listen()
        result = cli(env, "up")
    assert result.returncode == 2
    assert f"port {env['API_PORT']} on 127.0.0.1 is taken by another program" in output(result)
    assert "API_PORT (--port)" in output(result)
    assert not (Path(env["DATA_DIR"]) / "logs" / "api.log").exists()  # no API was started to fail


def test_worker_health_info_and_logs_read_the_running_stack(running: RunningUp) -> None:
    health = cli(running.env, "worker-health")
    assert health.returncode == 0, output(health)
    assert "healthy: " in output(health) and "synthetic:tiny on cpu" in output(health)
    info = output(cli(running.env, "info"))
    assert f"data dir {running.env['DATA_DIR']}" in info
    assert f"stack running yes (pid {running.process.pid}" in info
    assert "│ ready │ synthetic:tiny │ cpu │" in info
    logs = cli(running.env, "logs", "worker", "-n", "200")
    assert logs.returncode == 0 and "celery@" in logs.stdout
    wrong = cli(running.env, "logs", "gpu")
    assert wrong.returncode == 2 and "choose one of worker, api, redis" in output(wrong)


def test_stop_ends_the_stack_and_every_process_it_started(tmp_path: Path, model_cache: Path) -> None:
    up = RunningUp(stack_env(tmp_path, model_cache, "d"))
    try:
        result = cli(up.env, "stop")
        assert result.returncode == 0 and "stopped" in output(result)
        assert up.process.wait(timeout=30) == 0
        _, alive = psutil.wait_procs(up.children, timeout=30)
        assert [p.cmdline() for p in alive] == []
        assert "no stack is running" in output(cli(up.env, "stop"))
        unhealthy = cli(up.env, "worker-health")  # its worker said "stopped" at warm shutdown
        assert unhealthy.returncode == 1 and "newest: stopped" in output(unhealthy)
    finally:
        up.kill_all()


def test_up_stops_what_a_killed_stack_left_running(tmp_path: Path, model_cache: Path) -> None:
    first = RunningUp(stack_env(tmp_path, model_cache, "e"))
    second = None
    try:
        os.kill(first.process.pid, signal.SIGKILL)  # no handler runs: its children are orphaned
        first.process.wait(timeout=30)
        assert all(p.is_running() for p in first.children)
        second = RunningUp(first.env)
        _, alive = psutil.wait_procs(first.children, timeout=30)
        assert alive == []
        for name in ("redis", "api", "worker"):
            assert (
                f"stopped {name} (" in second.printed
                and "left running by a stack that did not stop" in second.printed
            )
        second.process.send_signal(signal.SIGINT)
        assert second.process.wait(timeout=60) == 0
    finally:
        first.kill_all()
        if second is not None:
            second.kill_all()


def test_a_stale_ready_line_does_not_pass_for_a_worker_that_cannot_load(
    tmp_path: Path, model_cache: Path
) -> None:
    """Readiness comes from the worker's row: an old " ready." in the log used to pass at once."""
    env = stack_env(tmp_path, model_cache, "f")
    logs = Path(env["DATA_DIR"]) / "logs"
    logs.mkdir(parents=True)
    (logs / "worker.log").write_text("[2026-11-26 23:00:00] celery@old ready.\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a lighthouse\n")
    started = time.monotonic()
    result = cli({**env, "WORKER_MODEL": "Tongyi-MAI/Z-Image-Turbo"}, "run", str(prompts), timeout=240)
    assert result.returncode == 2
    assert "the worker could not start" in output(result) and "CUDA" in output(result)
    assert "jobs queued" not in output(result)  # nothing was submitted to a worker that cannot run it
    assert time.monotonic() - started < 200


def test_the_default_data_dir_is_the_users_whatever_the_working_directory(
    tmp_path: Path, user_data_home: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DATA_DIR"}
    seen = set()
    for folder in (tmp_path / "one", tmp_path / "two"):
        folder.mkdir()
        result = subprocess.run(
            [*CLI, "info"], env=env, cwd=folder, capture_output=True, text=True, timeout=60, check=True
        )
        seen.add(output(result).split("data dir ")[1].split()[0])
    assert seen == {str(user_data_home / "nightrender")}


def test_global_options_reach_the_command(tmp_path: Path) -> None:
    version = cli(dict(os.environ), "--version")
    assert version.returncode == 0 and version.stdout.startswith("nightrender ")
    info = output(cli(dict(os.environ), "--data-dir", str(tmp_path), "--port", "8123", "info"))
    assert f"data dir {tmp_path}" in info and "API http://127.0.0.1:8123" in info
    remote = output(cli(dict(os.environ), "--api-url", "http://gpu-box:9000", "info"))
    assert "API http://gpu-box:9000" in remote


def test_up_replaces_its_own_data_dirs_redis_that_nothing_recorded(tmp_path: Path, model_cache: Path) -> None:
    """A Redis serving this data dir's folder, with no record of who started it, is shut down and replaced."""
    env = stack_env(tmp_path, model_cache, "g")
    folder = Path(env["DATA_DIR"]) / "redis"
    folder.mkdir(parents=True)
    orphan = subprocess.Popen(
        redis_server_command(int(env["EMBEDDED_REDIS_PORT"]), folder), stdout=subprocess.DEVNULL
    )
    up = None
    try:
        url = f"redis://127.0.0.1:{env['EMBEDDED_REDIS_PORT']}/0"
        deadline = time.monotonic() + 20
        while not redis_answers(url) and time.monotonic() < deadline:
            time.sleep(0.1)
        up = RunningUp(env)
        assert orphan.wait(timeout=30) == 0  # SHUTDOWN: its AOF written, then a clean exit
        assert f"stopped redis (port {env['EMBEDDED_REDIS_PORT']})" in up.printed
        assert any("redis-server" in " ".join(p.cmdline()) for p in up.children)
    finally:
        if orphan.poll() is None:
            orphan.kill()
        if up is not None:
            up.kill_all()


def test_a_command_with_no_api_running_says_how_to_start_one(tmp_path: Path) -> None:
    """Every client command used to print a 100-line traceback when no stack was up."""
    env = {**os.environ, "API_PORT": str(free_port()), "DATA_DIR": str(tmp_path), "COLUMNS": "200"}
    for command in (["batches"], ["status", "7998859c-bac6-4e63-874e-40c387207391"], ["pause"]):
        result = cli(env, *command)
        assert result.returncode == 2, command
        assert f"no nightrender API answers at http://127.0.0.1:{env['API_PORT']}" in output(result)
        assert "nightrender up" in output(result) and "Traceback" not in output(result)


def test_stop_after_a_killed_up_stops_what_it_left(tmp_path: Path, model_cache: Path) -> None:
    """`up` killed with kill -9 used to leave its processes, and `stop` said only "no stack is running"."""
    up = RunningUp(stack_env(tmp_path, model_cache, "h"))
    try:
        os.kill(up.process.pid, signal.SIGKILL)
        up.process.wait(timeout=30)
        result = cli(up.env, "stop")
        assert result.returncode == 0
        assert "left running by a stack that did not stop" in output(
            result
        ) and "stopped worker (pid" in output(result)
        _, alive = psutil.wait_procs(up.children, timeout=30)
        assert alive == []
    finally:
        up.kill_all()


def test_run_against_an_api_elsewhere_that_does_not_answer_starts_nothing_here(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a lighthouse\n")
    remote = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "DATA_DIR": str(tmp_path / "data"), "COLUMNS": "200"}
    result = cli(env, "--api-url", remote, "run", str(prompts))
    assert result.returncode == 2 and f"no nightrender API answers at {remote}" in output(result)
    assert not (tmp_path / "data" / "logs").exists()  # no Redis, API or worker was started for it
