"""The queue's hot statements, in one place for both dialects.

SQLAlchemy renders them for SQLite and PostgreSQL; where the two differ it is noted. Each says
which index in ``store/schema.py`` it relies on.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from gpufleet.queue.tasks import Lane, TaskStatus
from gpufleet.store.schema import tasks
from gpufleet.store.types import UtcDateTime

t = tasks.c


def claim(
    *,
    model: str,
    version: str,
    lane: Lane,
    limit: int,
    worker_id: str,
    now: datetime,
    lease_until: datetime,
) -> sa.Update:
    """Take up to ``limit`` ready tasks of one lane: best priority first, then oldest.

    PostgreSQL: ``FOR UPDATE SKIP LOCKED`` lets concurrent claimers pass over each other's rows
    instead of queueing behind them; the CTE is evaluated once, so the LIMIT holds. SQLite
    ignores the locking clause: the caller's ``BEGIN IMMEDIATE`` already serialises claimers.
    Uses ``ix_tasks_claim`` (model, model_version, lane, priority DESC, id) WHERE queued.
    """
    picked = (
        sa.select(t.id)
        .where(
            t.status == TaskStatus.QUEUED.value,
            t.model == model,
            t.model_version == version,
            t.lane == lane.value,
            t.not_before <= now,
        )
        .order_by(t.priority.desc(), t.id)
        .limit(limit)
        .with_for_update(skip_locked=True)
        .cte("picked")
    )
    return (
        sa.update(tasks)
        .where(t.id.in_(sa.select(picked.c.id)))
        .values(
            status=TaskStatus.RUNNING.value,
            attempts=t.attempts + 1,
            lease_owner=worker_id,
            lease_expires_at=lease_until,
            started_at=sa.func.coalesce(t.started_at, now),
        )
        .returning(*tasks.c)
    )


def extend_leases(worker_id: str, task_ids: Sequence[str], lease_until: datetime) -> sa.Update:
    """Heartbeat: only rows this worker still holds. Primary-key lookups."""
    return (
        sa.update(tasks)
        .where(
            t.id.in_(task_ids),
            t.lease_owner == worker_id,
            t.status == TaskStatus.RUNNING.value,
        )
        .values(lease_expires_at=lease_until)
        .returning(t.id, t.cancel_requested)
    )


def lock_for_finish(task_ids: Sequence[str]) -> sa.Select[Any]:
    """Lock rows about to end, so two finishers of one task serialise and the second sees the
    first's outcome (READ COMMITTED re-reads the row after the wait). Primary-key lookups."""
    return (
        sa.select(t.id, t.status, t.lease_owner, t.cancel_requested)
        .where(t.id.in_(task_ids))
        .with_for_update()
    )


def expired_leases(now: datetime, limit: int) -> sa.Select[Any]:
    """Running tasks whose lease ran out. Uses ``ix_tasks_lease`` WHERE running."""
    return (
        sa.select(t.id, t.model, t.lease_owner, t.attempts, t.max_attempts, t.cancel_requested)
        .where(t.status == TaskStatus.RUNNING.value, t.lease_expires_at < now)
        .order_by(t.lease_expires_at)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )


def next_due(model: str, version: str, lanes: Sequence[Lane]) -> sa.Select[Any]:
    """When the earliest queued task (e.g. one in retry backoff) becomes claimable."""
    return sa.select(sa.func.min(t.not_before, type_=UtcDateTime())).where(
        t.status == TaskStatus.QUEUED.value,
        t.model == model,
        t.model_version == version,
        t.lane.in_([lane.value for lane in lanes]),
    )


def depth() -> sa.Select[Any]:
    """Live tasks per model / lane / status. Uses ``ix_tasks_live``; history is not scanned."""
    return (
        sa.select(
            t.model,
            t.lane,
            t.status,
            sa.func.count(),
            sa.func.min(t.created_at, type_=UtcDateTime()),
        )
        .where(t.status.in_([TaskStatus.QUEUED.value, TaskStatus.RUNNING.value]))
        .group_by(t.model, t.lane, t.status)
        .order_by(t.model, t.lane, t.status)
    )
