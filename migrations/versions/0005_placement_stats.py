"""placement and compile cost per job

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 10:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Whether a job moved weights before it ran (a re-placement), what that cost, and how many graphs
    # it compiled: the three things a mixed-size batch must keep near zero.
    with op.batch_alter_table("job_stats") as batch_op:
        batch_op.add_column(sa.Column("place_s", sa.Float(), nullable=False, server_default="0"))
        batch_op.add_column(
            sa.Column("placement_changed", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.add_column(sa.Column("recompiles", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("job_stats") as batch_op:
        batch_op.drop_column("recompiles")
        batch_op.drop_column("placement_changed")
        batch_op.drop_column("place_s")
