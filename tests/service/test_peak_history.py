"""Calibration's history on PostgreSQL and SQLite: records stored by the runner, read back field by field."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy.orm import Session, sessionmaker

from jobs.db import make_database, make_session_factory, transaction
from jobs.lifecycle import claim_job, fail_job, finish_job
from jobs.params import GenerationParams
from jobs.peak_history import RecordedPeak, recent_plan_peaks
from jobs.submit import insert_job
from tests.conftest import BACKENDS
from worker.engine.costs import GB
from worker.engine.fitted_costs import calibrated_scale
from worker.engine.plan import Plan
from worker.engine.records import EXHAUSTED, RenderRecord
from worker.runner import stats_columns

pytestmark = pytest.mark.parametrize("empty_database_url", BACKENDS, indirect=True)

DEVICE = "NVIDIA H100 80GB HBM3"
# Byte counts past 2**31, which a 32-bit cast would overflow on PostgreSQL.
PLAN = Plan(
    rung="stream",
    transformer_resident=frozenset({0, 1}),
    text_encoder_streamed=True,
    vae_tiled=False,
    predicted_peak_bytes=12 * GB,
    pinned_host_bytes=4 * GB,
    resident_weight_bytes=9 * GB,
    transformer_blocks_total=30,
)


@pytest.fixture
def factory(database_url: str) -> Iterator[sessionmaker[Session]]:
    """A session factory on a migrated database of the test's backend."""
    database = make_database(database_url)
    yield make_session_factory(database)
    database.dispose()


def store(factory: sessionmaker[Session], record: RenderRecord, model: str = "synthetic:tiny") -> None:
    """Claim a new job and store its record as the runner does: finished, or failed when exhausted."""
    params = GenerationParams(prompt="a fox", width=64, height=64, steps=2, seed=1, model=model)
    with transaction(factory) as session:
        job_id = insert_job(session, params=params, priority=0, max_attempts=3).job_ids[0]
    with transaction(factory) as session:
        claim = claim_job(session, job_id=job_id)
        assert claim is not None
        token, columns = claim.lease_token, stats_columns(record)
        assert columns is not None
        if record.rung == EXHAUSTED:
            assert fail_job(
                session, job_id=job_id, lease_token=token, error="resource_exhausted", stats=columns
            )
        else:
            assert finish_job(
                session, job_id=job_id, lease_token=token, result_path="/tmp/x.png", stats=columns
            )


def test_calibration_reads_the_plans_fields_of_this_model_and_device(factory: sessionmaker[Session]) -> None:
    """Only jobs of this model and device with a predicted and a measured peak count, in whole bytes."""
    measured = 9 * GB + int(3 * GB * 1.5)  # the transient ran 50% over its prediction
    store(factory, RenderRecord(rung="stream", device_name=DEVICE, plan=PLAN, peak_allocated_bytes=measured))
    store(factory, RenderRecord(rung="stream", device_name="cpu", plan=PLAN, peak_allocated_bytes=1))
    store(
        factory, RenderRecord(rung="stream", device_name=DEVICE, plan=PLAN, peak_allocated_bytes=1), "other"
    )
    store(factory, RenderRecord(rung="stream", device_name=DEVICE, plan=PLAN))  # no peak measured
    store(factory, RenderRecord(rung=EXHAUSTED, device_name=DEVICE, peak_allocated_bytes=20 * GB))  # no plan
    with factory() as session:
        peaks = recent_plan_peaks(session, model="synthetic:tiny", device_name=DEVICE)
    assert peaks == [RecordedPeak(9 * GB, 12 * GB, measured)]
    assert calibrated_scale(peaks) == pytest.approx(1.5)
