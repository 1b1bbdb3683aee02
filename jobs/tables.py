"""SQL tables: batches, jobs and each job's memory stats. Alembic owns the schema."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from jobs.states import JobStatus

# Stable constraint names, so migrations name the same things on PostgreSQL and SQLite.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


# JSON text on SQLite, jsonb on PostgreSQL; a Python None is stored as SQL NULL, not as JSON null.
JSON_DOCUMENT = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware timestamp on every backend (SQLite hands back naive values otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_result_value(self, value: Any, dialect: Any) -> datetime | None:
        """Attach UTC to naive values read back from SQLite."""
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value  # type: ignore[no-any-return]


class StatusText(TypeDecorator[JobStatus]):
    """A job's status, stored as its enum value in a string column and read back as `JobStatus`."""

    impl = String(16)
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> str | None:
        """Store the value (a status or its string); an unknown string is refused."""
        return None if value is None else JobStatus(value).value

    def process_result_value(self, value: Any, dialect: Any) -> JobStatus | None:
        """Read the stored string back as a status."""
        return None if value is None else JobStatus(value)


class Base(DeclarativeBase):
    """Declarative base with the naming convention; every timestamp column is UTC-aware."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime}


# The owner of rows made without an API key (loopback use with no keys configured).
LOCAL_OWNER = ""


class ApiKey(Base):
    """A client's API key: only its SHA-256 is stored; the key itself is shown once, at creation."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column()


class Batch(Base):
    """A group of jobs submitted together."""

    __tablename__ = "batches"
    # An Idempotency-Key is scoped to its owner; the route is the table.
    __table_args__ = (
        UniqueConstraint("owner", "idempotency_key"),
        Index(None, "owner", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    total_jobs: Mapped[int] = mapped_column(Integer)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    owner: Mapped[str] = mapped_column(String(36), default=LOCAL_OWNER)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    webhook_url: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    jobs: Mapped[list[Job]] = relationship(back_populates="batch")


class Job(Base):
    """One image to render: its parameters, its place in the queue and its outcome."""

    __tablename__ = "jobs"
    # The two indexes of migration 0007: the queue in FIFO order, and a batch's jobs in order; and one
    # model's queue in FIFO order (migration 0010), for a worker's claim, which reads only its model's jobs.
    __table_args__ = (
        UniqueConstraint("owner", "idempotency_key"),
        Index(
            "ix_jobs_queue_order",
            "status",
            text("priority DESC"),
            "attempts",
            "created_at",
            "batch_index",
            "id",
        ),
        Index("ix_jobs_batch_order", "batch_id", "batch_index"),
        Index(
            "ix_jobs_model_queue_order",
            "status",
            "model",
            text("priority DESC"),
            "attempts",
            "created_at",
            "batch_index",
            "id",
        ),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    batch_id: Mapped[str | None] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), index=True)
    batch_index: Mapped[int] = mapped_column(Integer, default=0)
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str | None] = mapped_column(Text)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    steps: Mapped[int] = mapped_column(Integer)
    guidance_scale: Mapped[float] = mapped_column(Float)
    seed: Mapped[int] = mapped_column(BigInteger)
    model: Mapped[str] = mapped_column(String(500))
    dtype: Mapped[str] = mapped_column(String(8))
    priority: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[JobStatus] = mapped_column(StatusText(), index=True, default=JobStatus.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_token: Mapped[str | None] = mapped_column(String(36))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    progress_step: Mapped[int] = mapped_column(Integer, default=0)
    owner: Mapped[str] = mapped_column(String(36), default=LOCAL_OWNER, index=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    retry_of: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column()
    started_at: Mapped[datetime | None] = mapped_column()
    heartbeat_at: Mapped[datetime | None] = mapped_column()
    finished_at: Mapped[datetime | None] = mapped_column()
    result_path: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)

    batch: Mapped[Batch | None] = relationship(back_populates="jobs")
    stats: Mapped[JobStats | None] = relationship(back_populates="job", uselist=False)


class JobStats(Base):
    """Measured memory and time of a job's final attempt: the product's evidence."""

    __tablename__ = "job_stats"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True)
    peak_allocated_bytes: Mapped[int | None] = mapped_column(BigInteger)
    peak_reserved_bytes: Mapped[int | None] = mapped_column(BigInteger)
    device_total_bytes: Mapped[int | None] = mapped_column(BigInteger)
    device_used_start_bytes: Mapped[int | None] = mapped_column(BigInteger)
    device_free_start_bytes: Mapped[int | None] = mapped_column(BigInteger)
    device_used_end_bytes: Mapped[int | None] = mapped_column(BigInteger)
    device_free_end_bytes: Mapped[int | None] = mapped_column(BigInteger)
    host_rss_bytes: Mapped[int | None] = mapped_column(BigInteger)
    # The rung the job rendered on (see worker/engine/plan.py), or "exhausted" when every rung ran out.
    rung: Mapped[str] = mapped_column(String(32))
    # The render's record: the plan's fields, planned_for, compiled, attempts and notes (migration 0008).
    plan: Mapped[dict[str, Any] | None] = mapped_column(JSON_DOCUMENT)
    predicted_peak_bytes: Mapped[int | None] = mapped_column(BigInteger)
    vram_budget_bytes: Mapped[int | None] = mapped_column(BigInteger)
    load_s: Mapped[float] = mapped_column(Float, default=0.0)
    encode_s: Mapped[float] = mapped_column(Float, default=0.0)
    denoise_s: Mapped[float] = mapped_column(Float, default=0.0)
    decode_s: Mapped[float] = mapped_column(Float, default=0.0)
    save_s: Mapped[float] = mapped_column(Float, default=0.0)
    place_s: Mapped[float] = mapped_column(Float, default=0.0)
    placement_changed: Mapped[bool] = mapped_column(Boolean, default=False)
    recompiles: Mapped[int] = mapped_column(Integer, default=0)
    # Attempts that ran out of memory (counted from the record), so /metrics reads no JSON (migration 0008).
    oom_attempts: Mapped[int] = mapped_column(Integer, default=0)
    device_name: Mapped[str] = mapped_column(String(200))
    # Which worker rendered it, on which card (migration 0010): the index the host numbers it by, and the
    # device's UUID (GPU-...), which names the card whatever CUDA_VISIBLE_DEVICES or a container renumbered.
    worker: Mapped[str | None] = mapped_column(String(200))
    gpu_index: Mapped[int | None] = mapped_column(Integer)
    device_uuid: Mapped[str | None] = mapped_column(String(64))
    torch_version: Mapped[str] = mapped_column(String(50))
    diffusers_version: Mapped[str] = mapped_column(String(50))
    recorded_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)

    job: Mapped[Job] = relationship(back_populates="stats")


class QueueControl(Base):
    """Operator switches for the whole queue (one row per switch, e.g. paused)."""

    __tablename__ = "queue_controls"

    name: Mapped[str] = mapped_column(String(50), primary_key=True)
    enabled: Mapped[bool] = mapped_column(Boolean, default=False)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookDelivery(Base):
    """One signed summary POSTed when a batch finishes, with its delivery attempts."""

    __tablename__ = "webhook_deliveries"
    # A batch finishes again after a retry; `sequence` tells its finishes apart, so each is sent once.
    __table_args__ = (UniqueConstraint("batch_id", "sequence"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    batch_id: Mapped[str] = mapped_column(ForeignKey("batches.id", ondelete="CASCADE"), index=True)
    sequence: Mapped[int] = mapped_column(Integer)
    url: Mapped[str] = mapped_column(Text)
    payload: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), index=True, default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column()
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column()


class StackIdentity(Base):
    """This database's stack id, made once by the migration: the broker records which stack it serves."""

    __tablename__ = "stack_identity"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WorkerPresence(Base):
    """One worker process's start: what it loaded, whether it is ready, and when it was last heard from.

    `nightrender up` and `run` wait for their worker's row to say ready (not for a log line), and the
    compose healthcheck reads it: Celery's `inspect ping` cannot answer while the solo pool renders.
    """

    __tablename__ = "workers"
    # The live workers (jobs.serving): ready ones by their last beat (migration 0010).
    __table_args__ = (Index("ix_workers_state_beat_at", "state", "beat_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    node: Mapped[str] = mapped_column(String(200))  # Celery's node name, e.g. celery@host
    host: Mapped[str] = mapped_column(String(200), index=True)
    pid: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16))  # starting, ready, failed, stopped
    model: Mapped[str] = mapped_column(String(500))
    dtype: Mapped[str] = mapped_column(String(8))
    offload_mode: Mapped[str] = mapped_column(String(16))
    device_name: Mapped[str | None] = mapped_column(String(200))
    # The card it is pinned to (WORKER_GPU, as the host numbers it) and the device's UUID (migration 0010).
    gpu_index: Mapped[int | None] = mapped_column(Integer)
    device_uuid: Mapped[str | None] = mapped_column(String(64))
    vram_budget_bytes: Mapped[int | None] = mapped_column(BigInteger)
    error: Mapped[str | None] = mapped_column(Text)
    # The planner's forecast for common sizes under this worker's budget (worker/engine/forecast.py).
    forecast: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON_DOCUMENT)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    ready_at: Mapped[datetime | None] = mapped_column()
    beat_at: Mapped[datetime] = mapped_column(default=utcnow)
    stopped_at: Mapped[datetime | None] = mapped_column()
