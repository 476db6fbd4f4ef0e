"""``QueueCore``: what every part of ``TaskQueue`` shares: engines, blob store, limits, clock,
wake-ups, and the values of the transitions that several operations make (requeue with backoff,
fail, cancel)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from gpufleet.queue.notify import Notifier, notifier_for
from gpufleet.queue.tasks import Task, TaskError, TaskStatus
from gpufleet.queue.validation import Limits
from gpufleet.store.blobs import BlobStore
from gpufleet.store.engine import autocommit, relaxed_engine, write_tx
from gpufleet.store.schema import tasks

Clock = Callable[[], datetime]


def webhook_due(now: datetime | sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
    """The value of ``webhook_next_at`` when a task ends: due now if a webhook is owed. Until
    then it is NULL, so the dispatcher's index holds only deliveries that can be made."""
    return sa.case((tasks.c.webhook_state == "pending", now), else_=tasks.c.webhook_next_at)


def utcnow() -> datetime:
    return datetime.now(UTC)


class QueueCore:
    def __init__(
        self,
        engine: Engine,
        blobs: BlobStore,
        *,
        limits: Limits | None = None,
        lease_s: float = 30.0,
        retry_backoff_s: float = 1.0,
        retry_backoff_max_s: float = 300.0,
        batch_lane_every: int = 4,
        clock: Clock = utcnow,
        notifier: Notifier | None = None,
    ) -> None:
        self.engine = engine
        self.blobs = blobs
        self.limits = limits or Limits()
        self.lease_s = lease_s
        self.retry_backoff_s = retry_backoff_s
        self.retry_backoff_max_s = retry_backoff_max_s
        self.batch_lane_every = batch_lane_every
        self.clock = clock
        self.notifier = notifier or notifier_for(engine)
        # Claims per (model, version), for the batch lane's share; per process, like the
        # worker that makes them.
        self._claims: dict[tuple[str, str], itertools.count[int]] = {}
        self._relaxed = relaxed_engine(engine)

    def close(self) -> None:
        self.notifier.close()
        if self._relaxed is not None:
            self._relaxed.dispose()

    def _relaxed_tx(self) -> AbstractContextManager[Connection]:
        """For claims and heartbeats: a claim lost in a database crash leaves its tasks queued,
        as if the lease had expired, and a lost heartbeat only shortens a lease; so these
        commits need not wait for the disk."""
        if self._relaxed is not None:
            return autocommit(self._relaxed)
        return write_tx(self.engine, durable=False)

    def load_input(self, task: Task) -> Any:
        return task.input if task.input_ref is None else json.loads(self.blobs.get(task.input_ref))

    def load_result(self, task: Task) -> Any:
        if task.result_ref is None:
            return task.result
        return json.loads(self.blobs.get(task.result_ref))

    def backoff(self, attempts: int) -> timedelta:
        """Delay before attempt ``attempts + 1``: base * 2^(attempts-1), capped."""
        seconds = self.retry_backoff_s * 2 ** max(0, attempts - 1)
        return timedelta(seconds=min(seconds, self.retry_backoff_max_s))

    def _requeued(self, now: datetime, attempts: int, error: TaskError) -> dict[str, Any]:
        return {
            "status": TaskStatus.QUEUED.value,
            "not_before": now + self.backoff(attempts),
            "lease_owner": None,
            "lease_expires_at": None,
            "error_code": error.code,
            "error_message": error.message,
        }

    @staticmethod
    def _failed(now: datetime, error: TaskError) -> dict[str, Any]:
        return {
            "status": TaskStatus.FAILED.value,
            "finished_at": now,
            "webhook_next_at": webhook_due(now),
            "lease_owner": None,
            "lease_expires_at": None,
            "error_code": error.code,
            "error_message": error.message,
        }

    @staticmethod
    def _cancelled(now: datetime) -> dict[str, Any]:
        return {
            "status": TaskStatus.CANCELLED.value,
            "finished_at": now,
            "webhook_next_at": webhook_due(now),
            "lease_owner": None,
            "lease_expires_at": None,
        }
