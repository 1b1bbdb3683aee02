"""Service tests of the worker's JobRunner: a real SQLite database, a real EngineHolder, the tiny model.

Faults are injected only through real torch forward hooks on the loaded pipeline's transformer; every
hook a test adds is removed before it ends.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker
from torch import nn

from jobs.controls import set_paused
from jobs.db import transaction
from jobs.filenames import prompt_slug
from jobs.lifecycle import request_cancel
from jobs.params import GenerationParams
from jobs.results import result_file
from jobs.settings import Settings
from jobs.submit import insert_job, mark_published
from jobs.tables import Job, JobStats
from worker.outputs import png_metadata
from worker.runner import EngineHolder, JobRunner

pytestmark = pytest.mark.parametrize("empty_database_url", ["sqlite"], indirect=True)

TINY = "synthetic:tiny"


def params(dtype: str = "bf16") -> GenerationParams:
    """A small, fast job on the tiny synthetic model."""
    return GenerationParams(
        prompt="a lighthouse on a cliff",
        width=64,
        height=64,
        steps=2,
        guidance_scale=0.0,
        seed=11,
        model=TINY,
        dtype=dtype,  # type: ignore[arg-type]
    )


@pytest.fixture
def holder(settings: Settings) -> EngineHolder:
    """A real engine holder on the test's settings (CPU, auto placement)."""
    return EngineHolder(settings)


@pytest.fixture
def runner(settings: Settings, factory: sessionmaker[Session], holder: EngineHolder) -> Iterator[JobRunner]:
    """The real job runner over the test's database and holder; its threads stop after the test."""
    job_runner = JobRunner(settings, factory, holder)
    yield job_runner
    job_runner.close()


def run_to_end(runner: JobRunner, job_id: str) -> str:
    """Run a message's job and wait until the image writer has stored what was rendered."""
    outcome = runner.run(job_id)
    runner.drain()
    return outcome


def new_job(factory: sessionmaker[Session], dtype: str = "bf16") -> str:
    """Insert one queued job and return its id."""
    with transaction(factory) as session:
        return insert_job(session, params=params(dtype), priority=0, max_attempts=3).job_ids[0]


def job_row(factory: sessionmaker[Session], job_id: str) -> Job:
    """The job's row, read in a fresh session."""
    with factory() as session:
        return session.get_one(Job, job_id)


def stats_row(factory: sessionmaker[Session], job_id: str) -> JobStats | None:
    """The job's stats row, if any."""
    with factory() as session:
        return session.get(JobStats, job_id)


def stored_plan(factory: sessionmaker[Session], job_id: str) -> dict[str, Any]:
    """The job's stored record (the JSON plan column)."""
    stats = stats_row(factory, job_id)
    assert stats is not None and stats.plan is not None
    return stats.plan


def nan_like(value: Any) -> Any:
    """The same structure with every tensor replaced by NaNs."""
    if isinstance(value, torch.Tensor):
        return torch.full_like(value, float("nan"))
    if isinstance(value, (tuple, list)):
        return type(value)(nan_like(item) for item in value)
    return value


def files_under(folder: Path) -> list[Path]:
    """Every file below a folder (none if it does not exist)."""
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def test_normal_job_succeeds_with_png_and_stats(
    runner: JobRunner, factory: sessionmaker[Session], settings: Settings
) -> None:
    """A bf16 job renders resident, stores a PNG named by seed and prompt, and a plan ending in ok."""
    job_id = new_job(factory)
    assert run_to_end(runner, job_id) == "rendered"
    job = job_row(factory, job_id)
    assert job.status == "succeeded" and job.attempts == 1 and job.error is None
    path = result_file(settings.resolved_outputs_dir(), job.result_path)
    assert path is not None  # recorded relative to OUTPUTS_DIR, so another machine finds it too
    assert not Path(job.result_path or "").is_absolute()
    assert path.is_file() and path.suffix == ".png"
    assert path.parent == settings.resolved_outputs_dir() / "single"
    assert path.name == f"{job.seed}-{prompt_slug(job.prompt)}-{(job.lease_token or '')[:8]}.png"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (64, 64)
        assert json.loads(image.text["nightrender"])["job_id"] == job_id  # type: ignore[attr-defined]
        assert f"Seed: {job.seed}, Size: 64x64" in image.text["parameters"]  # type: ignore[attr-defined]
    stats = stats_row(factory, job_id)
    assert stats is not None and (stats.rung, stats.oom_attempts) == ("resident", 0)
    plan = stored_plan(factory, job_id)
    assert plan["rung"] == "resident" and plan["predicted_peak_bytes"] == stats.predicted_peak_bytes
    assert plan["attempts"] and plan["attempts"][-1]["outcome"] == "ok"
    assert "notes" not in plan


def test_a_killed_attempts_half_written_file_goes_when_the_job_succeeds(
    runner: JobRunner, factory: sessionmaker[Session], settings: Settings
) -> None:
    """A worker killed mid-write left a `.tmp` file, or between rename and commit a PNG, forever.

    The attempt that commits the job's image removes both; files of other jobs stay, even under the
    same name stem (same seed and prompt).
    """
    job_id, other_id = new_job(factory), str(uuid.uuid4())  # the other: a job of another worker
    with factory() as session:
        job = session.get_one(Job, job_id)
        stem, job_params = f"{job.seed}-{prompt_slug(job.prompt)}", params()
    folder = settings.resolved_outputs_dir() / "single"
    folder.mkdir(parents=True)
    dead_tmp = folder / f".{job_id}-0badlease.tmp"  # a kill -9 during the PNG write
    dead_png = folder / f"{stem}-0badlea5.png"  # a kill -9 between the rename and the commit
    others_tmp, others_png = folder / f".{other_id}-5omeone.tmp", folder / f"{stem}-5omeone0.png"
    dead_tmp.write_bytes(b"half a png")
    others_tmp.write_bytes(b"another job's write in progress")
    image = Image.new("RGB", (8, 8))
    image.save(dead_png, pnginfo=png_metadata(job_id, job_params))
    image.save(others_png, pnginfo=png_metadata(other_id, job_params))
    assert run_to_end(runner, job_id) == "rendered"
    result = result_file(settings.resolved_outputs_dir(), job_row(factory, job_id).result_path)
    assert result is not None
    assert sorted(files_under(folder)) == sorted([result, others_tmp, others_png])


def test_fp16_nan_output_is_rendered_again_in_bf16(
    runner: JobRunner, holder: EngineHolder, factory: sessionmaker[Session], settings: Settings
) -> None:
    """NaN from the fp16 transformer makes the runner render again in bf16 and note the retry."""
    job_id = new_job(factory, dtype="fp16")
    fp16, _load_s = holder.get(TINY, "fp16")
    calls = 0

    def poison(_module: nn.Module, _args: Any, output: Any) -> Any:
        nonlocal calls
        calls += 1
        return nan_like(output)

    handle = fp16.loaded.pipeline.transformer.register_forward_hook(poison)
    try:
        assert run_to_end(runner, job_id) == "rendered"
    finally:
        handle.remove()
    assert calls > 0  # the fault was really injected
    job = job_row(factory, job_id)
    assert job.status == "succeeded" and result_file(settings.resolved_outputs_dir(), job.result_path)
    plan = stored_plan(factory, job_id)
    assert "bf16" in plan["notes"]["retry"]
    assert "warnings" not in plan["notes"]  # the bf16 render was fine
    assert plan["attempts"][-1]["outcome"] == "ok"
    assert holder.engine is not None and holder.engine is not fp16
    assert holder.engine.loaded.dtype == "bf16"
    assert holder.loads == 2


def test_bad_bf16_output_is_kept_with_a_warning(
    runner: JobRunner, holder: EngineHolder, factory: sessionmaker[Session]
) -> None:
    """NaN output in bf16 has nothing to fall back to: the job succeeds and its record warns of it."""
    job_id = new_job(factory)
    bf16, _load_s = holder.get(TINY, "bf16")
    handle = bf16.loaded.pipeline.transformer.register_forward_hook(lambda _m, _a, output: nan_like(output))
    try:
        assert run_to_end(runner, job_id) == "rendered"
    finally:
        handle.remove()
    assert job_row(factory, job_id).status == "succeeded"
    assert stored_plan(factory, job_id)["notes"] == {"warnings": ["output is NaN or black"]}


def test_exhausted_ladder_fails_the_job_and_the_worker_lives_on(
    runner: JobRunner, holder: EngineHolder, factory: sessionmaker[Session]
) -> None:
    """OOM on every rung fails the job as resource_exhausted with every attempt listed; the next job runs."""
    job_id = new_job(factory)
    engine, _load_s = holder.get(TINY, "bf16")
    rungs = [plan.rung for plan in engine.ladder(64, 64)]

    def out_of_memory(_module: nn.Module, _args: Any) -> None:
        raise torch.cuda.OutOfMemoryError("injected")

    handle = engine.loaded.pipeline.transformer.register_forward_pre_hook(out_of_memory)
    try:
        assert run_to_end(runner, job_id) == "failed"
    finally:
        handle.remove()
    job = job_row(factory, job_id)
    assert job.status == "failed" and job.result_path is None
    assert job.error is not None and job.error.startswith("resource_exhausted")
    stats = stats_row(factory, job_id)
    assert stats is not None and stats.rung == "exhausted" and stats.device_name == "cpu"
    assert stats.oom_attempts == len(rungs)
    plan = stored_plan(factory, job_id)
    assert plan["rung"] == "exhausted"
    assert [a["rung"] for a in plan["attempts"]] == rungs
    assert all(a["outcome"].startswith("out of memory") for a in plan["attempts"])
    assert all("injected" in a["outcome"] for a in plan["attempts"])

    after = new_job(factory)
    assert run_to_end(runner, after) == "rendered"
    assert job_row(factory, after).status == "succeeded"
    assert holder.loads == 1  # the same holder engine carried on; nothing was reloaded through the holder


def test_job_cancelled_before_claim_is_skipped(
    runner: JobRunner, factory: sessionmaker[Session], settings: Settings
) -> None:
    """A job cancelled while queued is skipped and writes no image."""
    job_id = new_job(factory)
    with transaction(factory) as session:
        assert request_cancel(session, job_ids=[job_id]) == 1
    assert runner.run(job_id) == "skipped"
    job = job_row(factory, job_id)
    assert job.status == "cancelled" and job.attempts == 0 and job.result_path is None
    assert stats_row(factory, job_id) is None
    assert files_under(settings.resolved_outputs_dir()) == []


def test_paused_queue_hands_the_job_back(
    runner: JobRunner, holder: EngineHolder, factory: sessionmaker[Session], settings: Settings
) -> None:
    """While paused the job stays queued, unpublished and unattempted, and nothing is loaded or written."""
    job_id = new_job(factory)
    mark_published(factory, [job_id])
    assert job_row(factory, job_id).published_at is not None
    with transaction(factory) as session:
        set_paused(session, True)
    assert runner.run(job_id) == "paused"
    job = job_row(factory, job_id)
    assert job.status == "queued" and job.published_at is None
    assert job.attempts == 0 and job.lease_token is None and job.started_at is None
    assert holder.loads == 0
    assert files_under(settings.resolved_outputs_dir()) == []


def test_queued_jobs_share_one_text_encoder_pass(runner: JobRunner, factory: sessionmaker[Session]) -> None:
    """One message renders its job and claims compatible queued ones; their own messages are then skipped."""
    ids = [new_job(factory) for _ in range(3)]
    assert run_to_end(runner, ids[0]) == "rendered (+2 grouped)"
    for job_id in ids:
        assert job_row(factory, job_id).status == "succeeded"
        assert stored_plan(factory, job_id)["notes"] == {"group": 3}
    assert runner.run(ids[1]) == "skipped"


def test_a_retried_job_runs_alone(runner: JobRunner, factory: sessionmaker[Session]) -> None:
    """A job that already used an attempt (it may have crashed a worker) waits behind fresh jobs of its
    priority, and neither groups nor is grouped."""
    crashed, fresh = new_job(factory), new_job(factory)
    with transaction(factory) as session:
        session.execute(update(Job).where(Job.id == crashed).values(attempts=1))
    assert run_to_end(runner, crashed) == "rendered"  # the message wakes the worker; fresh work goes first
    assert job_row(factory, fresh).status == "succeeded"
    assert job_row(factory, crashed).status == "queued"
    assert "notes" not in stored_plan(factory, fresh)
    assert run_to_end(runner, crashed) == "rendered"
    assert job_row(factory, crashed).status == "succeeded" and job_row(factory, crashed).attempts == 2
    assert "notes" not in stored_plan(factory, crashed)


def test_an_odd_size_job_waits_at_most_the_reorder_wait(
    settings: Settings, factory: sessionmaker[Session], holder: EngineHolder
) -> None:
    """Same-size jobs go ahead of an older odd-size job, but only for MAX_REORDER_WAIT_S past its turn."""
    wait_s = 0.15  # a tiny job takes about 0.04 s here: twenty of them outlast the wait
    runner = JobRunner(
        settings.model_copy(update={"max_reorder_wait_s": wait_s, "encode_group_size": 1}), factory, holder
    )
    try:
        assert run_to_end(runner, new_job(factory)) == "rendered"  # the worker now prefers 64x64
        odd = insert_sized(factory, 64, 96)
        usual = [insert_sized(factory, 64, 64) for _ in range(20)]
        order: list[str] = []
        for _ in range(60):  # one message per job would do; spare wake-ups are skipped
            if len(order) == 21:
                break
            runner.run(odd)  # any message wakes the worker; it picks by priority, size and wait
            runner.drain()
            order = finished_in_order(factory, [odd, *usual])
    finally:
        runner.close()
    position = order.index(odd)
    assert 0 < position < len(order) - 1, order  # passed over, then run before the others were done
    with factory() as session:
        first_passed = session.get_one(Job, order[0]).started_at
        odd_started = session.get_one(Job, odd).started_at
    assert first_passed is not None and odd_started is not None
    # It started within the wait (plus the one job that was running when the wait ran out).
    longest_job = max(job_seconds(factory, job_id) for job_id in order[:position])
    assert (odd_started - first_passed).total_seconds() <= wait_s + longest_job + 0.5


def insert_sized(factory: sessionmaker[Session], width: int, height: int) -> str:
    """Insert one queued tiny job of this size."""
    job = params().model_copy(update={"width": width, "height": height})
    with transaction(factory) as session:
        return insert_job(session, params=job, priority=0, max_attempts=3).job_ids[0]


def finished_in_order(factory: sessionmaker[Session], job_ids: list[str]) -> list[str]:
    """These jobs that succeeded, in the order they started."""
    with factory() as session:
        rows = session.scalars(select(Job).where(Job.id.in_(job_ids), Job.status == "succeeded")).all()
        return [row.id for row in sorted(rows, key=lambda row: row.started_at or row.created_at)]


def job_seconds(factory: sessionmaker[Session], job_id: str) -> float:
    """Wall seconds from a job's claim to its commit."""
    with factory() as session:
        job = session.get_one(Job, job_id)
        assert job.started_at is not None and job.finished_at is not None
        return (job.finished_at - job.started_at).total_seconds()
