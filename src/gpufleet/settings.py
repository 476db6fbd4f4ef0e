"""gpufleet's configuration: one ``Settings`` object read from ``GPUFLEET_*`` environment variables.

Only entry points (the CLI, ``serve``) build a ``Settings``; everything below them receives plain
values, so library code and tests never depend on the process environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "gpufleet"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GPUFLEET_", extra="ignore")

    data_dir: Path = Field(default_factory=default_data_dir)
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy URL; default: a SQLite file under the data dir",
    )
    blob_dir: Path | None = Field(default=None, description="default: DATA_DIR/blobs")
    registry_dir: Path | None = Field(default=None, description="default: DATA_DIR/registry")
    # Versions of each model `models package` keeps (tagged versions are always kept).
    keep_versions: int = Field(default=10, ge=1)

    # Task inputs above this size go to the blob store and the row keeps a reference.
    inline_input_limit: int = Field(default=64 * 1024, ge=1024)
    max_input_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)

    lease_s: float = Field(default=30.0, gt=0)
    default_max_attempts: int = Field(default=3, ge=1, le=100)
    retry_backoff_s: float = Field(default=1.0, ge=0)
    retry_backoff_max_s: float = Field(default=300.0, ge=0)
    # One claim in this many takes the batch lane first, so a busy interactive lane never
    # starves batch work.
    batch_lane_every: int = Field(default=4, ge=1)
    # Queued tasks one tenant may have before submits get 429 quota_exceeded; 0: no limit.
    max_queued_per_tenant: int = Field(default=100_000, ge=0)
    # A worker's claims and result commits that overlap predict run in a child process, so a
    # Python-bound model keeps the GIL (worker.agent). auto: on when the worker may use at
    # least 4 CPUs (on fewer the extra process competes with the API for them).
    queue_agent: Literal["auto", "on", "off"] = "auto"

    @field_validator("data_dir", "blob_dir", "registry_dir")
    @classmethod
    def _expand(cls, v: Path | None) -> Path | None:
        return v.expanduser() if v is not None else None

    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'gpufleet.db'}"

    def resolved_blob_dir(self) -> Path:
        return self.blob_dir or self.data_dir / "blobs"

    def resolved_registry_dir(self) -> Path:
        return self.registry_dir or self.data_dir / "registry"
