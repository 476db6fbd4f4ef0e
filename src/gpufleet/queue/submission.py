"""Submitting, reading, listing and cancelling tasks: the client's side of the queue."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from gpufleet.errors import IdempotencyConflict, NotFound, QuotaExceeded, TaskFinished
from gpufleet.queue import sql
from gpufleet.queue.core import QueueCore, webhook_due
from gpufleet.queue.ids import new_task_id
from gpufleet.queue.notify import CHANNEL, PostgresNotifier, finished_topics
from gpufleet.queue.tasks import Submission, Task, TaskError, TaskPage, TaskSpec, TaskStatus
from gpufleet.queue.validation import PreparedTask, check_int, check_name, check_status, prepare
from gpufleet.store.engine import autocommit, read_tx, write_tx
from gpufleet.store.schema import tasks

t = tasks.c
MAX_PAGE = 1000


class SubmissionOps(QueueCore):
    def submit(self, spec: TaskSpec) -> Submission:
        return self.submit_many([spec])[0]

    def submit_many(self, specs: Sequence[TaskSpec]) -> list[Submission]:
        """Submit several tasks in one transaction: all are accepted, or none is."""
        return self.submit_prepared([self.prepare(s) for s in specs])  # every check first

    def prepare(self, spec: TaskSpec) -> PreparedTask:
        """Check ``spec`` (``InvalidInput`` naming the field) and encode its input."""
        return prepare(spec, self.limits)

    def submit_prepared(self, prepared: Sequence[PreparedTask]) -> list[Submission]:
        """``submit_many`` of tasks already checked by ``prepare``: one transaction, one
        durable commit, all accepted or none."""
        prepared = list(prepared)
        self._refuse_reused_keys(prepared)
        now = self.clock()
        # Large inputs go to the blob store first: a crash between the two leaves an orphan
        # blob, never a task whose input is missing.
        rows = [self._row(p, now) for p in prepared]
        if self._one_statement(rows):
            # PostgreSQL, no keys, no quota: the insert and its wake-ups are one statement,
            # which commits on its own (durably: synchronous_commit stays on), in one round
            # trip instead of BEGIN, INSERT, NOTIFY and COMMIT.
            keyless = list(zip(rows, prepared, strict=True))
            with autocommit(self.engine) as conn:
                conn.execute(
                    sql.PG_INSERT_BATCH_NOTIFY,
                    {"p_now": now, "p_rows": _pg_rows(keyless), "p_channel": CHANNEL},
                )
            return [Submission(self._task_from_insert(r), created=True) for r in rows]
        out: list[Submission] = []
        with write_tx(self.engine) as conn:
            self._check_quota(conn, prepared)
            keyless = [(r, p) for r, p in zip(rows, prepared, strict=True)
                       if r["idempotency_key"] is None]  # fmt: skip
            if keyless and conn.dialect.name == "postgresql":
                conn.execute(sql.PG_INSERT_BATCH, {"p_now": now, "p_rows": _pg_rows(keyless)})
            elif keyless:
                conn.execute(tasks.insert(), [r for r, _ in keyless])
            for row, p in zip(rows, prepared, strict=True):
                if row["idempotency_key"] is None:
                    out.append(Submission(self._task_from_insert(row), created=True))
                else:
                    out.append(self._insert_keyed(conn, row, p))
            created = {s.task.model for s in out if s.created}
            self.notifier.in_transaction(conn, created)
        self.notifier.after_commit(created)
        return out

    def _one_statement(self, rows: list[dict[str, Any]]) -> bool:
        return (
            self.engine.dialect.name == "postgresql"
            and isinstance(self.notifier, PostgresNotifier)
            and self.limits.max_queued_per_tenant is None
            and all(r["idempotency_key"] is None for r in rows)
        )

    def _check_quota(self, conn: Connection, prepared: list[PreparedTask]) -> None:
        """Refuse a submission that would take a tenant past ``max_queued_per_tenant``. On
        SQLite the write lock makes the count exact; on PostgreSQL concurrent submitters of one
        tenant may overshoot by what they submit at the same moment."""
        limit = self.limits.max_queued_per_tenant
        if limit is None:
            return
        wanted: dict[str, int] = {}
        for p in prepared:
            wanted[p.spec.tenant] = wanted.get(p.spec.tenant, 0) + 1
        for tenant, n in sorted(wanted.items()):
            queued = conn.execute(sql.QUEUED_OF_TENANT, {"p_tenant": tenant}).scalar_one()
            if queued + n > limit:
                raise QuotaExceeded(
                    f"tenant {tenant} has {queued} tasks queued and the limit is {limit}; "
                    "retry when some have run",
                    tenant=tenant,
                    queued=queued,
                    limit=limit,
                    retry_after_s=5,
                )

    def _refuse_reused_keys(self, prepared: list[PreparedTask]) -> None:
        """Refuse a reused idempotency key before large inputs reach the blob store. The
        insert re-checks under the unique constraint; this only spares the store a blob that
        nothing would reference."""
        keyed = [
            p
            for p in prepared
            if p.spec.idempotency_key is not None
            and len(p.encoded_input) > self.limits.inline_input_limit
        ]
        if not keyed:
            return
        with read_tx(self.engine) as conn:
            for p in keyed:
                row = conn.execute(
                    sa.select(t.id, t.request_hash).where(
                        t.tenant == p.spec.tenant, t.idempotency_key == p.spec.idempotency_key
                    )
                ).first()
                if row is not None and row.request_hash != p.request_hash:
                    raise _key_conflict(p.spec.idempotency_key, row.id)

    def _row(self, p: PreparedTask, now: datetime) -> dict[str, Any]:
        inline = len(p.encoded_input) <= self.limits.inline_input_limit
        return {
            "id": new_task_id(),
            "tenant": p.spec.tenant,
            "model": p.spec.model,
            "model_version": p.spec.version,
            "lane": p.lane.value,
            "priority": p.spec.priority,
            "input": p.spec.input if inline else None,
            "input_ref": None if inline else self.blobs.put(p.encoded_input),
            "status": TaskStatus.QUEUED.value,
            "attempts": 0,
            "max_attempts": p.max_attempts,
            "not_before": now,
            "cancel_requested": False,
            "idempotency_key": p.spec.idempotency_key,
            "request_hash": p.request_hash if p.spec.idempotency_key is not None else None,
            "created_at": now,
            "webhook_url": p.spec.webhook_url,
            "webhook_state": "pending" if p.spec.webhook_url else None,
            "webhook_attempts": 0,
            "webhook_next_at": None,  # set when the task ends
        }

    @staticmethod
    def _task_from_insert(row: dict[str, Any]) -> Task:
        full = {c.name: row.get(c.name) for c in tasks.c}
        return Task.from_row(full)  # type: ignore[arg-type]

    def _insert_keyed(self, conn: Connection, row: dict[str, Any], p: PreparedTask) -> Submission:
        # ON CONFLICT DO NOTHING: two racing submitters with one key both end up with the row
        # that committed first (PostgreSQL waits for it), never with an integrity error.
        insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
        stmt = (
            insert(tasks)
            .values(row)
            .on_conflict_do_nothing(index_elements=["tenant", "idempotency_key"])
            .returning(*tasks.c)
        )
        inserted = conn.execute(stmt).mappings().first()
        if inserted is not None:
            return Submission(Task.from_row(inserted), created=True)
        existing = (
            conn.execute(
                sa.select(tasks).where(
                    t.tenant == row["tenant"], t.idempotency_key == row["idempotency_key"]
                )
            )
            .mappings()
            .one()
        )
        if existing["request_hash"] != p.request_hash:
            raise _key_conflict(row["idempotency_key"], existing["id"])
        return Submission(Task.from_row(existing), created=False)

    def get(self, task_id: str, tenant: str | None = None) -> Task:
        """The task; ``NotFound`` when it does not exist or belongs to another tenant."""
        query = sa.select(tasks).where(t.id == str(task_id)[:64])
        if tenant is not None:
            query = query.where(t.tenant == tenant)
        with read_tx(self.engine) as conn:
            row = conn.execute(query).mappings().first()
        if row is None:
            raise NotFound(f"task {task_id!s:.64} not found", task_id=str(task_id)[:64])
        return Task.from_row(row)

    def get_many(self, task_ids: Sequence[str]) -> dict[str, Task]:
        """The tasks that exist among ``task_ids``, in one query (for waiters on many tasks)."""
        ids = sorted({str(i)[:64] for i in task_ids})
        if not ids:
            return {}
        with read_tx(self.engine) as conn:
            rows = conn.execute(sa.select(tasks).where(t.id.in_(ids))).mappings().all()
        return {r["id"]: Task.from_row(r) for r in rows}

    def outcomes(self, tasks_read: Sequence[Task]) -> dict[str, Task]:
        """Each of ``tasks_read`` with its state and outcome as they stand now (status, result,
        error, attempts, times), its other fields as given: for waiters on outcomes, without
        reading inputs back."""
        by_id = {t.id: t for t in tasks_read}
        if not by_id:
            return {}
        query = sa.select(
            t.id, t.status, t.cancel_requested, t.attempts, t.result, t.result_ref,
            t.error_code, t.error_message, t.started_at, t.finished_at,
        ).where(t.id.in_(sorted(by_id)))  # fmt: skip
        with read_tx(self.engine) as conn:
            rows = conn.execute(query).mappings().all()
        out = {}
        for r in rows:
            error = None
            if r["error_code"] is not None:
                error = TaskError(r["error_code"], r["error_message"] or "")
            out[r["id"]] = dataclasses.replace(
                by_id[r["id"]],
                status=TaskStatus(r["status"]),
                cancel_requested=bool(r["cancel_requested"]),
                attempts=r["attempts"],
                result=r["result"],
                result_ref=r["result_ref"],
                error=error,
                started_at=r["started_at"],
                finished_at=r["finished_at"],
                lease_owner=None,
                lease_expires_at=None,
            )
        return out

    def task_states(self, task_ids: Sequence[str]) -> dict[str, tuple[str, bool]]:
        """(status, cancel_requested) of the tasks that exist among ``task_ids``: what a
        watcher compares, without reading inputs or results."""
        ids = sorted({str(i)[:64] for i in task_ids})
        if not ids:
            return {}
        query = sa.select(t.id, t.status, t.cancel_requested).where(t.id.in_(ids))
        with read_tx(self.engine) as conn:
            return {r.id: (r.status, bool(r.cancel_requested)) for r in conn.execute(query)}

    def list_tasks(
        self,
        *,
        tenant: str | None = None,
        status: str | None = None,
        model: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> TaskPage:
        """Tasks newest first; pass the page's ``next_cursor`` back to get the next page."""
        check_int(limit, "limit", 1, MAX_PAGE)
        query = sa.select(tasks).order_by(t.id.desc()).limit(limit + 1)
        if tenant is not None:
            query = query.where(t.tenant == tenant)
        if status is not None:
            query = query.where(t.status == check_status(status).value)
        if model is not None:
            query = query.where(t.model == check_name(model, "model"))
        if cursor is not None:
            query = query.where(t.id < str(cursor)[:64])
        with read_tx(self.engine) as conn:
            rows = conn.execute(query).mappings().all()
        items = [Task.from_row(r) for r in rows[:limit]]
        return TaskPage(items, items[-1].id if len(rows) > limit else None)

    def cancel(self, task_id: str, tenant: str | None = None) -> Task:
        """Cancel: a queued task ends at once; a running one is flagged for its worker to stop.

        Cancelling a cancelled task is a no-op; a succeeded or failed one raises TaskFinished.
        """
        now = self.clock()
        with write_tx(self.engine) as conn:
            query = sa.select(t.status).where(t.id == str(task_id)[:64])
            if tenant is not None:
                query = query.where(t.tenant == tenant)
            status = conn.execute(query.with_for_update()).scalar()
            if status is None:
                raise NotFound(f"task {task_id!s:.64} not found", task_id=str(task_id)[:64])
            if status in (TaskStatus.SUCCEEDED, TaskStatus.FAILED):
                raise TaskFinished(f"task {task_id} already {status}", status=status)
            values: dict[str, Any] = {"cancel_requested": True}
            if status == TaskStatus.QUEUED:
                values |= {
                    "status": TaskStatus.CANCELLED.value,
                    "finished_at": now,
                    "webhook_next_at": webhook_due(now),
                }
            if status != TaskStatus.CANCELLED:
                conn.execute(sa.update(tasks).where(t.id == task_id).values(values))
            row = conn.execute(sa.select(tasks).where(t.id == task_id)).mappings().one()
            ended = finished_topics([task_id]) if status == TaskStatus.QUEUED else []
            self.notifier.in_transaction(conn, ended)
        self.notifier.after_commit(ended)
        return Task.from_row(row)


def _key_conflict(key: str | None, task_id: str) -> IdempotencyConflict:
    return IdempotencyConflict(
        f"idempotency key {key!r} was already used for a different request (task {task_id}); "
        "use a new key for a new request",
        field="idempotency_key",
        task_id=task_id,
    )


_PG_ROW_KEYS = ("id", "tenant", "model", "model_version", "lane", "priority", "input_ref",
                "max_attempts", "webhook_url", "webhook_state")  # fmt: skip


def _pg_rows(keyless: list[tuple[dict[str, Any], PreparedTask]]) -> str:
    """``PG_INSERT_BATCH``'s rows: the inputs spliced in as the canonical JSON they were
    encoded to, not encoded again."""
    parts = []
    for row, p in keyless:
        head = json.dumps({k: row[k] for k in _PG_ROW_KEYS})
        value = p.encoded_input.decode() if row["input_ref"] is None else "null"
        parts.append(f'{head[:-1]},"input":{value}}}')
    return f"[{','.join(parts)}]"
