"""Request and response bodies of the HTTP API (they make the OpenAPI document).

The response bodies are ``gpufleet.wire``'s, shared with the client; this module adds the
request bodies (which check the queue's limits) and builds responses from the queue's records.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from gpufleet.queue import QueuePlace, QueueStats, Task
from gpufleet.queue.validation import MAX_ATTEMPTS_LIMIT, PRIORITY_MAX, PRIORITY_MIN
from gpufleet.wire import (
    BatchingView,
    BulkItem,
    BulkSubmitted,
    DepthView,
    ErrorBody,
    ErrorInfo,
    Health,
    LaneName,
    ModelList,
    ModelView,
    QueueView,
    ResultView,
    StatusName,
    Submitted,
    TaskList,
    TaskView,
    WorkerCounts,
)

__all__ = [
    "BatchingView",
    "BulkItem",
    "BulkSubmitRequest",
    "BulkSubmitted",
    "DepthView",
    "ErrorBody",
    "ErrorInfo",
    "Health",
    "InferRequest",
    "LaneName",
    "LookupRequest",
    "ModelList",
    "ModelView",
    "QueueView",
    "ResultView",
    "StatusName",
    "SubmitRequest",
    "Submitted",
    "TaskList",
    "TaskOptions",
    "TaskView",
    "WorkerCounts",
    "depth_views",
    "task_view",
]


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


def task_view(t: Task, position: QueuePlace | None = None) -> TaskView:
    """The API's view of a task; ``position`` (its place in its lane, the lane's length) is
    given only where one task is asked for, since it costs a count."""
    return TaskView(
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
        queue_position=position.position if position else None,
        queue_length=position.length if position else None,
        queue_capped=position.capped if position else None,
    )


def depth_views(stats: QueueStats) -> list[DepthView]:
    return [
        DepthView(model=r.model, lane=r.lane.value, status=r.status.value, count=r.count,
                  oldest_age_s=r.oldest_age_s)
        for r in stats.depth
    ]  # fmt: skip
