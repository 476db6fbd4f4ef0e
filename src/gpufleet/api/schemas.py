"""Request and response bodies of the HTTP API (they make the OpenAPI document)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from gpufleet.queue import Task
from gpufleet.queue.validation import MAX_ATTEMPTS_LIMIT, PRIORITY_MAX, PRIORITY_MIN

LaneName = Literal["interactive", "batch"]
StatusName = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TaskOptions(_Body):
    lane: LaneName = Field("interactive", description="interactive (fast) or batch (bulk)")
    priority: int = Field(0, ge=PRIORITY_MIN, le=PRIORITY_MAX, description="higher runs first")
    idempotency_key: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        description="a retry with the same key returns the first task instead of a new one",
    )
    webhook_url: str | None = Field(
        None, max_length=2048, description="POSTed the finished task once it ends"
    )
    max_attempts: int | None = Field(None, ge=1, le=MAX_ATTEMPTS_LIMIT)
    version: str | None = Field(None, description="model version; default: the deployed one")


class SubmitRequest(TaskOptions):
    model: str = Field(description="a deployed model's name (GET /v1/models)")
    input: Any = Field(description="the model's input (its input_schema in GET /v1/models)")


class BulkSubmitRequest(_Body):
    tasks: list[SubmitRequest] = Field(
        min_length=1, max_length=1000, description="up to 1,000 tasks, committed together"
    )


class LookupRequest(_Body):
    ids: list[str] = Field(min_length=1, max_length=1000, description="task ids (up to 1,000)")


class InferRequest(TaskOptions):
    input: Any = Field(description="the model's input (its input_schema in GET /v1/models)")


class ErrorInfo(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: dict[str, Any] = Field(
        description='{"code": stable error code, "message": text, "fields"?: [...], ...}'
    )


class TaskView(BaseModel):
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

    @classmethod
    def of(cls, t: Task) -> TaskView:
        return cls(
            id=t.id,
            tenant=t.tenant,
            model=t.model,
            version=t.model_version,
            lane=t.lane.value,
            priority=t.priority,
            status=t.status.value,
            attempts=t.attempts,
            max_attempts=t.max_attempts,
            cancel_requested=t.cancel_requested,
            created_at=t.created_at,
            started_at=t.started_at,
            finished_at=t.finished_at,
            error=ErrorInfo(code=t.error.code, message=t.error.message) if t.error else None,
            webhook_url=t.webhook_url,
            result_url=f"/v1/tasks/{t.id}/result" if t.status.value == "succeeded" else None,
        )


class Submitted(BaseModel):
    id: str
    status: StatusName
    model: str
    version: str
    created: bool = Field(description="false when an idempotency key matched an earlier task")


class BulkItem(BaseModel):
    """One task of a bulk submit: ``id`` and ``status`` when accepted, else ``error``."""

    index: int
    id: str | None = None
    status: StatusName | None = None
    model: str | None = None
    version: str | None = None
    created: bool | None = None
    error: dict[str, Any] | None = None


class BulkSubmitted(BaseModel):
    accepted: int
    refused: int
    tasks: list[BulkItem]


class ResultView(BaseModel):
    id: str
    status: StatusName
    result: Any = None
    error: ErrorInfo | None = None


class TaskList(BaseModel):
    tasks: list[TaskView]
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next page")


class WorkerCounts(BaseModel):
    ready: int
    total: int


class BatchingView(BaseModel):
    max_batch_size: int
    max_queue_delay_ms: float


class ModelView(BaseModel):
    name: str
    version: str
    description: str
    batching: BatchingView
    workers: WorkerCounts | None = Field(None, description="local workers (gpufleet serve)")
    queue: dict[str, int] = Field(description="tasks by lane and state: queued_interactive, ...")
    input_schema: dict[str, Any]
    example_input: Any


class ModelList(BaseModel):
    models: list[ModelView]


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str]
