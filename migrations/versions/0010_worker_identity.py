"""which worker and which card: job_stats records the worker, its GPU index and the device's UUID;
the workers presence table records the GPU index and device UUID of each worker start; indexes for a
worker's claim of its model's jobs and for the live workers

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable: rows written before this revision, and workers on the CPU, have no card to name.
    op.add_column("job_stats", sa.Column("worker", sa.String(length=200), nullable=True))
    op.add_column("job_stats", sa.Column("gpu_index", sa.Integer(), nullable=True))
    op.add_column("job_stats", sa.Column("device_uuid", sa.String(length=64), nullable=True))
    op.add_column("workers", sa.Column("gpu_index", sa.Integer(), nullable=True))
    op.add_column("workers", sa.Column("device_uuid", sa.String(length=64), nullable=True))
    # A worker claims only its model's jobs (jobs.ordering, jobs.lifecycle.groupmates): with the model
    # second, the claim reads its model's head in FIFO order instead of walking ix_jobs_queue_order past
    # every queued job of other models ahead of it. ix_jobs_queue_order stays: queue positions
    # (jobs.positions) and the reconciler read the whole queue in FIFO order.
    op.create_index(
        "ix_jobs_model_queue_order",
        "jobs",
        ["status", "model", sa.text("priority DESC"), "attempts", "created_at", "batch_index", "id"],
    )
    # The live workers (jobs.serving: ready and beating, or starting), read on every status answer.
    op.create_index("ix_workers_state_beat_at", "workers", ["state", "beat_at"])


def downgrade() -> None:
    # Dropped before the batch copies below, which would recreate them from reflection.
    op.drop_index("ix_workers_state_beat_at", table_name="workers")
    op.drop_index("ix_jobs_model_queue_order", table_name="jobs")
    # Batch mode on SQLite (a table copy); each table's one index is recreated from reflection unchanged.
    with op.batch_alter_table("workers") as batch_op:
        batch_op.drop_column("device_uuid")
        batch_op.drop_column("gpu_index")
    with op.batch_alter_table("job_stats") as batch_op:
        batch_op.drop_column("device_uuid")
        batch_op.drop_column("gpu_index")
        batch_op.drop_column("worker")
