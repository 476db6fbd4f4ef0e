"""``TaskQueue``: every state transition of a task, each in one transaction.

It owns no threads and no HTTP; the API and workers call it. The client's operations live in
``queue.submission``, the worker's in ``queue.claim``, what they share in ``queue.core``; this
module adds housekeeping (lease recovery, wake-ups, statistics, retention). Time comes from an
injectable clock (UTC) so tests can expire leases without sleeping. Lease expiry compares the
clocks of the worker that set the lease and the process that recovers it: keep hosts on NTP.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from gpufleet.queue import sql
from gpufleet.queue.claim import WorkerOps
from gpufleet.queue.core import utcnow
from gpufleet.queue.notify import finished_topics
from gpufleet.queue.submission import SubmissionOps
from gpufleet.queue.tasks import (
    POSITION_CAP,
    DepthRow,
    Lane,
    QueuePlace,
    QueueStats,
    Recovery,
    Task,
    TaskError,
    TaskStatus,
)
from gpufleet.queue.validation import Limits, check_lane
from gpufleet.settings import Settings
from gpufleet.store.engine import read_tx, write_tx
from gpufleet.store.schema import tasks

t = tasks.c
__all__ = ["TaskQueue", "utcnow"]


class TaskQueue(SubmissionOps, WorkerOps):
    @classmethod
    def from_settings(cls, settings: Settings, engine: Engine | None = None) -> TaskQueue:
        """The queue an entry point configures: database, blobs and limits from ``settings``."""
        from gpufleet.store import LocalBlobStore, create_engine

        return cls(
            engine or create_engine(settings.resolved_database_url()),
            LocalBlobStore(settings.resolved_blob_dir()),
            limits=Limits(
                inline_input_limit=settings.inline_input_limit,
                max_input_bytes=settings.max_input_bytes,
                default_max_attempts=settings.default_max_attempts,
                max_queued_per_tenant=settings.max_queued_per_tenant or None,
            ),
            lease_s=settings.lease_s,
            retry_backoff_s=settings.retry_backoff_s,
            retry_backoff_max_s=settings.retry_backoff_max_s,
            batch_lane_every=settings.batch_lane_every,
        )

    def recover_expired(self, limit: int = 1000) -> Recovery:
        """Tasks whose worker stopped heartbeating go back to the queue (with backoff) or, out
        of attempts, end ``failed`` with ``lease_expired``. Safe to run from many processes."""
        return self._recover(
            sql.EXPIRED_LEASES,
            {"p_now": self.clock(), "p_limit": limit},
            lambda row: TaskError(
                "lease_expired",
                f"worker {row['lease_owner']} stopped heartbeating (attempt "
                f"{row['attempts']} of {row['max_attempts']}); its lease expired",
            ),
        )

    def recover_worker(self, worker_id: str, reason: str) -> Recovery:
        """The tasks of a worker known to be dead (its process exited), at once rather than
        when their leases run out: queued again with backoff, or out of attempts ``failed``
        with ``worker_died`` and ``reason`` (e.g. the explained crash)."""
        return self._recover(
            sql.HELD_BY_WORKER,
            {"p_owner": worker_id},
            lambda row: TaskError(
                "worker_died",
                f"{reason} (attempt {row['attempts']} of {row['max_attempts']})"[:2000],
            ),
        )

    def _recover(
        self,
        query: sa.Select[Any],
        params: dict[str, Any],
        error_for: Callable[[sa.RowMapping], TaskError],
    ) -> Recovery:
        now = self.clock()
        requeued: list[str] = []
        failed: list[str] = []
        cancelled: list[str] = []
        models: set[str] = set()
        with write_tx(self.engine) as conn:
            for row in conn.execute(query, params).mappings().all():
                error = error_for(row)
                if row["cancel_requested"]:
                    values, bucket = self._cancelled(now), cancelled
                elif row["attempts"] < row["max_attempts"]:
                    values, bucket = self._requeued(now, row["attempts"], error), requeued
                    models.add(row["model"])
                else:
                    values, bucket = self._failed(now, error), failed
                conn.execute(sa.update(tasks).where(t.id == row["id"]).values(values))
                bucket.append(row["id"])
            models.update(finished_topics(failed + cancelled))
            self.notifier.in_transaction(conn, models)
        self.notifier.after_commit(models)
        return Recovery(tuple(requeued), tuple(failed), tuple(cancelled))

    def wait_for_work(
        self,
        model: str,
        version: str,
        timeout: float,
        lanes: Iterable[str] = (Lane.INTERACTIVE, Lane.BATCH),
    ) -> bool:
        """Block until work for this model may be claimable (a wake-up, or a task in backoff
        becoming due) or ``timeout`` seconds pass. Call it after a claim came back empty."""
        lane_list = [check_lane(lane) for lane in lanes]
        with read_tx(self.engine) as conn:
            due = conn.execute(
                sql.NEXT_DUE,
                {"p_model": model, "p_version": version, "p_lanes": [x.value for x in lane_list]},
            ).scalar()
        if due is not None:
            until_due = (due - self.clock()).total_seconds()
            if until_due <= 0:
                return True
            if until_due < timeout:
                return self.notifier.wait(model, until_due) or True
        return self.notifier.wait(model, timeout)

    def stats(self) -> QueueStats:
        now = self.clock()
        with read_tx(self.engine) as conn:
            rows = conn.execute(sql.DEPTH).all()
        return QueueStats(
            [
                DepthRow(
                    model=r[0],
                    lane=Lane(r[1]),
                    status=TaskStatus(r[2]),
                    count=int(r[3]),
                    oldest_age_s=_age(now, r[4]),
                )
                for r in sorted(rows, key=lambda r: (r[0], r[1], r[2]))
            ]
        )

    def queue_position(self, task: Task) -> QueuePlace | None:
        """A queued task's place in its lane, in the order claims take them (1: next), and
        the lane's length, each counted up to ``POSITION_CAP`` (beyond, ``capped`` is set and
        the figure reads ``POSITION_CAP + 1``: more than that); ``None`` once it is no longer
        queued. Costs at most a few thousand index entries however deep the backlog."""
        if task.status != TaskStatus.QUEUED:
            return None
        cap = POSITION_CAP + 1
        params = {
            "p_model": task.model, "p_version": task.model_version, "p_lane": task.lane.value,
            "p_priority": task.priority, "p_id": task.id, "p_cap": cap,
        }  # fmt: skip
        with read_tx(self.engine) as conn:
            higher, older, total, present = conn.execute(sql.QUEUE_POSITION, params).one()
        if not present:
            return None  # claimed (or cancelled) since it was read
        position = min(int(higher) + int(older) + 1, cap)
        length = max(int(total), position)
        return QueuePlace(position, length, capped=length >= cap)

    def purge_finished(self, older_than: timedelta) -> int:
        """Delete tasks that finished more than ``older_than`` ago; returns how many."""
        cutoff = self.clock() - older_than
        with write_tx(self.engine) as conn:
            result = conn.execute(
                sa.delete(tasks).where(
                    t.status.in_([s.value for s in TaskStatus if s.is_finished]),
                    t.finished_at < cutoff,
                )
            )
        return int(result.rowcount or 0)


def _age(now: datetime, then: datetime | None) -> float | None:
    if then is None:
        return None
    return max(0.0, (now - then).total_seconds())
