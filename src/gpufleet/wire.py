"""The bodies the HTTP API answers with, as the API and its clients both read them.

Light on purpose: pydantic and nothing of the server (no SQLAlchemy, no FastAPI), so that
``import gpufleet.client`` stays quick. The API builds these from its records in
``gpufleet.api.schemas``; request bodies, which need the queue's limits, live there too.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

LaneName = Literal["interactive", "batch"]
StatusName = Literal["queued", "running", "succeeded", "failed", "cancelled"]


# A queued task's place and its lane's length are counted up to this many (queue_capped beyond).
QUEUE_POSITION_CAP = 10_000


class _Wire(BaseModel):
    # Validators are built at first use, not at import: most processes that import the client
    # read two or three of these bodies.
    model_config = ConfigDict(defer_build=True)


class ErrorInfo(_Wire):
    code: str
    message: str


class ErrorBody(_Wire):
    error: dict[str, Any] = Field(
        description='{"code": stable error code, "message": text, "fields"?: [...], ...}'
    )


class TaskView(_Wire):
    id: str
    tenant: str
    model: str
    version: str
    lane: LaneName
    priority: int
    status: StatusName
    attempts: int
    max_attempts: int
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: ErrorInfo | None
    webhook_url: str | None = None
    result_url: str | None = Field(None, description="where the result is, once succeeded")
    queue_position: int | None = Field(
        None,
        description="while queued and asked for one task: 1 when it is claimed next in its "
        "model's lane, counting the queued tasks ahead of it (higher priority, then older)",
    )
    queue_length: int | None = Field(
        None, description="with queue_position: the tasks queued in that lane in all"
    )
    queue_capped: bool | None = Field(
        None,
        description=f"with queue_position: true when the lane holds more than "
        f"{QUEUE_POSITION_CAP:,} queued tasks; both figures are counted up to "
        f"{QUEUE_POSITION_CAP:,}, and {QUEUE_POSITION_CAP + 1:,} means more than that",
    )


class Submitted(_Wire):
    id: str
    status: StatusName
    model: str
    version: str
    created: bool = Field(description="false when an idempotency key matched an earlier task")


class BulkItem(_Wire):
    """One task of a bulk submit: ``id`` and ``status`` when accepted, else ``error``."""

    index: int
    id: str | None = None
    status: StatusName | None = None
    model: str | None = None
    version: str | None = None
    created: bool | None = None
    error: dict[str, Any] | None = None


class BulkSubmitted(_Wire):
    accepted: int
    refused: int
    tasks: list[BulkItem]


class ResultView(_Wire):
    id: str
    status: StatusName
    result: Any = None
    error: ErrorInfo | None = None


class TaskList(_Wire):
    tasks: list[TaskView]
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next page")


class WorkerCounts(_Wire):
    ready: int
    total: int


class BatchingView(_Wire):
    max_batch_size: int
    max_queue_delay_ms: float


class ModelView(_Wire):
    name: str
    version: str
    description: str
    batching: BatchingView
    workers: WorkerCounts | None = Field(None, description="local workers (gpufleet serve)")
    queue: dict[str, int] = Field(description="tasks by lane and state: queued_interactive, ...")
    input_schema: dict[str, Any]
    example_input: Any


class ModelList(_Wire):
    models: list[ModelView]


class Health(_Wire):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str]


class DepthView(_Wire):
    model: str
    lane: LaneName
    status: Literal["queued", "running"]
    count: int
    oldest_age_s: float | None = Field(description="age of the oldest task of this row")


class QueueView(_Wire):
    """``GET /v1/queue``: what ``gpufleet watch`` shows."""

    depth: list[DepthView] = Field(description="live tasks by model, lane and state")
    workers: dict[str, WorkerCounts] | None = Field(
        None, description="local workers by model (gpufleet serve); null when they run elsewhere"
    )
    finished: dict[str, int] = Field(
        description="tasks ended by this server's workers since it started, by model (the "
        "gpufleet_tasks_finished_total counter): a rate is the change between two reads"
    )
