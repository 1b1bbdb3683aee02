"""Fair sharing between the workers of one model: a worker claims only its model's jobs, and a group
claim never takes work that another idle worker would have started sooner (jobs.ordering.fair_groupmates).

Real JobRunners render the tiny model on a real database; the other workers are their presence rows,
as jobs.serving counts them.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from jobs.db import transaction
from jobs.ordering import claimable_count, fair_groupmates
from jobs.params import GenerationParams
from jobs.presence import announce_worker, mark_ready
from jobs.settings import Settings
from jobs.submit import insert_batch
from jobs.tables import Job, JobStats
from tests.conftest import BACKENDS
from worker.holder import EngineHolder
from worker.runner import JobRunner

# Every test with a database runs on both backends.
ON_BOTH_BACKENDS = pytest.mark.parametrize("empty_database_url", BACKENDS, indirect=True)

MODEL, OTHER_MODEL = "synthetic:tiny", "synthetic:full"  # the runner's model, and one it does not serve
GROUP_SIZE = 4  # ENCODE_GROUP_SIZE: a claim adds at most 3 groupmates


@pytest.fixture
def runner(settings: Settings, factory: sessionmaker[Session]) -> Iterator[JobRunner]:
    """A real job runner serving MODEL, named w0; its threads stop after the test."""
    grouping = settings.model_copy(update={"encode_group_size": GROUP_SIZE, "worker_model": MODEL})
    job_runner = JobRunner(grouping, factory, EngineHolder(grouping), identity={"worker": "w0@test"})
    yield job_runner
    job_runner.close()


def ready_workers(factory: sessionmaker[Session], count: int, model: str = MODEL) -> None:
    """Presence rows of `count` workers of `model` that are ready and beating now."""
    with factory() as session:
        for index in range(count):
            node = f"{model}-{index}@test"
            worker_id = announce_worker(session, node=node, model=model, dtype="bf16", offload_mode="auto")
            mark_ready(session, worker_id=worker_id, device_name="cpu", vram_budget_bytes=None)


def queue(factory: sessionmaker[Session], count: int, model: str = MODEL, priority: int = 0) -> list[str]:
    """One batch of `count` tiny jobs that can share an encoder pass; their ids in queue order."""
    params = GenerationParams(
        prompt="a lighthouse on a cliff", width=64, height=64, steps=2, seed=3, model=model, dtype="bf16"
    )
    with transaction(factory) as session:
        return insert_batch(session, params=[params] * count, priority=priority, max_attempts=3).job_ids


def statuses(factory: sessionmaker[Session], job_ids: list[str]) -> list[str]:
    """The jobs' statuses, in the order given."""
    with factory() as session:
        found = dict(session.execute(select(Job.id, Job.status).where(Job.id.in_(job_ids))).tuples().all())
    return [found[job_id] for job_id in job_ids]


def run_to_end(runner: JobRunner, job_id: str) -> str:
    """Run a message's job and wait until what was rendered is stored."""
    outcome = runner.run(job_id)
    runner.drain()
    return outcome


@pytest.mark.parametrize(
    ("queued", "workers", "expected"),
    [
        (2, 1, 2),  # one worker: every compatible job, as before there were many
        (9, 1, 3),  # ... up to ENCODE_GROUP_SIZE - 1
        (2, 0, 2),  # no presence row read yet: the claimer itself still counts
        (2, 2, 1),  # two workers, two jobs left: one each
        (1, 2, 0),  # the last job is the other worker's
        (7, 2, 3),
        (5, 3, 1),
        (0, 4, 0),
    ],
)
def test_the_rule_leaves_each_other_worker_as_many_jobs_as_the_group_takes(
    queued: int, workers: int, expected: int
) -> None:
    taken = fair_groupmates(queued=queued, workers=workers, max_groupmates=GROUP_SIZE - 1)
    assert taken == expected
    others = max(workers, 1) - 1
    assert queued - taken >= taken * others  # what is left gives each other worker its share


@ON_BOTH_BACKENDS
def test_two_ready_workers_and_three_queued_a_claim_takes_one_groupmate(
    runner: JobRunner, factory: sessionmaker[Session]
) -> None:
    """Two jobs remain after the first claim: one joins the group, one is left for the other worker."""
    ready_workers(factory, 2)
    ids = queue(factory, 3)
    assert run_to_end(runner, ids[0]) == "rendered (+1 grouped)"
    assert statuses(factory, ids) == ["succeeded", "succeeded", "queued"]


@ON_BOTH_BACKENDS
def test_two_ready_workers_and_eight_queued_a_claim_takes_a_whole_group(
    runner: JobRunner, factory: sessionmaker[Session]
) -> None:
    """Seven remain after the first claim: three groupmates still leave four for the other worker."""
    ready_workers(factory, 2)
    ids = queue(factory, 8)
    assert run_to_end(runner, ids[0]) == f"rendered (+{GROUP_SIZE - 1} grouped)"
    assert statuses(factory, ids).count("queued") == 8 - GROUP_SIZE


@ON_BOTH_BACKENDS
@pytest.mark.parametrize("others", [0, 2])
def test_one_worker_of_the_model_groups_as_before(
    runner: JobRunner, factory: sessionmaker[Session], others: int
) -> None:
    """With one worker of the model (workers of other models do not count) every compatible job joins."""
    ready_workers(factory, 1)
    ready_workers(factory, others, model=OTHER_MODEL)
    ids = queue(factory, 3)
    assert run_to_end(runner, ids[0]) == "rendered (+2 grouped)"
    assert statuses(factory, ids) == ["succeeded"] * 3


@ON_BOTH_BACKENDS
def test_a_worker_never_claims_a_job_of_another_model(
    runner: JobRunner, factory: sessionmaker[Session]
) -> None:
    """Older, higher-priority jobs of another model stay queued and unattempted; a wake-up for one of them
    claims the worker's own model's job, and then nothing."""
    others = queue(factory, 3, model=OTHER_MODEL, priority=5)
    mine = queue(factory, 1)
    assert run_to_end(runner, others[0]) == "rendered"
    assert statuses(factory, mine) == ["succeeded"]
    assert run_to_end(runner, others[1]) == "skipped"  # not "exhausted": it is simply not this worker's
    assert statuses(factory, others) == ["queued"] * 3
    with factory() as session:
        assert set(session.scalars(select(Job.attempts).where(Job.id.in_(others)))) == {0}


@ON_BOTH_BACKENDS
def test_a_rendered_jobs_stats_name_its_worker(runner: JobRunner, factory: sessionmaker[Session]) -> None:
    """The runner's identity goes into the stats row of every job it stores, grouped ones included."""
    ids = queue(factory, 2)
    assert run_to_end(runner, ids[0]) == "rendered (+1 grouped)"
    with factory() as session:
        rows = session.scalars(select(JobStats).where(JobStats.job_id.in_(ids))).all()
    assert [row.worker for row in rows] == ["w0@test", "w0@test"]


@ON_BOTH_BACKENDS
def test_the_count_of_claimable_jobs_is_the_models_own_and_bounded(factory: sessionmaker[Session]) -> None:
    queue(factory, 5, model=OTHER_MODEL)
    queue(factory, 3)
    with factory() as session:
        assert claimable_count(session, model=MODEL, at_most=10) == 3
        assert claimable_count(session, model=MODEL, at_most=2) == 2
        assert claimable_count(session, model=OTHER_MODEL, at_most=10) == 5
        assert claimable_count(session, model="synthetic:none", at_most=10) == 0
