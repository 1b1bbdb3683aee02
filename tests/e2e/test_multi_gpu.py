"""One worker per GPU: `worker --gpu N`, `up --gpus`, and the Stack that starts a pinned worker per card.

On the CPU: the CLI refuses --gpu/--gpus with one line when there is no GPU, and starts nothing; a Stack
given GPUs still starts one named, pinned worker per index (the tiny model runs on the CPU), records each
in its lock file and stops them all. With two GPUs: `up --gpus 0,1` puts each worker on its own card.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import torch
from sqlalchemy import select

from cli.embedded_redis import redis_answers
from cli.gpus import worker_env
from cli.stack import Stack
from cli.stack_lock import StackLock, stop_leftovers
from jobs.db import make_database, make_session_factory
from jobs.presence import READY, this_host
from jobs.settings import Settings
from jobs.tables import Job, JobStats, WorkerPresence
from tests.e2e.test_cli import CLI
from tests.e2e.test_cli_signals import READY as UP_READY
from tests.e2e.test_cli_signals import wait_for_line
from tests.e2e.test_stack import cli, output, stack_env

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
NO_GPU = "no GPU found on this machine"
no_cuda_only = pytest.mark.skipif(
    torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU"
)
two_gpus_only = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs two CUDA devices"
)


def nothing_started(env: dict[str, str]) -> None:
    """No lock record, no log, no Redis: the command refused before starting any process."""
    data = Path(env["DATA_DIR"])
    assert not (data / "stack.json").exists() and not (data / "logs").exists()
    assert not redis_answers(f"redis://127.0.0.1:{env['EMBEDDED_REDIS_PORT']}/0")


@no_cuda_only
def test_worker_gpu_without_a_gpu_is_a_one_line_error(tmp_path: Path, model_cache: Path) -> None:
    env = stack_env(tmp_path, model_cache, "a")
    result = cli(env, "worker", "--gpu", "0")
    assert result.returncode == 2
    printed = (result.stdout + result.stderr).strip().splitlines()
    assert len(printed) == 1 and printed[0].startswith("error: --gpu 0: " + NO_GPU), printed
    nothing_started(env)


@no_cuda_only
def test_up_with_gpus_without_a_gpu_is_a_one_line_error_and_starts_nothing(
    tmp_path: Path, model_cache: Path
) -> None:
    env = stack_env(tmp_path, model_cache, "b")
    for choice in ("0,1", "all"):
        result = cli(env, "up", "--gpus", choice)
        assert result.returncode == 2
        printed = (result.stdout + result.stderr).strip().splitlines()
        assert len(printed) == 1 and printed[0].startswith("error: " + NO_GPU), printed
    bad = cli(env, "up", "--gpus", "zero")
    assert bad.returncode == 2 and "--gpus takes all or GPU indices such as 0,1, not 'zero'" in output(bad)
    nothing_started(env)


def test_under_the_users_cuda_visible_devices_gpu_counts_positions_in_it(
    tmp_path: Path, model_cache: Path
) -> None:
    env = {**stack_env(tmp_path, model_cache, "listed"), "CUDA_VISIBLE_DEVICES": "5,7"}
    result = cli(env, "worker", "--gpu", "2")
    assert result.returncode == 2
    assert output(result) == (
        "error: --gpu 2: GPU 2 is not on this machine: it has GPUs 0-1 "
        "(positions in CUDA_VISIBLE_DEVICES=5,7)"
    )
    env.pop("CUDA_VISIBLE_DEVICES")
    named = cli({**env, "WORKER_GPU": "gpu1"}, "worker")
    assert named.returncode == 2 and "WORKER_GPU must be a GPU index (0, 1, ...), not 'gpu1'" in output(named)
    nothing_started(env)


@pytest.fixture
def two_worker_stack(settings: Settings) -> Iterator[Stack]:
    """The API and a worker for "GPUs" 0 and 1, holding the data directory's lock; always stopped."""
    running = Stack(settings.model_copy(update={"heartbeat_interval_s": 1.0}), exclusive=True, gpus=[0, 1])
    try:
        running.start()
        yield running
    finally:
        running.stop()


def test_a_stack_given_gpus_starts_one_pinned_named_worker_per_gpu(two_worker_stack: Stack) -> None:
    stack = two_worker_stack
    assert (
        list(stack.workers) == ["worker-gpu0", "worker-gpu1"] and stack.worker is stack.workers["worker-gpu0"]
    )
    for gpu, (name, presence) in enumerate(stack.workers.items()):
        assert (presence.state, presence.node, presence.gpu_index) == (READY, f"{name}@{this_host()}", gpu)
        pinned = psutil.Process(stack.processes[name].pid).environ()
        assert (pinned["CUDA_VISIBLE_DEVICES"], pinned["WORKER_GPU"], pinned["CUDA_DEVICE_ORDER"]) == (
            str(gpu),
            str(gpu),
            "PCI_BUS_ID",
        )
        assert (stack.logs_dir / f"{name}.log").is_file()  # `nightrender logs worker-gpu1`
    assert stack.worker_alive()


def test_each_job_records_the_worker_and_gpu_that_rendered_it(two_worker_stack: Stack) -> None:
    settings = two_worker_stack.settings
    http = httpx.Client(base_url=settings.resolved_api_url(), timeout=30)
    body = {
        "prompts": [f"a lighthouse {i}" for i in range(6)],
        "width": 64,
        "height": 64,
        "steps": 2,
        "seed": 3,
    }
    created = http.post("/v1/batches", json=body)
    assert created.status_code == 201, created.text
    rows = finished_stats(settings, created.json()["job_ids"])
    assert [row[0] for row in rows] == ["succeeded"] * 6
    nodes = {f"worker-gpu{gpu}@{this_host()}": gpu for gpu in (0, 1)}
    for _, worker, gpu_index in rows:
        assert worker in nodes and gpu_index == nodes[worker], (worker, gpu_index)


def finished_stats(
    settings: Settings, job_ids: list[str], *, with_device: bool = False, timeout: float = 180.0
) -> list[tuple[object, ...]]:
    """Each job's status, worker and GPU index (and device UUID) once every job has finished."""
    columns = [Job.status, JobStats.worker, JobStats.gpu_index] + (
        [JobStats.device_uuid] if with_device else []
    )
    query = select(*columns).outerjoin(JobStats).where(Job.id.in_(job_ids))
    database = make_database(settings.resolved_database_url())
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with make_session_factory(database)() as session:
                rows = [tuple(row) for row in session.execute(query)]
            if all(row[0] not in ("queued", "running") for row in rows):
                return rows
            time.sleep(0.3)
        raise AssertionError(f"jobs unfinished after {timeout:.0f}s: {rows}")
    finally:
        database.dispose()


def test_the_lock_record_names_every_worker_so_a_killed_stacks_are_all_stopped(
    two_worker_stack: Stack,
) -> None:
    """What `stop` and the next `up` do after `up` was killed with kill -9: every worker is in the record."""
    stack = two_worker_stack
    record = StackLock(stack.settings.data_dir).read()
    assert record is not None and record.pid == os.getpid()
    workers = {name: stack.processes[name].pid for name in ("worker-gpu0", "worker-gpu1")}
    assert {name: record.children[name][0] for name in workers} == workers
    stopped = stop_leftovers(record)
    assert sorted(stopped) == sorted(
        f"{name} (pid {pid})" for name, pid in {**workers, "api": stack.processes["api"].pid}.items()
    )
    assert all(stack.processes[name].wait(timeout=30) is not None for name in workers)
    assert not stack.worker_alive()


def test_up_outlives_one_dead_worker_and_ends_when_none_is_left(tmp_path: Path, model_cache: Path) -> None:
    """`up --gpus 0,1` under CUDA_VISIBLE_DEVICES=0,1 (on the CPU, each "card" runs on the CPU).

    The list makes the GPUs countable here: the indices are positions in it. One worker killed: `up`
    says so and goes on with the API and the other. The last one killed: `up` stops the rest and fails.
    """
    env = {**stack_env(tmp_path, model_cache, "outlive"), "CUDA_VISIBLE_DEVICES": "0,1"}
    up = subprocess.Popen(
        [*CLI, "up", "--gpus", "0,1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    started: list[psutil.Process] = []
    try:
        wait_for_line(up, UP_READY, timeout_s=300)
        started = psutil.Process(up.pid).children(recursive=True)
        record = StackLock(Path(env["DATA_DIR"])).read()
        assert record is not None
        workers = {name: record.children[name][0] for name in ("worker-gpu0", "worker-gpu1")}
        os.kill(workers["worker-gpu1"], signal.SIGKILL)
        said = wait_for_line(up, "worker-gpu1 exited with -9", timeout_s=60)
        assert (
            "worker-gpu1 exited with -9; the other workers go on, and its jobs are requeued after "
            "HEARTBEAT_STALE_S (120s); see `nightrender logs worker-gpu1`" in said
        )
        assert up.poll() is None and psutil.pid_exists(workers["worker-gpu0"])
        assert httpx.get(f"http://127.0.0.1:{env['API_PORT']}/healthz", timeout=10).status_code == 200
        shown = output(cli(env, "logs", "-n", "5"))  # unnamed: both GPU workers' logs, each under its name
        assert "==> worker-gpu0.log <==" in shown and "==> worker-gpu1.log <==" in shown
        os.kill(workers["worker-gpu0"], signal.SIGKILL)
        assert up.wait(timeout=120) == 2
        assert up.stdout is not None
        ended = " ".join(up.stdout.read().split())
        assert "error: every worker exited (worker-gpu0 with -9, worker-gpu1 with -9)" in ended
        _, alive = psutil.wait_procs(started, timeout=30)
        assert [p.cmdline() for p in alive] == []
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(timeout=30)
        for process in started:
            if process.is_running():
                process.kill()


@no_cuda_only
def test_run_with_gpus_renders_the_batch_on_a_worker_per_gpu(tmp_path: Path, model_cache: Path) -> None:
    """The main job on two "cards": `run --gpus all` under CUDA_VISIBLE_DEVICES=0,1 (each runs on the CPU
    here) starts a worker per GPU, both render part of the batch, and every image is downloaded once."""
    env = {**stack_env(tmp_path, model_cache, "run-gpus"), "CUDA_VISIBLE_DEVICES": "0,1"}
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"two cards {index}\n" for index in range(8)))
    out = tmp_path / "renders"
    done = cli(env, "run", str(prompts), "--gpus", "all", "--sizes", "64", "--steps", "2",
               "--out", str(out), timeout=300)  # fmt: skip
    said = output(done)
    assert done.returncode == 0, said
    assert "2 workers, one per GPU" in said and "8 of 8 images" in said
    database = make_database(f"sqlite:///{Path(env['DATA_DIR']) / 'nightrender.db'}")
    try:
        with make_session_factory(database)() as session:
            rows = session.execute(select(JobStats.worker, JobStats.gpu_index)).all()
    finally:
        database.dispose()
    assert len(rows) == 8
    assert {(worker.split("@")[0], gpu) for worker, gpu in rows} == {("worker-gpu0", 0), ("worker-gpu1", 1)}
    assert len(list(out.rglob("*.png"))) == 8
    assert not (Path(env["DATA_DIR"]) / "stack.json").exists()  # run stopped what it started


@pytest.mark.gpu
@two_gpus_only
def test_up_with_two_gpus_puts_a_worker_on_each_card(tmp_path: Path, model_cache: Path) -> None:
    env = stack_env(tmp_path, model_cache, "gpus")
    up = subprocess.Popen(
        [*CLI, "up", "--gpus", "0,1"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        printed = " ".join(wait_for_line(up, UP_READY, timeout_s=300).split())
        started = psutil.Process(up.pid).children(recursive=True)
        for gpu in (0, 1):
            assert (
                f"worker ready: worker-gpu{gpu}, synthetic:tiny" in printed and f"on GPU {gpu} (" in printed
            )
        settings = Settings(database_url=f"sqlite:///{Path(env['DATA_DIR']) / 'nightrender.db'}")
        database = make_database(settings.resolved_database_url())
        try:
            with make_session_factory(database)() as session:
                ready = session.scalars(select(WorkerPresence).where(WorkerPresence.state == READY)).all()
        finally:
            database.dispose()
        assert sorted((w.node.split("@")[0], w.gpu_index) for w in ready) == [
            ("worker-gpu0", 0),
            ("worker-gpu1", 1),
        ]
        uuids = {w.device_uuid for w in ready}
        assert len(uuids) == 2 and all(u and u.startswith("GPU-") for u in uuids)  # two distinct cards
        body = {"prompts": [f"a lighthouse {i}" for i in range(8)], "width": 64, "height": 64, "steps": 2}
        created = httpx.post(f"http://127.0.0.1:{env['API_PORT']}/v1/batches", json=body, timeout=30)
        assert created.status_code == 201, created.text
        rows = finished_stats(settings, created.json()["job_ids"], with_device=True)
        cards: dict[object, object] = {w.gpu_index: w.device_uuid for w in ready}
        assert all(status == "succeeded" and uuid == cards[gpu] for status, _, gpu, uuid in rows), rows
        info = output(cli(env, "info"))
        assert info.count("│ ready │ synthetic:tiny │") == 2
        up.send_signal(signal.SIGINT)
        assert up.wait(timeout=120) == 0
        _, alive = psutil.wait_procs(started, timeout=30)
        assert [p.cmdline() for p in alive] == []
    finally:
        if up.poll() is None:
            for child in psutil.Process(up.pid).children(recursive=True):
                child.kill()
            up.kill()
            up.wait(timeout=30)


# A worker's memory probe, pinned to one card: NVML (which numbers every card of the machine) against CUDA.
PINNED_MEMORY = """
import json, torch
from worker.engine import memory
device = torch.device("cuda", 0)
block = torch.empty(4 * 2**30, dtype=torch.uint8, device=device)
free, total = torch.cuda.mem_get_info(device)
nvml, uuid = memory._nvml_memory(0), memory.device_uuid(device)
print(json.dumps({"nvml_used": nvml and nvml.used, "cuda_used": total - free, "uuid": uuid}))
"""


@pytest.mark.gpu
@two_gpus_only
def test_a_worker_pinned_to_the_second_card_measures_that_card() -> None:
    """CUDA's device 0 of a worker pinned to card 1 is NVML's card 1: memory is read by the card's UUID."""
    result = subprocess.run(
        [sys.executable, "-c", PINNED_MEMORY],
        env={**os.environ, **worker_env(1)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    seen = json.loads(result.stdout.splitlines()[-1])
    assert seen["nvml_used"] is not None and seen["cuda_used"] > 4 * 2**30
    assert abs(seen["nvml_used"] - seen["cuda_used"]) < 2**30, seen  # card 0 holds none of the 4 GiB
    assert seen["uuid"].startswith("GPU-")
