"""A batch's ETA: its remaining jobs' size and steps at the measured pace, not any job's mean time.

The first ETA of a batch used to be the mean seconds per image of every job ever recorded: a 1024x1024
batch after a 256x256 demo was estimated from the demo's images, 10x or more off.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from jobs.db import make_database, make_session_factory, transaction
from jobs.lifecycle import claim_job, finish_job
from jobs.params import GenerationParams
from jobs.presence import announce_worker, mark_ready
from jobs.serving import serving_counts
from jobs.settings import Settings
from jobs.submit import insert_batch
from jobs.tables import Batch, Job, utcnow
from jobs.views import batch_view
from tests.conftest import BACKENDS

pytestmark = pytest.mark.parametrize("empty_database_url", BACKENDS, indirect=True)
MODEL = "synthetic:tiny"
# A made-up but consistent pace: these are the seconds a job of any size takes in these tests.
ENCODE_S, DECODE_SAVE_S_PER_PIXEL, DENOISE_S_PER_PIXEL_STEP = 0.2, 1e-6, 1e-7


def expected_seconds(width: int, height: int, steps: int) -> float:
    """What a job takes at the tests' pace."""
    pixels = width * height
    return ENCODE_S + DECODE_SAVE_S_PER_PIXEL * pixels + DENOISE_S_PER_PIXEL_STEP * pixels * steps


@pytest.fixture
def factory(settings: Settings) -> Iterator[sessionmaker[Session]]:
    """Sessions on the test's migrated database."""
    database = make_database(settings.resolved_database_url())
    yield make_session_factory(database)
    database.dispose()


def add_batch(factory: sessionmaker[Session], sizes: list[tuple[int, int, int]]) -> list[str]:
    """A queued batch with a job of each (width, height, steps); returns their ids."""
    params = [
        GenerationParams(prompt=f"p{i}", width=width, height=height, steps=steps, seed=i, model=MODEL)
        for i, (width, height, steps) in enumerate(sizes)
    ]
    with transaction(factory) as session:
        return insert_batch(session, params=params, priority=0, max_attempts=3).job_ids


def render(
    factory: sessionmaker[Session],
    job_id: str,
    size: tuple[int, int, int],
    recompiles: int = 0,
    per_step_s: float = 0.0,
) -> None:
    """Claim and finish a job with stats as the worker records them at the tests' pace."""
    width, height, steps = size
    pixels = width * height
    stats: dict[str, Any] = {
        "rung": "resident",
        "encode_s": ENCODE_S,
        "denoise_s": (DENOISE_S_PER_PIXEL_STEP * pixels + per_step_s) * steps + (60.0 if recompiles else 0.0),
        "decode_s": DECODE_SAVE_S_PER_PIXEL * pixels / 2,
        "save_s": DECODE_SAVE_S_PER_PIXEL * pixels / 2,
        "recompiles": recompiles,
        "device_name": "test-device",
        "torch_version": "2.x",
        "diffusers_version": "0.x",
    }
    with transaction(factory) as session:
        claim = claim_job(session, job_id=job_id)
        assert claim is not None
        assert finish_job(
            session, job_id=job_id, lease_token=claim.lease_token, result_path="/x.png", stats=stats
        )


def eta(factory: sessionmaker[Session], job_id_of_batch: str) -> float | None:
    """The ETA the batch of this job shows."""
    with factory() as session:
        batch = session.get_one(Batch, session.get_one(Job, job_id_of_batch).batch_id)
        return batch_view(session, batch)["eta_seconds"]  # type: ignore[no-any-return]


SMALL, LARGE, MEDIUM = (256, 256, 4), (1024, 1024, 9), (512, 512, 8)


def test_a_new_batch_is_paced_by_earlier_jobs_scaled_to_its_size_and_steps(
    factory: sessionmaker[Session],
) -> None:
    for job_id in add_batch(factory, [SMALL] * 4):
        render(factory, job_id, SMALL)
    large = add_batch(factory, [LARGE] * 10)
    # Before: 10 x the small jobs' 0.29 s = 2.9 s, against 22 s of work at this pace (7.5x off).
    assert eta(factory, large[0]) == pytest.approx(10 * expected_seconds(*LARGE), rel=0.01)


def test_each_remaining_job_counts_at_its_own_size(factory: sessionmaker[Session]) -> None:
    mixed = add_batch(factory, [SMALL, SMALL, LARGE, LARGE])
    render(factory, mixed[0], SMALL)
    render(factory, mixed[1], SMALL)
    assert eta(factory, mixed[0]) == pytest.approx(2 * expected_seconds(*LARGE), rel=0.01)


def test_jobs_that_compiled_do_not_pace_the_batch(factory: sessionmaker[Session]) -> None:
    batch = add_batch(factory, [MEDIUM] * 6)
    render(factory, batch[0], MEDIUM, recompiles=3)  # a minute of compiling, once
    assert eta(factory, batch[0]) is None  # nothing warm measured yet: no ETA rather than a wrong one
    render(factory, batch[1], MEDIUM)
    assert eta(factory, batch[0]) == pytest.approx(4 * expected_seconds(*MEDIUM), rel=0.01)


def test_a_fixed_cost_per_step_is_not_charged_by_the_pixel(factory: sessionmaker[Session]) -> None:
    """Small jobs' steps are mostly fixed cost; priced by pixels alone, large jobs read about 2x too long."""
    per_step = 0.05
    mixed = add_batch(factory, [SMALL, LARGE, SMALL, LARGE, LARGE, LARGE])
    for job_id, size in zip(mixed[:4], [SMALL, LARGE, SMALL, LARGE], strict=True):
        render(factory, job_id, size, per_step_s=per_step)
    truth = 2 * (expected_seconds(*LARGE) + per_step * LARGE[2])
    assert eta(factory, mixed[0]) == pytest.approx(truth, rel=0.01)


def test_one_size_alone_is_priced_by_the_pixel_as_before(factory: sessionmaker[Session]) -> None:
    batch = add_batch(factory, [MEDIUM] * 4)
    render(factory, batch[0], MEDIUM, per_step_s=0.05)
    render(factory, batch[1], MEDIUM, per_step_s=0.05)
    truth = 2 * (expected_seconds(*MEDIUM) + 0.05 * 8)
    assert eta(factory, batch[0]) == pytest.approx(truth, abs=0.05)  # the ETA is rounded to 0.1 s


def test_with_a_forecast_a_size_not_yet_measured_is_priced_by_it(factory: sessionmaker[Session]) -> None:
    """The worker runs same-size jobs together: a mixed batch's first dozen images may all be 512x512.

    Priced by pixel, each 1024x1024 job then cost 4x a 512x512 one, and the ETA read 2.5x high on the H100.
    With the worker's forecast on record, a size not measured yet is priced by the forecast, as the
    estimate before submitting does; a measured size by its own measured time.
    """
    forecast = [
        {"width": 512, "height": 512, "rung": "stream", "predicted_peak_bytes": 1, "fits": True,
         "seconds_base": 0.3, "seconds_per_step": 0.05},
        {"width": 1024, "height": 1024, "rung": "stream", "predicted_peak_bytes": 1, "fits": True,
         "seconds_base": 0.5, "seconds_per_step": 0.1},
    ]  # fmt: skip
    with factory() as session:
        worker = announce_worker(session, node="w@h", model=MODEL, dtype="bf16", offload_mode="auto")
        mark_ready(session, worker_id=worker, device_name="gpu", vram_budget_bytes=1, forecast=forecast)
    small, large = (512, 512, 8), (1024, 1024, 9)
    batch = add_batch(factory, [small] * 4 + [large] * 3)
    for job_id in batch[:3]:
        render(factory, job_id, small)
    truth = expected_seconds(*small) + 3 * (0.5 + 0.1 * 9)  # one measured small left, three forecast large
    assert eta(factory, batch[0]) == pytest.approx(truth, abs=0.05)
    by_pixel = expected_seconds(*small) + 3 * expected_seconds(*large)  # the pace alone: 4x pixels, 4x time
    assert abs(truth - by_pixel) > 0.5


def ready_worker(factory: sessionmaker[Session], node: str) -> None:
    """A worker of MODEL that is ready and beating now."""
    with factory() as session:
        worker_id = announce_worker(session, node=node, model=MODEL, dtype="bf16", offload_mode="auto")
        mark_ready(session, worker_id=worker_id, device_name="test-device", vram_budget_bytes=None)


def test_two_workers_of_the_model_share_the_remaining_time(factory: sessionmaker[Session]) -> None:
    """The remaining jobs' time is one worker's; two workers of the batch's model render them side by side."""
    batch = add_batch(factory, [MEDIUM] * 6)
    render(factory, batch[0], MEDIUM)
    one = eta(factory, batch[0])
    assert one is not None and one > 1.0
    for node in ("worker-gpu0@test", "worker-gpu1@test"):
        ready_worker(factory, node)
    with factory() as session:
        serving = serving_counts(session, now=utcnow(), silent_after_s=60)
        view = batch_view(
            session, session.get_one(Batch, session.get_one(Job, batch[0]).batch_id), serving=serving
        )
    assert serving[MODEL] == 2
    assert view["eta_seconds"] == pytest.approx(one / 2, abs=0.1)
    assert view["unserved_models"] == []
