"""Webhook delivery: POST each finished task to its ``webhook_url``, retrying with backoff.

Delivery is at-least-once: a dispatcher that dies after the receiver answered but before the
answer was recorded sends again once its lease lapses, so receivers should dedupe by task id
(also in the ``X-Gpufleet-Task-Id`` header). Any number of dispatchers may share one database;
a claim's lease keeps two of them from sending the same task at the same time.
"""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
import sqlalchemy as sa

from gpufleet import __version__
from gpufleet.errors import GpufleetError
from gpufleet.queue import Task, TaskQueue, TaskStatus
from gpufleet.queue.core import Clock
from gpufleet.store.engine import write_tx
from gpufleet.store.schema import tasks
from gpufleet.store.types import UtcDateTime

log = logging.getLogger(__name__)

t = tasks.c
# A literal, not a parameter, so PostgreSQL can prove the query matches the partial index
# ix_tasks_webhook_due (see queue/sql.py on IS_QUEUED).
_PENDING = t.webhook_state == sa.literal_column("'pending'")
_FINISHED: list[sa.ColumnElement[str]] = [
    sa.literal_column(f"'{s.value}'") for s in TaskStatus if s.is_finished
]
_now = sa.bindparam("p_now", type_=UtcDateTime())

# Take up to :limit finished tasks whose delivery is due, and push their webhook_next_at past
# the attempt's lease in the same statement: once committed, no other dispatcher sees them as due
# until the lease lapses. PostgreSQL: SKIP LOCKED lets concurrent dispatchers pass over rows
# another is claiming instead of waiting for it; SQLite: the caller's BEGIN IMMEDIATE serialises
# them. webhook_attempts counts the attempt now, so a dispatcher that dies mid-send still uses
# one up. Uses ix_tasks_webhook_due (webhook_next_at) WHERE webhook_state = 'pending'.
_due = (
    sa.select(t.id)
    .where(_PENDING, t.webhook_next_at <= _now, t.status.in_(_FINISHED))
    .order_by(t.webhook_next_at)
    .limit(sa.bindparam("p_limit", type_=sa.Integer))
    .with_for_update(skip_locked=True)
    .cte("due")
)
CLAIM_DUE = (
    sa.update(tasks)
    .where(t.id.in_(sa.select(_due.c.id)))
    .values(
        webhook_next_at=sa.bindparam("p_lease_until", type_=UtcDateTime()),
        webhook_attempts=t.webhook_attempts + 1,
    )
    .returning(*tasks.c)
)
# Record an attempt's outcome, only if the claim is still ours: the attempt number fences off a
# dispatcher whose lease lapsed and whose task another dispatcher has claimed since.
RECORD = (
    sa.update(tasks)
    .where(
        t.id == sa.bindparam("p_id"),
        t.webhook_attempts == sa.bindparam("p_attempt", type_=sa.Integer),
        _PENDING,
    )
    .values(
        webhook_state=sa.bindparam("p_state"),
        webhook_next_at=sa.bindparam("p_next_at", type_=UtcDateTime()),
    )
)


@dataclass(frozen=True)
class Attempt:
    task: Task
    url: str
    number: int  # 1 for the first delivery; sent as X-Gpufleet-Delivery


def payload(task: Task, result: Any) -> dict[str, Any]:
    """The JSON body a receiver gets."""
    return {
        "id": task.id,
        "status": task.status.value,
        "model": task.model,
        "version": task.model_version,
        "result": result,
        "error": {"code": task.error.code, "message": task.error.message} if task.error else None,
        "finished_at": task.finished_at.isoformat() if task.finished_at else None,
    }


class WebhookDispatcher:
    """Delivers due webhooks in rounds of up to ``batch`` tasks, sent in parallel.

    Retries follow ``backoff_s * 2**(attempt-1)`` capped at ``backoff_max_s``; after
    ``max_attempts`` the task's ``webhook_state`` becomes ``failed``. Redirects are not followed
    (a 3xx counts as a failed attempt). An attempt's lease is ``lease_s``, by default 3 *
    ``timeout_s`` + 5 s (connecting, sending and the answer may each take ``timeout_s``); an
    attempt that outlasts it, which only a receiver that trickles bytes can cause, may be sent
    twice.
    """

    def __init__(
        self,
        queue: TaskQueue,
        *,
        clock: Clock | None = None,
        timeout_s: float = 10.0,
        max_attempts: int = 8,
        backoff_s: float = 1.0,
        backoff_max_s: float = 300.0,
        batch: int = 16,
        lease_s: float | None = None,
    ) -> None:
        self.queue = queue
        self.engine = queue.engine
        self.clock = clock or queue.clock
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.batch = batch
        self.lease = timedelta(seconds=3 * timeout_s + 5 if lease_s is None else lease_s)
        self._http = httpx.Client(
            timeout=timeout_s,
            follow_redirects=False,
            headers={"User-Agent": f"gpufleet/{__version__}"},
        )
        self._senders = ThreadPoolExecutor(batch, thread_name_prefix="gpufleet-webhook")

    def close(self) -> None:
        self._senders.shutdown(wait=True)
        self._http.close()

    def backoff(self, attempt: int) -> timedelta:
        """Delay after failed attempt number ``attempt``."""
        return timedelta(seconds=min(self.backoff_s * 2 ** (attempt - 1), self.backoff_max_s))

    def claim_due(self, limit: int) -> list[Attempt]:
        """Lease up to ``limit`` due deliveries to this dispatcher (``CLAIM_DUE``)."""
        with write_tx(self.engine) as conn:
            now = self.clock()
            rows = conn.execute(
                CLAIM_DUE, {"p_now": now, "p_limit": limit, "p_lease_until": now + self.lease}
            ).mappings()
            return [
                Attempt(Task.from_row(r), r["webhook_url"], r["webhook_attempts"]) for r in rows
            ]

    def deliver_due(self, limit: int | None = None) -> int:
        """One round: claim up to ``limit`` (default ``batch``) due deliveries, send them, record
        the outcomes. Returns how many were attempted, delivered or not."""
        attempts = self.claim_due(min(limit or self.batch, self.batch))
        if not attempts:
            return 0
        outcomes = list(self._senders.map(self._send, attempts))
        now = self.clock()
        records = [self._record(a, error, now) for a, error in zip(attempts, outcomes, strict=True)]
        with write_tx(self.engine) as conn:
            conn.execute(RECORD, records)
        return len(attempts)

    def _send(self, attempt: Attempt) -> str | None:
        """POST one task; None when the receiver answered 2xx, else why not (no URL, no body:
        either may hold a receiver's secrets)."""
        task = attempt.task
        try:
            body = json.dumps(payload(task, self.queue.load_result(task)), separators=(",", ":"))
            # Streamed and closed unread: only the status matters, and a receiver's answer
            # body could be arbitrarily large or slow.
            with self._http.stream(
                "POST",
                attempt.url,
                content=body.encode(),
                headers={
                    "Content-Type": "application/json",
                    "X-Gpufleet-Task-Id": task.id,
                    "X-Gpufleet-Delivery": str(attempt.number),
                },
            ) as response:
                status = response.status_code
        except Exception as e:  # HTTP errors, a bad URL, an unreadable result blob
            return e.code if isinstance(e, GpufleetError) else type(e).__name__
        return None if 200 <= status < 300 else f"HTTP {status}"

    def _record(self, attempt: Attempt, error: str | None, now: datetime) -> dict[str, Any]:
        values: dict[str, Any] = {"p_id": attempt.task.id, "p_attempt": attempt.number}
        if error is None:
            return values | {"p_state": "delivered", "p_next_at": None}
        if attempt.number >= self.max_attempts:
            log.warning(
                "webhook for task %s failed after %d attempts, giving up: %s",
                attempt.task.id,
                attempt.number,
                error,
            )
            return values | {"p_state": "failed", "p_next_at": None}
        delay = self.backoff(attempt.number)
        log.info(
            "webhook for task %s failed (attempt %d of %d: %s); retrying in %.0f s",
            attempt.task.id,
            attempt.number,
            self.max_attempts,
            error,
            delay.total_seconds(),
        )
        return values | {"p_state": "pending", "p_next_at": now + delay}

    def run(self, stop: threading.Event, interval_s: float = 0.5) -> None:
        """Deliver until ``stop`` is set: the body of a background thread. Errors are logged
        and the loop goes on (a database outage ends when the database is back); a full round
        goes again at once. Closes the dispatcher when it returns."""
        try:
            while not stop.is_set():
                try:
                    busy = self.deliver_due() >= self.batch
                except GpufleetError as e:
                    log.error("webhook delivery round failed: %s", e)
                    busy = False
                except Exception:
                    log.exception("webhook delivery round failed")
                    busy = False
                if not busy:
                    stop.wait(interval_s)
        finally:
            self.close()
