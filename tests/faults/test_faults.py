"""Fault injection with real processes: nothing lost, nothing done twice.

Each case runs the API (with its reconciler) and Celery workers as real processes against real
PostgreSQL and a private Redis with AOF, renders synthetic:tiny, injects a fault, and then checks that
every job ended `succeeded` exactly once with one image and one stats row, and no orphan file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobs.queue import Publication, Publisher
from jobs.settings import Settings
from tests.faults.harness import FaultStack, PrivateRedis, assert_exactly_once, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.parametrize("empty_database_url", ["postgres"], indirect=True)]
# About a second per job on a CPU: long enough to be caught mid-job.
SLOW = {"width": 192, "height": 192, "steps": 80}
FAST = {"width": 64, "height": 64, "steps": 2}
SHARED = {"width": 128, "height": 128, "steps": 20}  # a few tenths of a second: both workers get some
COUNTS: dict[str, dict[str, int]] = {}


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """A Redis these tests may wipe and restart."""
    server = PrivateRedis(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def fault_settings(settings: Settings, redis_url: str, **overrides: object) -> Settings:
    """Short heartbeats and a fast reconciler, so recovery takes seconds instead of minutes."""
    return settings.model_copy(
        update={
            "redis_url": redis_url,
            "heartbeat_interval_s": 0.5,
            "heartbeat_stale_s": 3.0,
            "reconcile_interval_s": 0.5,
            "republish_after_s": 3.0,
            "max_attempts": 10,
            "fault_exit_on_prompt": "POISON-PILL",
            **overrides,
        }
    )


@pytest.fixture
def make_stack(settings: Settings, private_redis: PrivateRedis) -> Iterator[object]:
    """Build and start a fault stack; stopped at the end of the test."""
    stacks: list[FaultStack] = []

    def build(workers: int = 1, **overrides: object) -> FaultStack:
        stack = FaultStack(fault_settings(settings, private_redis.url, **overrides))
        stacks.append(stack)
        stack.start(workers)
        return stack

    yield build
    for stack in stacks:
        stack.stop()


def record(case: str, counts: dict[str, int]) -> None:
    """Keep each case's counts; they are printed at the end (and go into the closing note)."""
    COUNTS[case] = counts
    print(f"\nFAULT {case}: {json.dumps(counts)}")


def test_kill_9_the_worker_mid_job_ten_times(make_stack: object) -> None:
    """kill -9 the worker while it renders, ten times over one batch; a supervisor restarts it."""
    stack: FaultStack = make_stack()  # type: ignore[operator]
    job_ids = stack.submit([f"kill test {i}" for i in range(14)], **SLOW)
    kills = 0
    while kills < 10:
        wait_until(lambda: bool(stack.running(job_ids)), 120, "a running job")
        time.sleep(0.3)  # mid-job, not at its first step
        stack.kill("w0")
        kills += 1
        stack.start_worker("w0")
    stack.wait_finished(job_ids)
    counts = assert_exactly_once(stack, job_ids)
    assert counts["attempts"] >= len(job_ids) + 1  # killed jobs really ran again
    record("kill -9 mid-job", {**counts, "kills": kills, "duplicates": 0})


def test_two_workers_share_a_batch(make_stack: object) -> None:
    """Two workers of one model split a batch: each renders some of it (its stats row names it), and each
    job runs once. Fair group claims leave the other worker its share (jobs.ordering.fair_groupmates)."""
    stack: FaultStack = make_stack(workers=2)  # type: ignore[operator]
    job_ids = stack.submit([f"spread {i}" for i in range(12)], **SHARED)
    stack.wait_finished(job_ids, supervise=False)
    counts = assert_exactly_once(stack, job_ids)
    assert counts["attempts"] == len(job_ids)
    rendered = stack.rendered_by(job_ids)
    per_worker = {name: list(rendered.values()).count(name) for name in stack.workers}
    assert set(rendered.values()) == {"w0", "w1"}, per_worker
    record("two workers share a batch", {**counts, **per_worker, "duplicates": 0})


def test_kill_9_one_of_two_workers_the_other_finishes_its_jobs(make_stack: object) -> None:
    """kill -9 one of two workers mid-job and never restart it: the reconciler requeues the jobs it held
    (its running job and any groupmates waiting behind it), and the surviving worker renders each once."""
    stack: FaultStack = make_stack(workers=2)  # type: ignore[operator]
    job_ids = stack.submit([f"survivor {i}" for i in range(8)], **SLOW)
    wait_until(lambda: running_worker(stack, job_ids) is not None, 120, "a worker running a job")
    time.sleep(0.3)  # mid-job, not at its first step
    victim = running_worker(stack, job_ids)
    assert victim is not None
    stack.kill(victim)
    held = {job for job, status in stack.statuses(job_ids).items() if status == "running"}
    orphans = stack.claimed_by(victim) & held  # claimed by the dead worker and never finished
    survivor = next(name for name in stack.workers if name != victim)
    stack.wait_finished(job_ids, supervise=False)
    assert stack.stack.processes[victim].poll() is not None  # nobody restarted it
    counts = assert_exactly_once(stack, job_ids)
    assert orphans, "the worker was killed holding no job"
    rendered = stack.rendered_by(job_ids)
    assert {rendered[job] for job in orphans} == {survivor}
    assert (
        min(stack.attempts(sorted(orphans)).values()) >= 2
    )  # the dead worker's attempt, then the survivor's
    record("kill -9 one of two workers", {**counts, "orphans_recovered": len(orphans), "duplicates": 0})


def running_worker(stack: FaultStack, job_ids: list[str]) -> str | None:
    """A worker that has claimed a job now running (its log names the claim), or None."""
    running = set(stack.running(job_ids))
    return next((name for name in stack.workers if stack.claimed_by(name) & running), None)


def test_flushall_with_200_jobs_queued(make_stack: object, private_redis: PrivateRedis) -> None:
    """Redis loses every message (FLUSHALL) with 200 jobs queued: the reconciler republishes from SQL."""
    stack: FaultStack = make_stack()  # type: ignore[operator]
    job_ids = stack.submit([f"flush test {i}" for i in range(220)], **FAST)
    wait_until(lambda: list(stack.statuses(job_ids).values()).count("succeeded") >= 5, 120, "a few done")
    queued = list(stack.statuses(job_ids).values()).count("queued")
    assert queued >= 200
    private_redis.client().flushall()
    stack.wait_finished(job_ids, timeout=400)
    counts = assert_exactly_once(stack, job_ids)
    record("FLUSHALL", {**counts, "queued_when_wiped": queued, "duplicates": 0})


def test_redis_restart_mid_batch(make_stack: object, private_redis: PrivateRedis) -> None:
    """Redis stops and starts again mid-batch: the AOF keeps the queue and the worker reconnects."""
    stack: FaultStack = make_stack()  # type: ignore[operator]
    job_ids = stack.submit([f"redis restart {i}" for i in range(30)], **{**FAST, "steps": 20})
    wait_until(lambda: list(stack.statuses(job_ids).values()).count("succeeded") >= 3, 120, "a few done")
    private_redis.stop()
    time.sleep(2)
    private_redis.start()
    stack.wait_finished(job_ids)
    record("Redis restart", {**assert_exactly_once(stack, job_ids), "restarts": 1, "duplicates": 0})


def test_the_same_message_twice(make_stack: object) -> None:
    """Every job's message is delivered twice: one claim wins, the other is acknowledged as a skip."""
    stack: FaultStack = make_stack()  # type: ignore[operator]
    stack.http.post("/v1/queue/pause", json={})
    job_ids = stack.submit([f"duplicate {i}" for i in range(10)], **FAST)
    stack.http.post("/v1/queue/resume", json={})
    publisher = Publisher(stack.settings)
    model = stack.settings.resolved_worker_model()  # the jobs' model (FAST names none)
    publisher.publish([Publication(job_id=job_id, priority=0, model=model) for job_id in job_ids])
    stack.wait_finished(job_ids)
    # The broker's own state: no message for these jobs is waiting or delivered and unacknowledged.
    wait_until(lambda: not set(job_ids) & publisher.live_job_ids(), 60, "every message to be acknowledged")
    counts = assert_exactly_once(stack, job_ids)
    # One claim per job (SQL's attempts) for two messages each: every extra delivery was acknowledged
    # without a claim, and none rendered twice.
    assert counts["attempts"] == len(job_ids)
    record("duplicate delivery", {**counts, "extra_messages": len(job_ids), "duplicates": 0})


def test_visibility_timeout_shorter_than_a_job(make_stack: object) -> None:
    """Redis redelivers messages of jobs still running (V = 1 s): the running claim refuses the copy."""
    stack: FaultStack = make_stack(workers=2, visibility_timeout_s=1)  # type: ignore[operator]
    job_ids = stack.submit([f"visibility {i}" for i in range(8)], **SLOW)
    stack.wait_finished(job_ids)
    counts = assert_exactly_once(stack, job_ids)
    assert counts["attempts"] == len(job_ids)
    # Reported, not asserted: a refused redelivery leaves no state in SQL or the broker, only a log line.
    record(
        "visibility timeout < job", {**counts, "skipped_redeliveries": stack.worker_logs().count(": skipped")}
    )


def test_poison_job_fails_after_max_attempts_and_the_queue_drains(make_stack: object) -> None:
    """A job that kills its worker every time fails after max_attempts; the jobs behind it all finish."""
    stack: FaultStack = make_stack(max_attempts=3)  # type: ignore[operator]
    poison = stack.submit(["POISON-PILL"], **FAST)
    healthy = stack.submit([f"healthy {i}" for i in range(6)], **FAST)
    statuses = stack.wait_finished(poison + healthy, timeout=300)
    assert statuses[poison[0]] == "failed"
    detail = stack.http.get(f"/v1/jobs/{poison[0]}").json()
    assert detail["attempts"] == 3 and detail["error"] == "worker lost"
    counts = assert_exactly_once(stack, healthy)
    record("poison job", {**counts, "poison_attempts": detail["attempts"], "duplicates": 0})


def test_a_worker_dying_between_render_and_write_loses_nothing(make_stack: object) -> None:
    """The worker exits after rendering a job and before its writer stores it: the job is still running,
    its heartbeat stops, the reconciler requeues it and a restarted worker renders and stores it once."""
    stack: FaultStack = make_stack(fault_exit_before_write="DIE-BEFORE-WRITE")  # type: ignore[operator]
    marked = stack.submit(["DIE-BEFORE-WRITE once"], **FAST)
    others = stack.submit([f"behind it {i}" for i in range(4)], **FAST)
    stack.wait_finished(marked + others, timeout=300)
    counts = assert_exactly_once(stack, marked + others)
    detail = stack.http.get(f"/v1/jobs/{marked[0]}").json()
    assert detail["attempts"] == 2  # the first attempt rendered but never wrote; the second stored it
    record(
        "exit between render and write", {**counts, "marked_attempts": detail["attempts"], "duplicates": 0}
    )


def test_sigstop_past_the_heartbeat_window_refuses_the_stale_result(make_stack: object) -> None:
    """A frozen worker loses its lease; after SIGCONT its late result is refused and its file removed."""
    stack: FaultStack = make_stack(workers=2)  # type: ignore[operator]
    job_ids = stack.submit([f"freeze {i}" for i in range(4)], **SLOW)
    wait_until(lambda: bool(stack.running(job_ids)), 120, "a running job")

    def worker_running_a_job() -> str | None:
        # The claim commits a moment before its log line: look until a worker owns a running job.
        running = stack.running(job_ids)
        for name in stack.workers:
            if running and f"claimed job {running[0]}" in stack.stack.log_tail(name, 100_000):
                return str(name)
        return None

    wait_until(lambda: worker_running_a_job() is not None, 60, "the worker of a running job")
    frozen = worker_running_a_job()
    assert frozen is not None
    stack.signal(frozen, signal.SIGSTOP)
    time.sleep(stack.settings.heartbeat_stale_s + 3)  # the reconciler takes the job back
    stack.signal(frozen, signal.SIGCONT)
    stack.wait_finished(job_ids, supervise=False)
    wait_until(lambda: "lease lost" in stack.stack.log_tail(frozen, 100_000), 60, "the stale result refused")
    counts = assert_exactly_once(stack, job_ids)
    record("SIGSTOP past the heartbeat", {**counts, "stale_results_refused": 1, "duplicates": 0})


def restart_postgres() -> None:
    """Restart the machine's PostgreSQL cluster (as CI's setup starts it)."""
    version = sorted(Path("/etc/postgresql").iterdir())[0].name
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
        check=True,
        capture_output=True,
        timeout=120,
    )


@pytest.mark.skipif(
    shutil.which("pg_ctlcluster") is None or os.geteuid() != 0,
    reason="needs root and pg_ctlcluster to restart PostgreSQL",
)
def test_postgres_restart_mid_batch(make_stack: object) -> None:
    """PostgreSQL restarts mid-batch: the worker retries its writes, the API recovers, nothing is lost."""
    stack: FaultStack = make_stack()  # type: ignore[operator]
    job_ids = stack.submit([f"postgres restart {i}" for i in range(30)], **{**FAST, "steps": 20})
    wait_until(lambda: list(stack.statuses(job_ids).values()).count("succeeded") >= 3, 120, "a few done")
    restart_postgres()
    stack.wait_finished(job_ids)
    retried = stack.worker_logs().count("database unavailable")
    record(
        "PostgreSQL restart",
        {
            **assert_exactly_once(stack, job_ids),
            "restarts": 1,
            "worker_write_retries": retried,
            "duplicates": 0,
        },
    )


def test_sigterm_is_a_warm_shutdown(make_stack: object) -> None:
    """SIGTERM mid-job lets the job finish before the worker exits; a restarted worker does the rest."""
    stack: FaultStack = make_stack()  # type: ignore[operator]
    job_ids = stack.submit([f"sigterm {i}" for i in range(3)], **SLOW)
    wait_until(lambda: bool(stack.running(job_ids)), 120, "a running job")
    running = stack.running(job_ids)[0]
    stack.signal("w0", signal.SIGTERM)
    stack.stack.processes["w0"].wait(120)
    assert stack.statuses([running])[running] == "succeeded"
    stack.wait_finished(job_ids)
    record("SIGTERM warm shutdown", {**assert_exactly_once(stack, job_ids), "duplicates": 0})
