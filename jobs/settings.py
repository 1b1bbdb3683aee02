"""One settings object, read from the environment (and an optional .env file)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from platformdirs import user_data_path
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "Tongyi-MAI/Z-Image-Turbo"


class Settings(BaseSettings):
    """Deployment choices for the API, the worker and the CLI; field names are the env variables."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    data_dir: Path = Field(
        default_factory=lambda: user_data_path("nightrender"),
        description="Where the embedded database, Redis, logs and outputs live; unset = the user's data "
        "folder (platformdirs: ~/.local/share/nightrender on Linux), the same from every working directory",
    )
    database_url: str | None = Field(None, description="SQLAlchemy URL; unset means SQLite in DATA_DIR")
    redis_url: str | None = Field(None, description="Broker URL; unset means the embedded Redis")
    outputs_dir: Path | None = Field(
        None,
        description="Where images are written; unset means DATA_DIR/outputs. Jobs record their image "
        "relative to it, so machines may mount one shared volume at different paths",
    )
    model_cache_dir: Path | None = Field(
        None, description="Synthetic pipelines and the hub cache; unset means DATA_DIR/models"
    )
    queue_name: str = Field("nightrender", description="Celery queue the API publishes to")
    default_model: str = DEFAULT_MODEL
    allowed_models: str = Field(
        f"{DEFAULT_MODEL},synthetic:tiny,synthetic:full",
        description="Comma-separated models a job may name; a local folder path may be added",
    )
    worker_model: str | None = Field(
        None, description="Model the worker loads at start; unset = DEFAULT_MODEL"
    )
    worker_dtype: Literal["bf16", "fp16", "fp32"] = "bf16"
    # Checked by the worker at start against worker/engine/modes.py, the one list of modes: jobs/ may
    # not import the engine, and only the worker uses this setting.
    offload_mode: str = Field(
        "auto", description="auto = the planner picks per job; else a fixed mode (worker/engine/modes.py)"
    )
    vram_budget_gb: str = Field("auto", description="GB for the allocator cap, or auto (free minus reserve)")
    host_ram_budget_gb: str = Field("auto", description="GB of pinned host memory for streaming, or auto")
    attention_backend: str = Field(
        "native", description="diffusers attention backend: native (SDPA), xformers"
    )
    vae_slicing: bool = Field(False, description="decode a batch one image at a time")
    encode_group_size: int = Field(
        4, ge=1, le=32, description="queued jobs that share one text-encoder pass (1 = no grouping)"
    )
    max_reorder_wait_s: float = Field(
        180.0,
        ge=0,
        description="a queued job passed over for a same-size job runs after waiting this long past its turn "
        "(0 = strict FIFO)",
    )
    vae_tiling: Literal["auto", "on", "off"] = Field("auto", description="auto = only when the plan needs it")
    compile: Literal["auto", "on", "off"] = Field(
        "auto",
        description="compile the transformer's blocks; auto = on for CUDA with a real or full-size model",
    )
    image_writer_queue: int = Field(
        2, ge=1, le=64, description="rendered images waiting for the PNG writer before rendering pauses"
    )
    max_attempts: int = Field(3, ge=1)
    max_batch_jobs: int = Field(10_000, ge=1)
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_threads: int = Field(
        16, ge=1, le=256, description="threads serving the API's blocking routes; its database pool matches"
    )
    api_max_inflight: int = Field(
        256, ge=1, description="requests in progress beyond which the API sheds load with 503 and Retry-After"
    )
    db_pool_timeout_s: float = Field(
        5.0, gt=0, description="seconds a request waits for a database connection before a 503"
    )
    metrics_enabled: bool = Field(True, description="serve GET /metrics in the Prometheus text format")
    metrics_recent_jobs: int = Field(
        1000, ge=1, le=100_000, description="recorded jobs that /metrics' phase, VRAM and OOM figures cover"
    )
    prometheus_multiproc_dir: Path | None = Field(
        None, description="an empty folder where API worker processes share metrics (process environment)"
    )
    log_format: Literal["json", "text"] = Field("json", description="the API's log lines: JSON or text")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="the API's log level")
    api_url: str | None = Field(
        None, description="Where the CLI finds the API; unset = http://API_HOST:API_PORT"
    )
    api_key: str | None = Field(None, description="the key the CLI sends (Authorization: Bearer)")
    api_status_cache_s: float = Field(
        1.0, ge=0, description="seconds a job's or batch's status answer may be reused (0 = never)"
    )
    api_workers: int = Field(1, ge=1, le=64, description="uvicorn worker processes serving the API")
    api_key_cache_s: float = Field(
        5.0, gt=0, description="seconds the API keeps its list of keys; a revoked key works at most this long"
    )
    api_allowed_origins: str = Field(
        "", description="comma-separated web origins, besides the API's own, that may change state"
    )
    api_max_body_bytes: int = Field(
        1024 * 1024, ge=1024, description="largest request body, except batch submissions"
    )
    api_max_upload_bytes: int = Field(
        20 * 1024 * 1024, ge=1024, description="largest batch submission body (JSON or an uploaded file)"
    )
    api_rate_limit_per_min: int = Field(
        6000, ge=0, description="requests a minute per API key (0 = no limit; keyless loopback use has none)"
    )
    api_max_queued_per_key: int = Field(
        100_000, ge=1, description="queued and running jobs one key may have; past it submissions get 429"
    )
    embedded_redis_port: int = 6390
    reconcile_interval_s: float = Field(30.0, gt=0)
    heartbeat_interval_s: float = Field(10.0, gt=0, description="how often a running job proves it is alive")
    heartbeat_stale_s: float = Field(120.0, gt=0, description="a running job silent this long is requeued")
    republish_after_s: float = Field(
        120.0, ge=0, description="queued with no live message this long: republish"
    )
    # Batch webhooks (jobs/webhooks.py). Empty or unset secret = webhooks off: a webhook_url is a 422.
    webhook_secret: str | None = Field(
        None, description="HMAC-SHA256 key that signs webhooks, e.g. `openssl rand -hex 32`"
    )
    webhook_allow_private: bool = Field(
        False, description="let webhook_url resolve to loopback, private, link-local or other non-public IPs"
    )
    webhook_interval_s: float = Field(2.0, gt=0, description="how often the API looks for webhooks to send")
    webhook_per_pass: int = Field(
        20, ge=1, description="finished batches recorded and delivery attempts made per pass, per API process"
    )
    webhook_timeout_s: float = Field(10.0, gt=0, description="connect, write and read timeout of one attempt")
    webhook_max_attempts: int = Field(10, ge=1, le=50, description="attempts before a delivery is 'failed'")
    webhook_backoff_s: float = Field(
        5.0, ge=0, description="wait after the first failed attempt; doubles each time, with jitter"
    )
    webhook_backoff_max_s: float = Field(3600.0, ge=0, description="longest wait between two attempts")
    visibility_timeout_s: int = Field(
        6 * 3600, gt=0, description="Redis redelivers unacked messages after this"
    )
    fault_exit_on_prompt: str | None = Field(
        None, description="testing only: a worker exits mid-job when a prompt contains this text"
    )
    fault_exit_before_write: str | None = Field(
        None,
        description="testing only: a worker exits after rendering a job whose prompt contains this text, "
        "before its first attempt's image is written",
    )

    def resolved_database_url(self) -> str:
        """The database URL, defaulting to a SQLite file in the data dir."""
        return self.database_url or f"sqlite:///{(self.data_dir / 'nightrender.db').resolve()}"

    def resolved_redis_url(self) -> str:
        """The broker URL, defaulting to the embedded Redis on its port."""
        return self.redis_url or f"redis://127.0.0.1:{self.embedded_redis_port}/0"

    def resolved_outputs_dir(self) -> Path:
        """The folder images are written to."""
        return (self.outputs_dir or self.data_dir / "outputs").resolve()

    def resolved_model_cache_dir(self) -> Path:
        """The folder models are built in or downloaded to."""
        return (self.model_cache_dir or self.data_dir / "models").resolve()

    def resolved_api_url(self) -> str:
        """The base URL clients use for the API."""
        return self.api_url or f"http://{self.api_host}:{self.api_port}"

    def allowed_origin_set(self) -> frozenset[str]:
        """The web origins, besides the API's own, allowed to send state-changing requests."""
        return frozenset(o.strip().rstrip("/") for o in self.api_allowed_origins.split(",") if o.strip())

    def allowed_model_names(self) -> list[str]:
        """The models a job may name."""
        return [name.strip() for name in self.allowed_models.split(",") if name.strip()]

    def resolved_worker_model(self) -> str:
        """The model the worker loads at start."""
        return self.worker_model or self.default_model


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()
