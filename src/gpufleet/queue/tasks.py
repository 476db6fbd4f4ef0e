"""The task record, its states and lanes, and the small value types the queue returns.

State machine (each transition is one transaction of ``TaskQueue``: client operations in
``queue.submission``, the worker's in ``queue.claim``, housekeeping in ``queue.manager``)::

    queued ──claim──> running ──complete──> succeeded
      ^  │              │ ├──fail (retryable, attempts left) / lease expired──> queued
      │  │              │ └──fail (final) / lease expired, no attempts left──> failed
      │  └──cancel──────┴──cancel acknowledged (or any finish after a cancel request)──> cancelled
      └──release (drain: handed back unstarted, attempt not counted)
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.engine import RowMapping

from gpufleet.wire import QUEUE_POSITION_CAP


class TaskStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_finished(self) -> bool:
        return self in FINISHED


FINISHED = frozenset({TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED})
LIVE = (TaskStatus.QUEUED, TaskStatus.RUNNING)


class Lane(enum.StrEnum):
    INTERACTIVE = "interactive"
    BATCH = "batch"


@dataclass(frozen=True)
class TaskError:
    code: str
    message: str


@dataclass(frozen=True)
class TaskSpec:
    """What a caller asks for. Validated by ``queue.validation.prepare``."""

    model: str
    version: str
    input: Any = None
    tenant: str = "default"
    lane: str = Lane.INTERACTIVE
    priority: int = 0
    idempotency_key: str | None = None
    max_attempts: int | None = None
    webhook_url: str | None = None  # POSTed the finished task once (http or https)


@dataclass(frozen=True)
class Task:
    id: str
    tenant: str
    model: str
    model_version: str
    lane: Lane
    priority: int
    status: TaskStatus
    attempts: int
    max_attempts: int
    created_at: datetime
    not_before: datetime
    input: Any = None
    input_ref: str | None = None
    lease_owner: str | None = None
    lease_expires_at: datetime | None = None
    cancel_requested: bool = False
    result: Any = None
    result_ref: str | None = None
    error: TaskError | None = None
    idempotency_key: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    webhook_url: str | None = None
    webhook_state: str | None = None

    @classmethod
    def from_row(cls, row: RowMapping) -> Task:
        error = (
            TaskError(row["error_code"], row["error_message"] or "")
            if row["error_code"] is not None
            else None
        )
        return cls(
            id=row["id"],
            tenant=row["tenant"],
            model=row["model"],
            model_version=row["model_version"],
            lane=Lane(row["lane"]),
            priority=row["priority"],
            status=TaskStatus(row["status"]),
            attempts=row["attempts"],
            max_attempts=row["max_attempts"],
            created_at=row["created_at"],
            not_before=row["not_before"],
            input=row["input"],
            input_ref=row["input_ref"],
            lease_owner=row["lease_owner"],
            lease_expires_at=row["lease_expires_at"],
            cancel_requested=bool(row["cancel_requested"]),
            result=row["result"],
            result_ref=row["result_ref"],
            error=error,
            idempotency_key=row["idempotency_key"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            webhook_url=row["webhook_url"],
            webhook_state=row["webhook_state"],
        )

    @classmethod
    def from_claim(
        cls, row: RowMapping, *, model: str, version: str, worker_id: str, lease_until: datetime
    ) -> Task:
        """A task as ``sql.CLAIM`` returns it: the columns it does not return are known."""
        return cls(
            id=row["id"],
            tenant=row["tenant"],
            model=model,
            model_version=version,
            lane=Lane(row["lane"]),
            priority=row["priority"],
            status=TaskStatus.RUNNING,
            attempts=row["attempts"],
            max_attempts=row["max_attempts"],
            created_at=row["created_at"],
            not_before=row["not_before"],
            input=row["input"],
            input_ref=row["input_ref"],
            lease_owner=worker_id,
            lease_expires_at=lease_until,
            started_at=row["started_at"],
        )

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished


@dataclass(frozen=True)
class Submission:
    task: Task
    created: bool  # False when an idempotency key matched an earlier submission


@dataclass(frozen=True)
class Heartbeat:
    held: frozenset[str]  # leases extended
    lost: frozenset[str]  # no longer this worker's: stop working on them
    cancel_requested: frozenset[str]  # held, but the client asked to cancel: stop and ack


@dataclass(frozen=True)
class Completion:
    accepted: tuple[str, ...]  # results recorded (or cancelled, if a cancel was requested)
    rejected: dict[str, TaskStatus] = field(default_factory=dict)  # already finished: status


@dataclass(frozen=True)
class Recovery:
    requeued: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()
    cancelled: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return len(self.requeued) + len(self.failed) + len(self.cancelled)


@dataclass(frozen=True)
class TaskPage:
    items: list[Task]
    next_cursor: str | None


@dataclass(frozen=True)
class DepthRow:
    model: str
    lane: Lane
    status: TaskStatus
    count: int
    oldest_age_s: float | None  # age of the oldest task in this row (queued rows: wait so far)


POSITION_CAP = QUEUE_POSITION_CAP  # a queued task's place is counted up to this many


@dataclass(frozen=True)
class QueuePlace:
    """A queued task's place in its lane (1: claimed next) and the lane's length. Counted up
    to ``POSITION_CAP``: with ``capped``, ``length`` (and ``position`` when the task is that far
    back) reads ``POSITION_CAP + 1``, meaning more than ``POSITION_CAP``."""

    position: int
    length: int
    capped: bool = False


@dataclass(frozen=True)
class QueueStats:
    depth: list[DepthRow]

    def count(self, *, model: str | None = None, status: TaskStatus | None = None) -> int:
        return sum(
            r.count
            for r in self.depth
            if (model is None or r.model == model) and (status is None or r.status == status)
        )
