"""The batch commands of the real CLI against a real stack (issue 10, items 5-9).

`run` is resumable (Ctrl-C prints the command that attaches to the same batch, nothing is submitted twice),
failure reasons and a paused queue are visible, and the small errors a user hit are gone. One stack, started
with `nightrender up`, serves the module; one test starts its own through `run`, as a user does.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import signal
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from PIL import Image

from cli.render_views import PAUSED_LINE
from jobs import migrate
from jobs.controls import set_paused
from jobs.db import make_database, make_session_factory, transaction
from jobs.lifecycle import claim_job, fail_job
from tests.e2e.test_cli import CLI, embedded_env

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
TINY = ["--model", "synthetic:tiny", "--sizes", "64", "--steps", "2"]


class Lines:
    """A process's output, drained by a thread, so a test can wait for a line without blocking on it."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    def wait_for(self, text: str, timeout_s: float) -> None:
        """Return once a line holds `text`; fail with the output if the process ends or time runs out."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if text in self.text():
                return
            if self.process.poll() is not None:
                self._reader.join(5)
                if text in self.text():
                    return
                break
            time.sleep(0.05)
        pytest.fail(f"no {text!r} in the output:\n{self.text()[-4000:]}")

    def finish(self, timeout_s: float) -> int:
        """Wait for the process to exit and its output to be read; its exit code."""
        code = self.process.wait(timeout_s)
        self._reader.join(10)
        return code

    def text(self) -> str:
        """Everything read so far."""
        return "".join(self.lines)


def start(argv: list[str], env: dict[str, str]) -> Lines:
    """Start a CLI command with its output read in the background."""
    process = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT
    )
    return Lines(process)


def stop_tree(process: subprocess.Popen[str]) -> None:
    """Kill a command and whatever it started, if it is still running (a failed test's leftovers)."""
    if process.poll() is not None:
        return
    parent = psutil.Process(process.pid)
    for each in [parent, *parent.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            each.kill()
    process.wait(30)


def resume_line(output: str) -> str:
    """The command an interrupted `run` printed after "resume with:"."""
    lines = output.splitlines()
    return lines[lines.index("resume with:") + 1]


def batch_of(output: str) -> str:
    """The batch id a `run` or `submit` printed."""
    found = re.search(rf"batch ({UUID.pattern})", output)
    assert found, output
    return found.group(1)


@dataclass
class RunningStack:
    """A stack `nightrender up` runs, and how to drive the CLI against it."""

    env: dict[str, str]
    api_url: str
    database: Path

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run one CLI command against this stack."""
        return subprocess.run(
            [*CLI, *args], env=self.env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
        )

    def jobs_with_prompt(self, prefix: str) -> int:
        """Jobs in the database whose prompt starts with `prefix` (retries included)."""
        with sqlite3.connect(self.database) as connection:
            (count,) = connection.execute(
                "SELECT count(*) FROM jobs WHERE prompt LIKE ?", (f"{prefix}%",)
            ).fetchone()
        return int(count)

    def fail_as_a_worker(self, batch_id: str, error: str) -> None:
        """Claim every queued job of the batch and fail it with `error`, as a worker that cannot render it."""
        database = make_database(f"sqlite:///{self.database}")
        try:
            factory = make_session_factory(database)
            for job in self.batch_jobs(batch_id):
                with transaction(factory) as session:
                    claim = claim_job(session, job_id=job["id"])
                    assert claim is not None
                    fail_job(
                        session, job_id=claim.job_id, lease_token=claim.lease_token, error=error, stats=None
                    )
        finally:
            database.dispose()

    def batch_jobs(self, batch_id: str) -> list[dict[str, Any]]:
        """The batch's jobs as the API lists them."""
        return httpx.get(f"{self.api_url}/v1/batches/{batch_id}/jobs").json()["jobs"]  # type: ignore[no-any-return]


def cli_env(folder: Path, model_cache: Path) -> dict[str, str]:
    """The embedded default in `folder`, the tiny model, a wide console and a model that cannot load."""
    env = embedded_env(folder, model_cache)
    env.update(
        WORKER_MODEL="synthetic:tiny",
        ALLOWED_MODELS=f"synthetic:tiny,{folder / 'missing-model'}",
        HF_HUB_OFFLINE="1",
        COLUMNS="200",
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, model_cache: Path) -> Iterator[RunningStack]:
    """One stack for the module, started and stopped by the CLI itself."""
    folder = tmp_path_factory.mktemp("cli-batches")
    env = cli_env(folder, model_cache)
    up = start([*CLI, "up"], env)
    try:
        up.wait_for("nightrender is up", 240)
        api_url = f"http://127.0.0.1:{env['API_PORT']}"
        yield RunningStack(env=env, api_url=api_url, database=folder / "data" / "nightrender.db")
    finally:
        up.process.send_signal(signal.SIGINT)
        try:
            up.finish(60)
        finally:
            stop_tree(up.process)


def interrupt(argv: list[str], env: dict[str, str], sent: signal.Signals) -> str:
    """Start `run` on a paused queue, signal it once it follows its batch, and return what it printed."""
    running = start(argv, env)
    try:
        running.wait_for(PAUSED_LINE, 240)
        running.process.send_signal(sent)
        assert running.finish(120) == 130, running.text()
    finally:
        stop_tree(running.process)
    return running.text()


def prompt_file(folder: Path, prefix: str, count: int) -> Path:
    """A .txt prompt file of `count` prompts that start with `prefix`."""
    path = folder / f"{prefix}.txt"
    path.write_text("".join(f"{prefix} {index}\n" for index in range(count)))
    return path


def test_ctrl_c_in_run_prints_the_command_that_resumes_the_same_batch(
    stack: RunningStack, tmp_path: Path
) -> None:
    prompts, out = prompt_file(tmp_path, "resumed", 4), tmp_path / "renders"
    argv = [*CLI, "run", str(prompts), *TINY, "--out", str(out)]
    stack.cli("pause")  # nothing renders before the signal: four jobs are surely left
    try:
        interrupted = interrupt(argv, stack.env, signal.SIGINT)
    finally:
        stack.cli("resume")
    assert "4 of 4 jobs left" in interrupted
    assert resume_line(interrupted) == shlex.join(argv)

    again = subprocess.run(
        shlex.split(resume_line(interrupted)),
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert "attached to the batch" in again.stdout
    batch_id = batch_of(again.stdout)
    assert batch_id == batch_of(interrupted)
    images = sorted((out / batch_id).glob("*.png"))
    assert [Image.open(image).size for image in images] == [(64, 64)] * 4  # `--sizes 64` is 64x64
    assert stack.jobs_with_prompt("resumed") == 4  # not 8: the second run submitted nothing


def test_new_forces_a_fresh_batch_and_sigterm_resumes_it_by_its_nonce(
    stack: RunningStack, tmp_path: Path
) -> None:
    prompts, out = prompt_file(tmp_path, "renewed", 3), tmp_path / "renders"
    argv = [*CLI, "run", str(prompts), *TINY, "--out", str(out)]
    first = stack.cli(*argv[len(CLI) :], timeout=240)
    assert first.returncode == 0, first.stdout
    stack.cli("pause")
    try:
        fresh = interrupt([*argv, "--new"], stack.env, signal.SIGTERM)
    finally:
        stack.cli("resume")
    assert "3 of 3 jobs left" in fresh
    assert batch_of(fresh) != batch_of(first.stdout)
    resume = shlex.split(resume_line(fresh))
    assert "--new" not in resume
    assert resume[resume.index("--nonce") + 1]

    again = subprocess.run(resume, env=stack.env, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert again.returncode == 0, again.stdout + again.stderr
    assert batch_of(again.stdout) == batch_of(fresh)
    assert stack.jobs_with_prompt("renewed") == 6  # the first batch and the --new one, nothing more


def test_status_and_job_show_why_jobs_failed_and_retry_prints_a_count(
    stack: RunningStack, tmp_path: Path
) -> None:
    prompts, out = prompt_file(tmp_path, "failing", 2), tmp_path / "renders"
    missing = stack.env["ALLOWED_MODELS"].split(",")[1]  # allowed, but no model is there
    submitted = stack.cli("submit", str(prompts), "--model", missing, "--sizes", "64", "--steps", "2")
    assert submitted.returncode == 0, submitted.stdout
    assert "no running worker serves model" in submitted.stdout  # the submit warning
    batch_id = batch_of(submitted.stdout)
    waiting = stack.cli("status", batch_id)
    assert "no running worker serves" in waiting.stdout and "missing-model" in waiting.stdout
    # No worker serves that model, so its jobs wait (they never fail for it). Here a worker of that
    # model claims them and cannot load it, through the same lifecycle calls a worker makes.
    stack.fail_as_a_worker(batch_id, "model could not load: missing-model")

    watched = stack.cli("status", batch_id, "--watch")
    assert watched.returncode == 0, watched.stdout
    assert "2 failed:" in watched.stdout
    assert "missing-model" in watched.stdout  # the reason, which names the model
    failed = stack.batch_jobs(batch_id)
    assert all(job["id"] in watched.stdout for job in failed)

    shown = json.loads(stack.cli("job", failed[0]["id"], "--json").stdout)
    assert (shown["status"], shown["attempts"]) == ("failed", 1)
    assert "missing-model" in stack.cli("job", failed[0]["id"]).stdout

    downloaded = stack.cli("download", batch_id, "--out", str(out))
    assert downloaded.returncode == 0, downloaded.stdout
    assert "no job recorded memory" in downloaded.stdout
    assert "Memory by resolution" not in downloaded.stdout

    retried = stack.cli("retry", batch_id)
    assert retried.returncode == 0, retried.stdout
    assert "2 jobs queued again" in retried.stdout
    assert UUID.findall(retried.stdout) == [batch_id]  # a count, not the new jobs' ids

    summary = json.loads(stack.cli("status", batch_id, "--json").stdout)
    assert summary["id"] == batch_id and summary["total"] == 2


@pytest.mark.parametrize("batch_id", ["nope", str(uuid.uuid4())], ids=["not-an-id", "unknown"])
def test_download_of_a_missing_batch_is_one_error_and_no_folder(
    stack: RunningStack, tmp_path: Path, batch_id: str
) -> None:
    out = tmp_path / "renders"
    done = stack.cli("download", batch_id, "--out", str(out))
    assert done.returncode == 2
    assert done.stdout.count("error:") == 1, done.stdout
    assert "downloading" not in done.stdout
    assert not out.exists()


def test_a_paused_queue_shows_and_an_unfinished_download_exits_1(stack: RunningStack, tmp_path: Path) -> None:
    prompts, out = prompt_file(tmp_path, "paused", 3), tmp_path / "renders"
    stack.cli("pause")
    try:
        batch_id = batch_of(stack.cli("submit", str(prompts), *TINY).stdout)
        status = stack.cli("status", batch_id)
        assert "paused" in status.stdout
        assert "eta" not in status.stdout  # no ETA while nothing runs

        downloaded = stack.cli("download", batch_id, "--out", str(out))
        assert downloaded.returncode == 1, downloaded.stdout
        assert "3 of 3 jobs are unfinished" in downloaded.stdout
        assert (out / batch_id / "manifest.json").is_file()

        watching = start([*CLI, "status", batch_id, "--watch"], stack.env)
        try:
            wait_until_polling(watching.process, int(stack.env["API_PORT"]))
            watching.process.send_signal(signal.SIGINT)
            assert watching.finish(30) == 130, watching.text()
        finally:
            stop_tree(watching.process)
    finally:
        stack.cli("resume")
    finished = stack.cli("status", batch_id, "--watch")
    assert finished.returncode == 0 and "3 of 3 done" in finished.stdout

    again = stack.cli("download", batch_id, "--out", str(out))
    assert again.returncode == 0, again.stdout
    assert re.search(r"downloading .*100%.* [\d.]+/[\d.]+ [kM]B", again.stdout), again.stdout  # a total
    assert "3 of 3 images are in" in again.stdout


def wait_until_polling(process: subprocess.Popen[str], port: int, timeout_s: float = 60) -> None:
    """Wait until the command holds a connection to the API (it polls over one kept-alive connection)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        connections = psutil.Process(process.pid).net_connections(kind="tcp")
        if any(c.raddr and c.raddr.port == port for c in connections):
            return
        time.sleep(0.1)
    pytest.fail("the command never called the API")


def test_flags_reach_the_jobs_and_budget_is_refused_on_a_running_stack(
    stack: RunningStack, tmp_path: Path
) -> None:
    prompts = prompt_file(tmp_path, "flagged", 1)
    flags = ["--negative-prompt", "blurry", "--guidance", "1.5", "--priority", "3", "--dtype", "fp32"]
    ran = stack.cli(
        "run", str(prompts), *TINY, "--seed", "7", *flags, "--budget", "4", "--out", str(tmp_path)
    )
    assert ran.returncode == 0, ran.stdout
    assert "--budget does not apply" in ran.stdout
    (row,) = stack.batch_jobs(batch_of(ran.stdout))
    params = json.loads(stack.cli("job", row["id"], "--json").stdout)
    assert params["priority"] == 3
    assert {k: params["params"][k] for k in ("negative_prompt", "guidance_scale", "dtype", "seed")} == {
        "negative_prompt": "blurry",
        "guidance_scale": 1.5,
        "dtype": "fp32",
        "seed": 7,
    }


@pytest.mark.parametrize("command", ["run", "submit", "profile"])
def test_one_size_grammar_for_run_submit_and_profile(tmp_path: Path, model_cache: Path, command: str) -> None:
    """`--sizes 100` is refused by every command for the same reason, before anything starts."""
    prompts = prompt_file(tmp_path, "sized", 1)
    argv = [*CLI, command, *([] if command == "profile" else [str(prompts)]), "--sizes", "256,100"]
    done = subprocess.run(
        argv, env=cli_env(tmp_path, model_cache), capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 2
    assert "size '100': each side must be a multiple of 16" in done.stdout


def test_run_that_starts_its_stack_resumes_after_ctrl_c(tmp_path: Path, model_cache: Path) -> None:
    """The overnight case: `run` started the stack, Ctrl-C stopped it; the same command finishes the batch."""
    env = cli_env(tmp_path, model_cache)
    # Paused before the stack starts, so jobs are surely left when the signal comes.
    url = f"sqlite:///{tmp_path / 'data' / 'nightrender.db'}"
    (tmp_path / "data").mkdir()
    migrate.upgrade(url)
    database = make_database(url)
    with transaction(make_session_factory(database)) as session:
        set_paused(session, True)
    database.dispose()

    prompts, out = prompt_file(tmp_path, "overnight", 5), tmp_path / "renders"
    argv = [*CLI, "run", str(prompts), *TINY, "--out", str(out)]
    interrupted = interrupt(argv, env, signal.SIGINT)
    assert "5 of 5 jobs left" in interrupted
    assert "they stay queued and render when a stack runs again" in interrupted

    again = start(shlex.split(resume_line(interrupted)), env)
    try:
        again.wait_for("attached to the batch", 240)
        api = f"http://127.0.0.1:{env['API_PORT']}"
        assert httpx.post(f"{api}/v1/queue/resume", json={}).status_code == 200
        assert again.finish(240) == 0, again.text()
    finally:
        stop_tree(again.process)
    batch_id = batch_of(again.text())
    assert len(list((out / batch_id).glob("*.png"))) == 5
    with sqlite3.connect(tmp_path / "data" / "nightrender.db") as connection:
        assert connection.execute("SELECT count(*) FROM jobs").fetchone() == (5,)
