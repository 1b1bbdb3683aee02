"""API keys, owners, owner-scoped idempotency with request hashes, and batch webhooks

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 12:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OWNED = ("batches", "jobs")


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("admin", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
        sa.UniqueConstraint("name", name=op.f("uq_api_keys_name")),
    )
    # Rows made before keys existed belong to the local owner ("").
    for table in OWNED:
        with op.batch_alter_table(table) as batch_op:
            batch_op.add_column(sa.Column("owner", sa.String(length=36), nullable=False, server_default=""))
            batch_op.add_column(sa.Column("request_hash", sa.String(length=64), nullable=True))
            batch_op.drop_constraint(f"uq_{table}_idempotency_key", type_="unique")
            batch_op.create_unique_constraint(f"uq_{table}_owner", ["owner", "idempotency_key"])
    with op.batch_alter_table("batches") as batch_op:
        batch_op.add_column(sa.Column("webhook_url", sa.Text(), nullable=True))
        batch_op.create_index("ix_batches_owner", ["owner", "created_at"])
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.create_index("ix_jobs_owner", ["owner"])
    _create_webhook_deliveries()


def _create_webhook_deliveries() -> None:
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("batch_id", sa.String(length=36), nullable=False),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["batch_id"],
            ["batches.id"],
            name=op.f("fk_webhook_deliveries_batch_id_batches"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_deliveries")),
        sa.UniqueConstraint("batch_id", "sequence", name=op.f("uq_webhook_deliveries_batch_id")),
    )
    op.create_index(op.f("ix_webhook_deliveries_batch_id"), "webhook_deliveries", ["batch_id"])
    op.create_index(op.f("ix_webhook_deliveries_status"), "webhook_deliveries", ["status"])


def downgrade() -> None:
    op.drop_index(op.f("ix_webhook_deliveries_status"), table_name="webhook_deliveries")
    op.drop_index(op.f("ix_webhook_deliveries_batch_id"), table_name="webhook_deliveries")
    op.drop_table("webhook_deliveries")
    with op.batch_alter_table("jobs") as batch_op:
        batch_op.drop_index("ix_jobs_owner")
    with op.batch_alter_table("batches") as batch_op:
        batch_op.drop_index("ix_batches_owner")
        batch_op.drop_column("webhook_url")
    # Keys were unique per owner; in one global namespace again only the local owner's keys are kept.
    for table in OWNED:
        op.execute(
            sa.text(
                f"UPDATE {table} SET idempotency_key = NULL WHERE owner <> '' AND idempotency_key IS NOT NULL"
            )
        )
        with op.batch_alter_table(table) as batch_op:
            batch_op.drop_constraint(f"uq_{table}_owner", type_="unique")
            batch_op.create_unique_constraint(f"uq_{table}_idempotency_key", ["idempotency_key"])
            batch_op.drop_column("request_hash")
            batch_op.drop_column("owner")
    op.drop_table("api_keys")
