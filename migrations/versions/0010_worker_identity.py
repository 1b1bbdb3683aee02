"""which worker and which card: job_stats records the worker, its GPU index and the device's UUID;
the workers presence table records the GPU index and device UUID of each worker start

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


def downgrade() -> None:
    # Batch mode on SQLite (a table copy); each table's one index is recreated from reflection unchanged.
    with op.batch_alter_table("workers") as batch_op:
        batch_op.drop_column("device_uuid")
        batch_op.drop_column("gpu_index")
    with op.batch_alter_table("job_stats") as batch_op:
        batch_op.drop_column("device_uuid")
        batch_op.drop_column("gpu_index")
        batch_op.drop_column("worker")
