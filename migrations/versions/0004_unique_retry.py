"""one retry per job

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 05:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Two concurrent retries of one job must not both insert a copy (it would render twice).
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.create_unique_constraint(op.f("uq_jobs_retry_of"), ["retry_of"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_constraint(op.f("uq_jobs_retry_of"), type_="unique")
