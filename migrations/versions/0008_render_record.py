"""the render record: job_stats.plan becomes JSON, offload_mode becomes rung, oom_attempts is counted

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-27 15:00:00
"""

import json
import re
from collections.abc import Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# jobs.tables.JSON_DOCUMENT as of this revision: JSON text on SQLite, jsonb on PostgreSQL.
JSON_DOCUMENT = sa.JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")
# job_stats as the data passes see it: the plan as text (before the upgrade retypes it, after the downgrade).
STATS = sa.table(
    "job_stats",
    sa.column("job_id", sa.String),
    sa.column("plan", sa.Text),
    sa.column("oom_attempts", sa.Integer),
)
PAGE_ROWS = 1000
# Before this revision the runner wrote a job's group as this sentence; the record keeps the number.
GROUP_SENTENCE = re.compile(r"encoded with (\d+) jobs")
OUT_OF_MEMORY = "out of memory"  # how an attempt's outcome starts when it ran out

Plan = dict[str, Any]


def upgrade() -> None:
    # Attempts that ran out of memory get a column, so /metrics counts them without reading any JSON.
    op.add_column("job_stats", sa.Column("oom_attempts", sa.Integer(), nullable=False, server_default="0"))
    # Notes move under "notes" while the column is still text, and text that is not a JSON object is cleared,
    # so the type change only parses. job_stats is altered in batch mode on SQLite: its one index
    # (ix_job_stats_recorded_at, ascending) is recreated from reflection unchanged; `jobs` is not touched,
    # so ix_jobs_queue_order keeps its DESC.
    for job_id, plan in _stored_plans():
        record = notes_nested(dict(plan)) if plan is not None else None
        ran_out = oom_attempts(record)
        if plan is None or record != plan or ran_out:
            _write(job_id, plan=json.dumps(record) if record is not None else None, oom_attempts=ran_out)
    with op.batch_alter_table("job_stats") as batch_op:
        batch_op.alter_column(
            "offload_mode", new_column_name="rung", existing_type=sa.String(32), existing_nullable=False
        )
        batch_op.alter_column(
            "plan",
            type_=JSON_DOCUMENT,
            existing_type=sa.Text(),
            existing_nullable=True,
            postgresql_using="plan::jsonb",
        )


def downgrade() -> None:
    with op.batch_alter_table("job_stats") as batch_op:
        batch_op.drop_column("oom_attempts")
        batch_op.alter_column(
            "rung", new_column_name="offload_mode", existing_type=sa.String(32), existing_nullable=False
        )
        batch_op.alter_column(
            "plan",
            type_=sa.Text(),
            existing_type=JSON_DOCUMENT,
            existing_nullable=True,
            postgresql_using="plan::text",
        )
    for job_id, plan in _stored_plans():
        old = notes_flat(dict(plan)) if plan is not None else None
        if plan is None or old != plan:
            _write(job_id, plan=json.dumps(old) if old is not None else None)


def notes_nested(plan: Plan) -> Plan:
    """Revision 0007's top-level retry, group and warning as the record's notes."""
    notes: Plan = {}
    if "retry" in plan:
        notes["retry"] = plan.pop("retry")
    if "group" in plan:
        group = plan.pop("group")
        found = GROUP_SENTENCE.fullmatch(str(group))
        notes["group"] = int(found[1]) if found else group
    if "warning" in plan:
        notes["warnings"] = [plan.pop("warning")]
    return {**plan, "notes": notes} if notes else plan


def notes_flat(plan: Plan) -> Plan:
    """The record's notes as revision 0007's top-level retry, group and warning."""
    notes = plan.pop("notes", None) or {}
    if "retry" in notes:
        plan["retry"] = notes["retry"]
    if "group" in notes:
        group = notes["group"]
        plan["group"] = f"encoded with {group} jobs" if isinstance(group, int) else group
    if notes.get("warnings"):
        plan["warning"] = "; ".join(notes["warnings"])
    return plan


def oom_attempts(record: Plan | None) -> int:
    """How many of a stored plan's attempts ran out of memory."""
    attempts = (record or {}).get("attempts") or []
    return sum(str(attempt.get("outcome", "")).startswith(OUT_OF_MEMORY) for attempt in attempts)


def _stored_plans() -> Iterator[tuple[str, Plan | None]]:
    """Each stats row's job id and plan text parsed (None where it is not a JSON object), a page at a time.

    A page is read whole before its rows are written, and the next one starts after its last job id.
    """
    after = ""
    while True:
        page = (
            op.get_bind()
            .execute(
                sa.select(STATS.c.job_id, STATS.c.plan)
                .where(STATS.c.job_id > after, STATS.c.plan.is_not(None))
                .order_by(STATS.c.job_id)
                .limit(PAGE_ROWS)
            )
            .all()
        )
        yield from ((job_id, _parsed(text)) for job_id, text in page)
        if len(page) < PAGE_ROWS:
            return
        after = page[-1].job_id


def _write(job_id: str, **values: Any) -> None:
    op.get_bind().execute(STATS.update().where(STATS.c.job_id == job_id).values(**values))


def _parsed(text: str) -> Plan | None:
    """The stored plan as a dict; None if it is not a JSON object (no version wrote any such plan)."""
    try:
        plan = json.loads(text)
    except ValueError:
        return None
    return plan if isinstance(plan, dict) else None
