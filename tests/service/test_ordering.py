"""Service tests of the queue order (FIFO, same-size preference, bounded wait) on both backends."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from jobs.db import make_database, make_session_factory, transaction
from jobs.lifecycle import claim_job
from jobs.ordering import PassedOver, Preference, next_job_ids
from jobs.params import GenerationParams
from jobs.settings import Settings
from jobs.states import JobStatus
from jobs.submit import insert_batch
from jobs.tables import Job
from tests.conftest import BACKENDS

pytestmark = pytest.mark.parametrize("empty_database_url", BACKENDS, indirect=True)

SQUARE = (512, 512)
WIDE = (768, 432)
MAX_WAIT_S = 10.0
START = 1000.0  # a monotonic clock reading
MODEL, OTHER_MODEL = "synthetic:tiny", "synthetic:full"  # the worker's model, and one it does not serve


def params(
    size: tuple[int, int], *, seed: int = 1, dtype: str = "bf16", model: str = MODEL
) -> GenerationParams:
    """Params for one image of this size on a synthetic model (the worker's, unless named)."""
    width, height = size
    return GenerationParams(
        prompt="a lighthouse at dusk",
        width=width,
        height=height,
        steps=2,
        seed=seed,
        model=model,
        dtype=dtype,  # type: ignore[arg-type]
    )


def like(size: tuple[int, int]) -> Preference:
    """The preference a worker has after rendering a synthetic bf16 image of this size."""
    return Preference.of(params(size))


@pytest.fixture
def factory(database_url: str) -> Iterator[sessionmaker[Session]]:
    """A session factory on a migrated database of the test's backend."""
    engine = make_database(database_url)
    yield make_session_factory(engine)
    engine.dispose()


def queue(
    factory: sessionmaker[Session], *sizes: tuple[int, int], priority: int = 0, model: str = MODEL
) -> list[str]:
    """Submit one batch with a job per size, in this order; its job ids."""
    batch = [params(size, seed=i, model=model) for i, size in enumerate(sizes)]
    with transaction(factory) as session:
        return insert_batch(session, params=batch, priority=priority, max_attempts=3).job_ids


def order(
    factory: sessionmaker[Session],
    preference: Preference | None,
    passed_over: PassedOver,
    *,
    now: float = START,
    max_wait_s: float = MAX_WAIT_S,
    limit: int = 8,
    model: str = MODEL,
) -> list[str]:
    """next_job_ids for a worker of `model`, in a fresh session."""
    with factory() as session:
        return next_job_ids(
            session,
            model=model,
            preference=preference,
            passed_over=passed_over,
            max_wait_s=max_wait_s,
            now=now,
            limit=limit,
        )


def set_status(factory: sessionmaker[Session], job_id: str, status: JobStatus) -> None:
    """Move a job straight to a status, as if a worker had got it there."""
    with transaction(factory) as session:
        session.execute(update(Job).where(Job.id == job_id).values(status=status))


def test_no_preference_is_fifo_and_respects_the_limit(factory: sessionmaker[Session]) -> None:
    ids = queue(factory, WIDE, SQUARE, WIDE) + queue(factory, SQUARE)
    # Older batches first, then each batch in its own order.
    assert order(factory, None, PassedOver()) == ids
    assert order(factory, None, PassedOver(), limit=2) == ids[:2]
    assert order(factory, None, PassedOver(), limit=0) == []


def test_priority_wins_over_the_size_preference(factory: sessionmaker[Session]) -> None:
    low = queue(factory, SQUARE, SQUARE, priority=0)
    high = queue(factory, WIDE, SQUARE, priority=5)
    passed_over = PassedOver()
    # The preferred size goes ahead of the head only within the head's priority.
    assert order(factory, like(SQUARE), passed_over) == [high[1], high[0], *low]
    set_status(factory, high[1], JobStatus.SUCCEEDED)
    # The only SQUARE jobs left are of a lower priority: the WIDE head is not passed over.
    assert order(factory, like(SQUARE), passed_over) == [high[0], *low]


def test_the_preferred_size_goes_ahead_of_an_older_head(factory: sessionmaker[Session]) -> None:
    ids = queue(factory, WIDE, WIDE, SQUARE, WIDE, SQUARE)
    passed_over = PassedOver()
    assert order(factory, like(SQUARE), passed_over) == [ids[2], ids[0], ids[1], ids[3], ids[4]]
    assert order(factory, like(SQUARE), passed_over, limit=3) == [ids[2], ids[0], ids[1]]
    assert passed_over.waited(ids[0], START + 4) == pytest.approx(4.0)
    # The head already matches: plain FIFO, nobody is passed over.
    assert order(factory, like(WIDE), PassedOver()) == ids
    # Another dtype or model is not the same work, even at the same size.
    assert order(factory, Preference("synthetic:tiny", "fp16", *SQUARE), PassedOver()) == ids
    assert order(factory, Preference("synthetic:full", "bf16", *SQUARE), PassedOver()) == ids


def test_the_head_runs_once_it_has_waited_max_wait(factory: sessionmaker[Session]) -> None:
    head, same = queue(factory, WIDE, SQUARE)
    passed_over = PassedOver()
    assert order(factory, like(SQUARE), passed_over, now=START)[0] == same
    assert order(factory, like(SQUARE), passed_over, now=START + MAX_WAIT_S - 0.5)[0] == same
    assert order(factory, like(SQUARE), passed_over, now=START + MAX_WAIT_S) == [head, same]
    assert order(factory, like(SQUARE), passed_over, now=START + MAX_WAIT_S + 60) == [head, same]

    # Once the head has run, its record goes: the record holds at most the current head.
    set_status(factory, head, JobStatus.SUCCEEDED)
    assert order(factory, like(SQUARE), passed_over, now=START + 100) == [same]
    assert len(passed_over) == 0
    assert passed_over.waited(head, START + 100) == 0.0


def test_zero_max_wait_is_strict_fifo(factory: sessionmaker[Session]) -> None:
    ids = queue(factory, WIDE, SQUARE, SQUARE)
    passed_over = PassedOver()
    assert order(factory, like(SQUARE), passed_over, max_wait_s=0) == ids
    assert len(passed_over) == 0


def test_unclaimable_jobs_are_never_returned(factory: sessionmaker[Session]) -> None:
    cancelling, exhausted, running, done, failed, waiting = queue(
        factory, SQUARE, SQUARE, SQUARE, SQUARE, SQUARE, WIDE
    )
    with transaction(factory) as session:
        session.execute(update(Job).where(Job.id == cancelling).values(cancel_requested=True))
        session.execute(update(Job).where(Job.id == exhausted).values(attempts=Job.max_attempts))
        assert claim_job(session, job_id=running) is not None
    set_status(factory, done, JobStatus.SUCCEEDED)
    set_status(factory, failed, JobStatus.FAILED)

    # Each of them is ahead of the WIDE job and of the preferred size, and none is claimable.
    assert order(factory, None, PassedOver()) == [waiting]
    assert order(factory, like(SQUARE), PassedOver()) == [waiting]
    with transaction(factory) as session:
        assert claim_job(session, job_id=waiting) is not None
    assert order(factory, None, PassedOver()) == []


def test_simulated_worker_reorders_but_never_starves_the_odd_job(factory: sessionmaker[Session]) -> None:
    odd, *same = queue(factory, WIDE, *[SQUARE] * 30)
    passed_over = PassedOver()
    preference: Preference | None = like(SQUARE)
    clock = START
    ran: list[str] = []
    first_passed_over: float | None = None
    odd_ran_at: float | None = None
    while len(ran) < 31:
        ids = order(factory, preference, passed_over, now=clock)
        if ids[0] != odd and odd in ids and first_passed_over is None:
            first_passed_over = clock
        if ids[0] == odd:
            odd_ran_at = clock
        set_status(factory, ids[0], JobStatus.SUCCEEDED)
        with factory() as session:
            job = session.get_one(Job, ids[0])
            preference = Preference(job.model, job.dtype, job.width, job.height)
        ran.append(ids[0])
        clock += 1.0  # one job takes one second

    assert first_passed_over == START
    assert odd_ran_at is not None
    assert odd_ran_at - first_passed_over <= MAX_WAIT_S + 1
    assert ran.index(odd) >= 1  # at least one same-size job went ahead of it
    assert ran[: ran.index(odd)] == same[: ran.index(odd)]  # the others kept their FIFO order
    assert sorted(ran) == sorted([odd, *same])  # each ran exactly once
    assert order(factory, preference, passed_over, now=clock) == []


def test_the_setting_defaults_and_refuses_negative_waits(settings: Settings) -> None:
    assert settings.max_reorder_wait_s == 180.0
    assert Settings(max_reorder_wait_s=0).max_reorder_wait_s == 0.0
    with pytest.raises(ValueError):
        Settings(max_reorder_wait_s=-1)


def test_a_worker_is_offered_only_jobs_of_its_model(factory: sessionmaker[Session]) -> None:
    """Jobs of a model the worker does not serve are never offered, whatever their priority or size."""
    others = queue(factory, SQUARE, SQUARE, priority=5, model=OTHER_MODEL)
    mine = queue(factory, WIDE, SQUARE)
    assert order(factory, None, PassedOver()) == mine
    assert order(factory, like(SQUARE), PassedOver()) == [mine[1], mine[0]]
    # A preference for the other model's jobs finds none of them: the head is not even passed over.
    passed_over = PassedOver()
    assert order(factory, Preference(OTHER_MODEL, "bf16", *SQUARE), passed_over) == mine
    assert len(passed_over) == 0
    assert order(factory, None, PassedOver(), model=OTHER_MODEL) == others


def test_the_size_preference_holds_nothing_back_from_another_worker(factory: sessionmaker[Session]) -> None:
    """One worker's preference reorders only its own claim: an idle worker without it claims the head."""
    head, square, *_rest = queue(factory, WIDE, SQUARE, SQUARE)
    with transaction(factory) as session:
        preferring = next_job_ids(
            session,
            model=MODEL,
            preference=like(SQUARE),
            passed_over=PassedOver(),
            max_wait_s=MAX_WAIT_S,
            now=START,
        )
        assert preferring[0] == square and claim_job(session, job_id=square) is not None
    assert order(factory, None, PassedOver())[0] == head
    assert order(factory, like(WIDE), PassedOver())[0] == head


def test_two_workers_preferring_one_size_pass_the_head_over_at_most_max_wait(
    factory: sessionmaker[Session],
) -> None:
    """Two workers both prefer the common size; the second comes up later. The odd head waits at most
    MAX_WAIT_S from the first time any worker passed it over, and every job is claimed once."""
    odd, *same = queue(factory, WIDE, *[SQUARE] * 40)
    passed_over = {"a": PassedOver(), "b": PassedOver()}
    preference = {"a": like(SQUARE), "b": like(SQUARE)}
    claimed: dict[str, tuple[str, float]] = {}  # job id: (worker, when)
    clock = START
    while len(claimed) < 41:
        running = []
        for name in ["a", "b"] if clock >= START + 3 else ["a"]:  # b comes up three jobs later
            job_id = claim_next(factory, name, preference, passed_over, clock)
            if job_id is not None:
                claimed[job_id] = (name, clock)
                running.append(job_id)
        for job_id in running:
            set_status(factory, job_id, JobStatus.SUCCEEDED)
        clock += 1.0  # one job takes one second on either worker
    worker, started = claimed[odd]
    assert worker == "a"  # the first to pass it over ran it when its wait ran out
    assert START + 1 <= started <= START + MAX_WAIT_S + 1
    assert sorted(claimed) == sorted([odd, *same])
    assert {name for name, _ in claimed.values()} == {"a", "b"}


def claim_next(
    factory: sessionmaker[Session],
    name: str,
    preference: dict[str, Preference],
    passed_over: dict[str, PassedOver],
    now: float,
) -> str | None:
    """One worker's claim: the first of its offered jobs it wins, and its preference afterwards."""
    with transaction(factory) as session:
        offered = next_job_ids(
            session,
            model=MODEL,
            preference=preference[name],
            passed_over=passed_over[name],
            max_wait_s=MAX_WAIT_S,
            now=now,
        )
        for job_id in offered:
            claim = claim_job(session, job_id=job_id)
            if claim is not None:
                preference[name] = Preference.of(claim.params)
                return job_id
    return None
