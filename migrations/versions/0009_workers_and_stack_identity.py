"""workers' presence and the stack's identity

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-27 15:30:00
"""

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    identity = op.create_table(
        "stack_identity",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_stack_identity")),
    )
    # One id per database, made here so every process of the stack reads the same one.
    op.bulk_insert(identity, [{"id": str(uuid.uuid4()), "created_at": datetime.now(UTC)}])
    op.create_table(
        "workers",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("node", sa.String(length=200), nullable=False),
        sa.Column("host", sa.String(length=200), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("model", sa.String(length=500), nullable=False),
        sa.Column("dtype", sa.String(length=8), nullable=False),
        sa.Column("offload_mode", sa.String(length=16), nullable=False),
        sa.Column("device_name", sa.String(length=200), nullable=True),
        sa.Column("vram_budget_bytes", sa.BigInteger(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column(
            "forecast",
            sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql"),
            nullable=True,
        ),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ready_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("beat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workers")),
    )
    op.create_index(op.f("ix_workers_host"), "workers", ["host"])


def downgrade() -> None:
    op.drop_index(op.f("ix_workers_host"), table_name="workers")
    op.drop_table("workers")
    op.drop_table("stack_identity")
